"""Bus security: nkey identities, the permission matrix nats-server enforces, TLS, and the
``otherix-bus`` command that creates and changes it (issue 7).

- ``permissions``: roster → nats-server configuration text (pure);
- ``pki``: seeds, CA and server certificate (bytes, no files);
- ``files``: the bus directory (init, add-node, revoke-node, renew-cert, reload);
- ``connect``: ``connect_kwargs(seed_file, ca_file)`` for ``nats.connect``;
- ``cli``: the ``otherix-bus`` console script.

Depends on ``schemas`` only; nothing here runs on the data path.
"""

from client.bus.connect import CA_ENV, CREDS_ENV, connect_kwargs

__all__ = ["CA_ENV", "CREDS_ENV", "connect_kwargs"]
