"""The desired-state wire protocol (snapshot schema 3): a small HEAD per node, and SECTIONS.

A node's desired state is split into sections, each a set of keyed items with a version and a
digest: ``node`` (that node's own bridges, taps, NAT subnets, VXLAN devices and WireGuard
interface), ``mesh`` (every mesh node's WireGuard peer entry, the agent leaves out its own) and
``vni.<vni>`` (one overlay's MAC → tunnel entries, shared by every node hosting it; the agent
leaves out its own). The HEAD on ``otherix.v1.desired.<node>`` names the sections that node needs
by version and digest; a changed section travels once as a delta attached to the HEAD, or is
fetched with ``section.get`` (``SectionGet`` → ``SectionData``, paged below max_payload).

A section's digest is an order-free sum of its items' hashes (SHA-256 of each item's JSON bytes
as sent), so both sides update it per item instead of re-hashing the section. It is a
consistency check on an authenticated bus, not a defence against a forger. Data and pure
functions only: no I/O.
"""

import hashlib

import msgspec

from schemas import SCHEMA_VERSION, Version
from schemas.desired import SNAPSHOT_SCHEMA, Bridge, Tap, WgPeer

NODE_SECTION = "node"
MESH_SECTION = "mesh"
_MOD = 1 << 128


def vni_section(vni: int) -> str:
    return f"vni.{vni}"


def section_vni(name: str) -> int | None:
    """The VNI of a ``vni.<vni>`` section name, else None."""
    kind, _, rest = name.partition(".")
    return int(rest) if kind == "vni" and rest.isdigit() else None


# --- items ----------------------------------------------------------------------------------------


class Settings(msgspec.Struct, frozen=True, kw_only=True, tag="settings"):
    underlay_mtu: int = 1500
    infrastructure: tuple[str, ...] = ()


class BridgeItem(Bridge, frozen=True, kw_only=True, tag="bridge"):
    pass


class TapItem(Tap, frozen=True, kw_only=True, tag="tap"):
    pass


class NatItem(msgspec.Struct, frozen=True, kw_only=True, tag="nat"):
    subnet: str


class VxlanItem(msgspec.Struct, frozen=True, kw_only=True, tag="vxlan"):
    name: str
    vni: int
    bridge: str
    local: str
    mtu: int
    port: int = 4789


class WgItem(msgspec.Struct, frozen=True, kw_only=True, tag="wg"):
    name: str
    address: str
    listen_port: int
    mtu: int


class PeerItem(WgPeer, frozen=True, kw_only=True, tag="peer"):
    pass


class FdbItem(msgspec.Struct, frozen=True, kw_only=True, tag="fdb"):
    nic: str  # the item's key: one entry per NIC (two NICs may share a MAC)
    node: str  # the hosting node: the agent leaves out its own entries
    mac: str
    dst: str  # that node's tunnel address


Item = Settings | BridgeItem | TapItem | NatItem | VxlanItem | WgItem | PeerItem | FdbItem


def item_key(item: Item) -> str:
    """Each item's key inside its section; removals name items by it."""
    match item:
        case Settings():
            return "settings"
        case BridgeItem(name=name):
            return f"bridge/{name}"
        case TapItem(name=name):
            return f"tap/{name}"
        case NatItem(subnet=subnet):
            return f"nat/{subnet}"
        case VxlanItem(name=name):
            return f"vxlan/{name}"
        case WgItem():
            return "wg"
        case PeerItem(node=node):
            return node
        case FdbItem(nic=nic):
            return nic
    raise TypeError(f"not a section item: {type(item).__name__}")


def item_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "big")


def digest_of(total: int) -> str:
    """A section's digest from the sum of its item hashes."""
    return f"{total % _MOD:032x}"


def add_hash(total: int, h: int) -> int:
    return (total + h) % _MOD


def sub_hash(total: int, h: int) -> int:
    return (total - h) % _MOD


# --- messages -------------------------------------------------------------------------------------


class Ref(msgspec.Struct, frozen=True, array_like=True):
    """A section a node needs: ``[name, version, digest]`` (arrays keep a HEAD small)."""

    name: str
    version: Version
    digest: str


class SectionData(msgspec.Struct, frozen=True, kw_only=True):
    """A section's content at ``version``: from ``base`` (0 = the whole section) by upserts and
    removals. A whole section may come in ``pages`` parts, each a slice of its items."""

    name: str
    version: Version
    digest: str
    base: Version = 0
    upserts: tuple[msgspec.Raw, ...] = ()
    removals: tuple[str, ...] = ()
    page: int = 0
    pages: int = 1


class Head(msgspec.Struct, frozen=True, kw_only=True):
    """What ``otherix.v1.desired.<node>`` carries every heartbeat."""

    node: str
    version: Version
    digest: str  # of the node's whole state (its refs' digests): what the ack echoes
    refs: tuple[Ref, ...] = ()
    # sections that changed in this version, attached once (a delta, or small whole sections)
    sections: tuple[SectionData, ...] = ()
    published_at: float = 0.0
    schema: int = SNAPSHOT_SCHEMA


def head_digest(refs: tuple[Ref, ...]) -> str:
    """Content only (names and section digests, not versions): equal state, equal digest."""
    text = ";".join(f"{r.name}={r.digest}" for r in sorted(refs, key=lambda r: r.name))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SectionGet(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``section.get``: a node asks for one of its sections, saying which version it holds
    (0 = none); ``page`` > 0 continues a paged whole section at ``version``."""

    name: str  # the node (node-scoped endpoint: the subject's last token)
    section: str
    have: Version = 0
    version: Version = 0
    page: int = 0
    schema: int = SCHEMA_VERSION
