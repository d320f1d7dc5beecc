"""The node's WireGuard identity: its private key file and the X25519 operations around it.

Owns ``<state_dir>/wireguard.key`` (base64, mode 0600, in a 0700 directory), created once and
reused across agent restarts so peers keep knowing this node. Key generation and public-key
derivation are ``cryptography``'s X25519 (constant-time, maintained); this module only encodes
(base64 for schemas and ``wg``, hex for the UAPI). Keys are never logged.
"""

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_FILE = "wireguard.key"
KEY_LEN = 32


class InvalidKey(ValueError):
    """A key that is not base64 of 32 bytes."""


def decode_key(b64: str) -> bytes:
    """Base64 (as in our schemas and ``wg``) to 32 raw bytes; raises ``InvalidKey``."""
    if not isinstance(b64, str) or len(b64) != 44:
        raise InvalidKey("a WireGuard key is 44 characters of base64")
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise InvalidKey(f"a WireGuard key is base64 of 32 bytes: {exc}") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey("a WireGuard key is base64 of 32 bytes")
    if base64.b64encode(raw).decode() != b64:
        # the last character has 2 bits decoding ignores: an alias would compare unequal as a
        # string while naming the same key (one peer twice, a write on every heartbeat)
        raise InvalidKey("a WireGuard key must be in canonical base64")
    return raw


def b64_to_hex(b64: str) -> str:
    """Our base64 keys to the hex the UAPI text protocol speaks."""
    return decode_key(b64).hex()


def hex_to_b64(hexkey: str) -> str:
    try:
        raw = bytes.fromhex(hexkey)
    except ValueError:
        raise InvalidKey("a UAPI key is 64 hex digits") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey("a UAPI key is 64 hex digits")
    return base64.b64encode(raw).decode()


def clamp(private_b64: str) -> str:
    """The key as WireGuard stores it (both the kernel and wireguard-go clamp on set)."""
    k = bytearray(decode_key(private_b64))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return base64.b64encode(bytes(k)).decode()


def generate_private_key() -> str:
    """Like ``wg genkey``: a fresh X25519 private key, clamped as WireGuard stores it, base64."""
    raw = X25519PrivateKey.generate().private_bytes_raw()
    return clamp(base64.b64encode(raw).decode())


def public_key(private_b64: str) -> str:
    """Like ``wg pubkey``: the X25519 public key of a base64 private key."""
    private = X25519PrivateKey.from_private_bytes(decode_key(private_b64))
    return base64.b64encode(private.public_key().public_bytes_raw()).decode()


def load_or_create_private_key(state_dir: Path, rotate: bool = False) -> str:
    """Return the node's private key (base64), creating ``state_dir/wireguard.key`` if absent.

    A file that exists but does not hold a valid key is an error, never silently replaced: a
    new identity would cut this node off until the controller learns the new public key.
    ``rotate`` replaces the key on purpose (the agent then re-registers its new public key).
    """
    state_dir = Path(state_dir)
    path = state_dir / KEY_FILE
    try:
        if rotate:
            raise FileNotFoundError  # write a fresh key over the old one, atomically
        text = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        try:
            decode_key(text)
        except InvalidKey as exc:
            raise InvalidKey(f"{path}: {exc}") from None
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # tighten a hand-copied key
        return text
    state_dir.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # atomic: a crash never leaves half a key behind
    return key
