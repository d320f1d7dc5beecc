"""Wire messages and naming rules shared by controller, agent, CLI and lab.

Everything here is pure: msgspec Structs, encoders and small functions. Nothing in this package
touches the network, the kernel or the clock; ``schemas.options`` alone reads the environment
(the ``OTHERIX_*`` variables every command shares).
"""

from typing import Annotated

import msgspec

SCHEMA_VERSION = 1

# Versions are signed 64-bit wherever they travel or are stored; anything beyond is refused when
# decoded, so a forged huge number can never reach arithmetic (or int-to-string limits).
MAX_VERSION = 2**63 - 1
Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)]
