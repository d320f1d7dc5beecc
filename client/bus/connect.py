"""What a client passes to ``nats.connect`` to use its bus identity: the nkey seed file (nats-py
signs the server's nonce with it, re-reading the file on every reconnect), a TLS context that
trusts only the bus CA, and the identity's private inbox prefix (the only inbox it may
subscribe to). Builds keyword arguments; never connects."""

import re
import ssl
from pathlib import Path
from typing import Any

from client.bus import permissions, pki

# Environment the commands should read (the lead wires them into schemas.options):
CREDS_ENV = "OTHERIX_NATS_CREDS"  # path of the identity's seed file (*.nk)
CA_ENV = "OTHERIX_NATS_CA"  # path of the bus CA certificate (ca.pem)

_DENIED = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.I)


def tls_context(ca_file: str | Path) -> ssl.SSLContext:
    """Verify the server's certificate and host name against the bus CA only."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def identity_inbox(seed_file: str | Path) -> str:
    return permissions.inbox_prefix(pki.public_key(Path(seed_file).read_bytes()))


def connect_kwargs(
    seed_file: str | Path | None, ca_file: str | Path | None, name: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``. Either file may be None (an open bus, or a
    TLS-only one); a missing or malformed seed file raises here, not at connect time."""
    kwargs: dict[str, Any] = {}
    if name:
        kwargs["name"] = name
    if seed_file is not None:
        kwargs["nkeys_seed"] = str(seed_file)
        kwargs["inbox_prefix"] = identity_inbox(seed_file)
    if ca_file is not None:
        kwargs["tls"] = tls_context(ca_file)
    return kwargs


def denied(error: Exception) -> tuple[str, str] | None:
    """``("publish" | "subscription", subject)`` when ``error`` (as nats-py hands it to
    ``error_cb``) is nats-server refusing a permission, else None. nats-py lowercases the
    server's message, so the subject comes back lowercased. A refused publish is dropped
    silently on the caller's side: a request then just times out, so a client that wants to
    say "not allowed" must watch for this."""
    m = _DENIED.search(str(error))
    return (m.group(1).lower(), m.group(2)) if m else None
