"""Plain data of the links subsystem: what the kernel has (``Observed``), what to change
(``Action``s, a ``LinkPlan``).

Two FDBs are ours: each ``otvx*`` device's own (MAC → remote tunnel address, ``AddFdb``) and
each managed bridge's static entries on its ``ot…`` ports (MAC → port, ``AddPortFdb``), with
learning off on every port so no frame can move a MAC.

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
    port_learning: bool | None = None  # IFLA_BRPORT_LEARNING as a bridge port; None: no master


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """Kernel state of managed (``ot…``) devices only."""

    links: dict[str, Link] = {}
    # per otvx* device: the entries that carry a remote dst (the control-plane kind)
    fdb: dict[str, frozenset[FdbEntry]] = {}
    # per otvx* device: MACs the device learned (never wanted: learning is off)
    learned: dict[str, frozenset[str]] = {}
    # per managed bridge port: MACs of its bridge's static entries on it (ours)
    port_fdb: dict[str, frozenset[str]] = {}
    # per managed bridge port: MACs its bridge learned on it (never wanted: learning is off)
    port_learned: dict[str, frozenset[str]] = {}


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


class SetPortLearning(msgspec.Struct, frozen=True, tag=True):
    name: str  # a bridge port: a port's flags start afresh (learning on) whenever it is enslaved
    learning: bool


class AddFdb(msgspec.Struct, frozen=True, tag=True):
    """A VXLAN device's own entry: a flood MAC gains a dst (append); a unicast MAC's one dst is
    set with NLM_F_REPLACE, so a move is this one message and never leaves the MAC without one."""

    device: str
    mac: str
    dst: str


class DelFdb(msgspec.Struct, frozen=True, tag=True):
    device: str
    mac: str
    dst: str | None  # None for a learned entry (no dst)


class AddPortFdb(msgspec.Struct, frozen=True, tag=True):
    """A static bridge entry MAC → port, set with NLM_F_REPLACE: it creates the entry or moves
    it from another port of the same bridge in one message (a bridge has one entry per MAC)."""

    port: str
    mac: str


class DelPortFdb(msgspec.Struct, frozen=True, tag=True):
    port: str  # only removes the entry while it still points at this port
    mac: str


Action = (
    CreateBridge
    | CreateTap
    | CreateVxlan
    | CreateWireGuard
    | SetMtu
    | SetMaster
    | SetUp
    | SetPortLearning
    | AddAddress
    | DelAddress
    | DeleteLink
    | AddFdb
    | DelFdb
    | AddPortFdb
    | DelPortFdb
)

FdbAction = AddFdb | DelFdb | AddPortFdb | DelPortFdb


class LinkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Actions in order, and the ifindex of every link the observation had."""

    actions: tuple[Action, ...] = ()
    indexes: dict[str, int] = {}
