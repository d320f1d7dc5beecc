"""Plain data of the links subsystem: what the kernel has (``Observed``), what to change
(``Action``s, a ``LinkPlan``).

``agent.links.netlink`` fills ``Observed`` from the kernel and executes plans; the planner
(``agent.links.plan``) is a pure function between the two and never sees a socket.
"""

import msgspec

from schemas.desired import FdbEntry


class VxlanInfo(msgspec.Struct, frozen=True, kw_only=True):
    vni: int
    local: str | None
    port: int
    learning: bool


class Link(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str  # "bridge", "tun", "vxlan", "wireguard", ... ("" when the kernel gives none)
    mtu: int
    up: bool  # administratively up (IFF_UP), whatever the carrier
    carrier: bool = False  # IFF_LOWER_UP; a tap has it while a hypervisor holds it open
    master: str | None = None
    addresses: frozenset[str] = frozenset()  # IPv4 "ip/prefixlen"
    vxlan: VxlanInfo | None = None
    index: int = 0  # ifindex from the dump: actions on this link need no RTM_GETLINK (0: unknown)


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """Kernel state of managed (``ot…``) devices only."""

    links: dict[str, Link] = {}
    # per otvx* device: the entries that carry a remote dst (the control-plane kind)
    fdb: dict[str, frozenset[FdbEntry]] = {}
    # per otvx* device: MACs the device learned (never wanted: learning is off)
    learned: dict[str, frozenset[str]] = {}


# --- actions, executed in list order by the applier -------------------------------------------


class CreateBridge(msgspec.Struct, frozen=True, tag=True):
    name: str
    mtu: int


class CreateTap(msgspec.Struct, frozen=True, tag=True):
    name: str
    mtu: int


class CreateVxlan(msgspec.Struct, frozen=True, tag=True):
    name: str
    vni: int
    local: str
    port: int
    mtu: int


class CreateWireGuard(msgspec.Struct, frozen=True, tag=True):
    name: str  # a kernel WireGuard device; its keys and peers are set over genl, not here


class SetMtu(msgspec.Struct, frozen=True, tag=True):
    name: str
    mtu: int


class SetMaster(msgspec.Struct, frozen=True, tag=True):
    name: str
    master: str | None  # None = release from its bridge


class SetUp(msgspec.Struct, frozen=True, tag=True):
    name: str


class AddAddress(msgspec.Struct, frozen=True, tag=True):
    name: str
    address: str  # "ip/prefixlen"


class DelAddress(msgspec.Struct, frozen=True, tag=True):
    name: str
    address: str


class DeleteLink(msgspec.Struct, frozen=True, tag=True):
    name: str


class AddFdb(msgspec.Struct, frozen=True, tag=True):
    device: str
    mac: str
    dst: str


class DelFdb(msgspec.Struct, frozen=True, tag=True):
    device: str
    mac: str
    dst: str | None  # None for a learned entry (no dst)


Action = (
    CreateBridge
    | CreateTap
    | CreateVxlan
    | CreateWireGuard
    | SetMtu
    | SetMaster
    | SetUp
    | AddAddress
    | DelAddress
    | DeleteLink
    | AddFdb
    | DelFdb
)


class LinkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Actions in order, and the ifindex of every link the observation had."""

    actions: tuple[Action, ...] = ()
    indexes: dict[str, int] = {}
