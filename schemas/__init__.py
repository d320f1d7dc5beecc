"""Wire messages and naming rules shared by controller, agent, CLI and lab.

Everything here is pure: msgspec Structs, encoders and small functions. Nothing in this package
touches the network, the kernel or the clock; ``schemas.options`` alone reads the environment
(the ``OTHERIX_*`` variables every command shares).
"""

SCHEMA_VERSION = 1
