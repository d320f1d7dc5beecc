"""Intent: what operators asked for, as persisted by the controller (one KV entry each)."""

import enum

import msgspec

from schemas import SCHEMA_VERSION, Version


class NetworkType(enum.StrEnum):
    BRIDGE = "bridge"
    OVERLAY = "overlay"
    VLAN = "vlan"  # deferred
    ISOLATED = "isolated"  # deferred


DEFERRED_TYPES = frozenset({NetworkType.VLAN, NetworkType.ISOLATED})


class Egress(enum.StrEnum):
    NONE = "none"
    NAT = "nat"


class Network(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: NetworkType
    subnet: str  # CIDR, normalised (e.g. "10.0.0.0/24")
    gateway: str  # first host address of the subnet
    egress: Egress = Egress.NONE
    vni: int | None = None  # overlay only
    created_at: float = 0.0
    # NIC addresses given up, oldest first (bounded, ``controller.ipam.RELEASED_LIMIT``): the
    # allocator hands these out last, least recently released first. Older stores lack it.
    released: tuple[str, ...] = ()
    schema: int = SCHEMA_VERSION


class Nic(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # 32 lowercase hex digits; the tap is "ot" + the first 12
    network: str
    node: str
    vm: str
    mac: str  # "02:xx:xx:xx:xx:xx", lowercase
    ip: str  # host address inside the network's subnet
    port_security: bool = True  # the tap lets out only this NIC's MAC and IP
    created_at: float = 0.0
    schema: int = SCHEMA_VERSION


class Node(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    underlay_ip: str | None = None  # address other nodes reach this one on (WireGuard endpoint)
    wg_public_key: str | None = None  # base64, from the agent; the private key never leaves it
    wg_listen_port: int | None = None
    tunnel_ip: str | None = None  # allocated by the controller from the mesh prefix
    registered_at: float = 0.0
    # An admin allowed the next registration to change key or endpoint (otherixctl node rekey);
    # without it a registration that changes them is refused (no hijack of a node's identity).
    rekey: bool = False
    schema: int = SCHEMA_VERSION


class NodeVersion(msgspec.Struct, frozen=True, kw_only=True):
    """A node's desired version and digest. Releases before snapshot schema 3 persisted one per
    node (``version.<node>``); they are still read at start, so versions keep growing."""

    node: str
    version: Version
    digest: str
    schema: int = SCHEMA_VERSION


class Generation(msgspec.Struct, frozen=True, kw_only=True):
    """The high-water mark of desired-state generations (``controller.versions``): no version
    above it has been sent, and a restarted controller continues above it."""

    reserved: Version
    schema: int = SCHEMA_VERSION


class NodeVersions(msgspec.Struct, frozen=True, kw_only=True):
    """Each node's (version, digest), saved now and then in one entry (never per change). Only a
    ``final`` record, saved by a clean stop after its last HEAD, is exactly what the nodes were
    sent: the next leader keeps a node's version while its content is the same. Any other may
    be a second behind (a node changed and changed back since), so it is not reused."""

    nodes: dict[str, tuple[Version, str]] = {}
    final: bool = False
    schema: int = SCHEMA_VERSION


class Intent(msgspec.Struct, frozen=True, kw_only=True):
    """The whole intent at one moment: the input of the pure snapshot computation."""

    networks: dict[str, Network] = {}
    nics: dict[str, Nic] = {}
    nodes: dict[str, Node] = {}
