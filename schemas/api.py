"""Requests and replies of the controller's API (a NATS micro service under otherix.v1.api).

Requests are input we own, so they are decoded with ``forbid_unknown_fields``: a typo in a field
name is an error, not a silently ignored option. Errors travel as micro-service error headers
(``Nats-Service-Error-Code`` / ``Nats-Service-Error``) with an ``ErrorReply`` body; the exceptions
they stand for are ``schemas.errors``.

Writes are safe to repeat without an idempotency key: what a request names is its key. A
``NetworkCreate`` with the parameters of an existing network, or a ``NicAttach`` for a VM that has
a matching NIC on that network (a VM has one NIC per network), answers with that object and
``existed=True``; one that differs is a 409 naming what it clashes with. Listings are paged
(``Page``): a reply carries ``next`` until the last page.
"""

import enum

import msgspec

from schemas import SCHEMA_VERSION
from schemas.intent import Egress, Network, NetworkType, Nic, Node
from schemas.messages import Ack, Health

# endpoint name -> subject suffix under otherix.v1.api
ENDPOINTS = (
    "network.create",
    "network.list",
    "network.show",
    "network.delete",
    "nic.attach",
    "nic.detach",
    "nic.list",
    "node.register",
    "node.list",
    "node.remove",
    "node.rekey",
    "status",
    "section.get",
)
# Endpoints that never change intent: a viewer may call these.
READ_ENDPOINTS = ("network.list", "network.show", "nic.list", "node.list", "status")
# Endpoints an agent calls about itself: the node is the subject's last token
# (otherix.v1.api.node.register.<node>), so the bus, not the handler, decides who may call them.
# section.get: an agent fetches one of its own desired-state sections (schemas.wire).
NODE_SCOPED_ENDPOINTS = ("node.register", "section.get")


class Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    schema: int = SCHEMA_VERSION


class NetworkCreate(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    type: NetworkType
    subnet: str
    egress: Egress = Egress.NONE
    vni: int | None = None


class ByName(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str


class NetworkDelete(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    force: bool = False  # also detach the network's NICs


class NicAttach(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """(vm, network) names the NIC: repeated, it returns the NIC it made (see above)."""

    network: str
    node: str
    vm: str
    mac: str | None = None
    ip: str | None = None
    port_security: bool = True  # False only for appliances that must send as other addresses


class NicDetach(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str  # full id or any unique prefix of at least 12 hex digits (the tap's digits)


class Page(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A listing's page: at most ``limit`` items after ``cursor`` (None: from the start). The
    controller may return fewer (a reply stays well under the bus's max_payload); only a reply
    whose ``next`` is None ends the listing. Old requests without these fields get page one."""

    limit: int | None = None
    cursor: str | None = None  # opaque: the ``next`` of the previous page


class NicFilter(Page, frozen=True, kw_only=True, forbid_unknown_fields=True):
    network: str | None = None
    node: str | None = None


class NodeRegister(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    underlay_ip: str | None = None
    wg_public_key: str | None = None
    wg_listen_port: int | None = None


class NodeRemove(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    force: bool = False  # also detach the node's NICs


class Empty(Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NetworkInfo(msgspec.Struct, frozen=True, kw_only=True):
    network: Network
    mtu: int
    nics: int
    bridge: str  # device name on the nodes
    existed: bool = False  # network.create only: an identical network was there already


class NicState(enum.StrEnum):
    UP = "up"  # the tap exists and a hypervisor holds it (carrier)
    NO_CARRIER = "no-carrier"  # the tap exists but nothing is attached to it
    PENDING = "pending"  # the node has not reported the tap (yet), or its health is stale


class NicInfo(msgspec.Struct, frozen=True, kw_only=True):
    nic: Nic
    tap: str
    state: NicState = NicState.PENDING
    existed: bool = False  # nic.attach only: the VM had this NIC already (a retried attach)


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    node: Node
    desired_version: int = 0
    desired_digest: str = ""  # an ack must carry this digest for the node to count converged
    applied_version: int = 0
    converged: bool = False
    stale: bool = False  # not heard from for several heartbeats
    last_ack: Ack | None = None
    last_error: str | None = None
    last_heard: float = 0.0  # unix time of the last ack or health, 0 = never
    health: Health | None = None
    no_carrier: tuple[str, ...] = ()  # taps of this node without a hypervisor attached
    existed: bool = False  # node.register only: registered already, unchanged (no change made)


class NodePage(msgspec.Struct, frozen=True, kw_only=True):
    """A ``node.list`` reply: one page, sorted by name."""

    items: tuple[NodeStatus, ...]
    next: str | None = None  # the cursor of the next page; None on the last one


class NicPage(msgspec.Struct, frozen=True, kw_only=True):
    """A ``nic.list`` reply: one page, sorted by network, node, address."""

    items: tuple[NicInfo, ...]
    next: str | None = None


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """A ``status`` reply: the counts and ``converged`` cover the whole cluster, ``nodes`` is
    one page of it (sorted by name), ``next`` the cursor of the next page."""

    nodes: tuple[NodeStatus, ...]
    networks: int
    nics: int
    heartbeat_interval: float
    underlay_mtu: int
    converged: bool
    now: float
    # agent reports refused since the controller started, by reason (forged or malformed)
    refused_reports: dict[str, int] = {}
    leader: str = ""  # instance name of the controller holding the lease, "" if none is known
    next: str | None = None
    schema: int = SCHEMA_VERSION


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    """Body of an error reply (the wire form of ``schemas.errors.ApiError``)."""

    code: int  # 400 bad request, 404 not found, 409 conflict, 501 deferred, 500 internal
    message: str
    schema: int = SCHEMA_VERSION
