"""The node's WireGuard identity: its private key file and the X25519 maths around it.

Owns ``<state_dir>/wireguard.key`` (base64, mode 0600), created once and reused across agent
restarts so peers keep knowing this node. Public keys are derived in pure Python (RFC 7748
Montgomery ladder) instead of shelling out to ``wg pubkey``: it is called from the agent's event
loop, needs no extra package and no subprocess. It is not constant-time, which is acceptable for
deriving our own public key once from a key that never leaves this host. Keys are never logged.
"""

import base64
import binascii
import os
from pathlib import Path

KEY_FILE = "wireguard.key"
KEY_LEN = 32
_P = 2**255 - 19
_A24 = 121665
_BASE_POINT = (9).to_bytes(32, "little")


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
    """Like ``wg genkey``: 32 random bytes, clamped, base64."""
    return clamp(base64.b64encode(os.urandom(KEY_LEN)).decode())


def public_key(private_b64: str) -> str:
    """Like ``wg pubkey``: X25519(private, 9)."""
    return base64.b64encode(x25519(decode_key(private_b64), _BASE_POINT)).decode()


def x25519(scalar: bytes, u: bytes) -> bytes:
    """RFC 7748 section 5, straight from the pseudo-code."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    n = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = x2 + z2, x2 - z2
        aa, bb = a * a % _P, b * b % _P
        e = aa - bb
        c, d = x3 + z3, x3 - z3
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


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
