"""How a process joins the bus as one identity: its nkey seed file (nats-py signs the server's
nonce with it, re-reading the file on every reconnect), a TLS context that trusts only the bus
CA, and the identity's private inbox prefix (``_INBOX.<public key>``), the only inbox the server
lets it subscribe to, so no identity can read another's replies.

Shared by every command (the controller depends on ``schemas`` alone). It builds keyword
arguments for ``nats.connect`` and never connects; ``client.bus`` writes the files.
"""

import re
import ssl
from pathlib import Path
from typing import Any

import nkeys

CREDS_ENV = "OTHERIX_NATS_CREDS"  # path of the identity's seed file (*.nk)
CA_ENV = "OTHERIX_NATS_CA"  # path of the bus CA certificate (ca.pem)
INBOX_ROOT = "_INBOX"

_PUBLIC_USER_KEY = re.compile(r"^U[A-Z2-7]{55}$")


def valid_public_key(key: str) -> bool:
    return bool(_PUBLIC_USER_KEY.match(key))


def inbox_prefix(public_key: str) -> str:
    """The inbox prefix an identity must connect with (nats-py ``inbox_prefix``)."""
    if not valid_public_key(public_key):
        raise ValueError("not a public user nkey (U…)")
    return f"{INBOX_ROOT}.{public_key}"


def public_key(seed: bytes) -> str:
    """The public user key (``U…``) of a seed; ValueError if it is not a user seed."""
    try:
        kp = nkeys.from_seed(bytearray(seed.strip()))
    except (nkeys.NkeysError, ValueError) as e:
        raise ValueError(f"not an nkey seed: {e}") from None
    try:
        if not kp.public_key.startswith(b"U"):
            raise ValueError("not a user nkey seed (SU…)")
        return kp.public_key.decode()
    finally:
        kp.wipe()


def tls_context(ca_file: str | Path) -> ssl.SSLContext:
    """Verify the server's certificate and host name against the bus CA only."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def identity_inbox(seed_file: str | Path) -> str:
    return inbox_prefix(public_key(Path(seed_file).read_bytes()))


def connect_kwargs(
    seed_file: str | Path | None, ca_file: str | Path | None, name: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``. Either file may be None (an open bus, or a
    TLS-only one); a missing or malformed file raises here with its path, not at connect time."""
    kwargs: dict[str, Any] = {}
    if name:
        kwargs["name"] = name
    if seed_file is not None:
        try:
            kwargs["inbox_prefix"] = identity_inbox(seed_file)
        except (OSError, ValueError) as e:
            raise BusConfigError(f"credentials {seed_file}: {e}") from None
        kwargs["nkeys_seed"] = str(seed_file)
    if ca_file is not None:
        # TLS first, before the server's INFO: nats-py otherwise starts TLS only when an INFO in
        # clear asks for it, and a man in the middle could strip that request
        kwargs["tls_handshake_first"] = True
        try:
            kwargs["tls"] = tls_context(ca_file)
        except (OSError, ssl.SSLError) as e:
            raise BusConfigError(f"CA certificate {ca_file}: {e}") from None
    return kwargs


class BusConfigError(ValueError):
    """A credentials or CA file that cannot be used; the message names the file."""
