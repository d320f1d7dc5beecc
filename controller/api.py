"""The API as a NATS micro service: the endpoint table and one handler per endpoint.

Every request runs under the controller's one lock. A mutation validates first (pure,
``controller.ops``), then persists, then updates memory and tells the publisher which records
changed (it recomputes later, off the reply's path): a refused request returns before the first
write. Read endpoints (``status``, ``node.list``, ``network.*``
list/show, ``nic.list``) never write the store; the versions they show come from the
publisher's memory. Errors are ``schemas.errors`` classes, sent as their code and message.

Writes are safe to retry (a caller whose request timed out cannot know whether it was made): a
create or attach that matches what exists returns it, marked ``existed``; a detach of a NIC
detached moments ago says so. Listings (``status``, ``node.list``, ``nic.list``) are paged
(``controller.paging``) so that no reply passes the bus's max_payload, whatever ``limit`` asks.
"""

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.micro
from nats.aio.client import Client
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Service

from controller import ops, paging
from controller.compute import ClusterConfig, network_bridge, network_mtu
from controller.metrics import ControllerMetrics
from controller.publisher import Publisher
from controller.store import NotLeader, Store
from controller.tracker import Tracker
from schemas import api, naming
from schemas.bus import INBOX_ROOT
from schemas.codec import encode
from schemas.errors import ApiError, BadRequest, Internal, NotFound, Unavailable
from schemas.intent import Intent, Nic, NodeVersion
from schemas.wire import SectionData, SectionGet

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any]]

# A page fills at most this share of the connection's max_payload: the rest is room for the
# reply's envelope (status's counts, the cursor) and headers.
PAGE_SHARE = 0.75
DETACHED_REMEMBERED = 4096  # NICs whose repeated detach is answered "already detached"


def stale_after(config: ClusterConfig) -> float:
    """Agents ack every heartbeat; this many seconds of silence mark a node stale."""
    return max(5 * config.heartbeat_interval, 10.0)


class Api:
    def __init__(
        self,
        store: Store,
        config: ClusterConfig,
        intent: Intent,
        tracker: Tracker,
        publisher: Publisher,
        lock: asyncio.Lock,
        clock: Callable[[], float],
        refused: Counter[str] | None = None,
        metrics: ControllerMetrics | None = None,
    ):
        self.store, self.config, self.intent, self.tracker = store, config, intent, tracker
        self.publisher, self._lock, self.clock = publisher, lock, clock
        self.metrics = metrics or ControllerMetrics()
        # reports and requests refused, by reason (shared with controller.acks; status shows it,
        # the metrics expose it)
        self.refused = refused if refused is not None else self.metrics.refused
        # set by controller.service as the role changes: who leads, where a node's desired
        # version comes from, and what a follower awaits before a read
        self.leader: Callable[[], str] = lambda: ""
        self.desired: Callable[[str], NodeVersion | None] = publisher.desired
        self.catch_up: Callable[[], Awaitable[None]] | None = None
        self.max_payload = 1024 * 1024  # nats-server's default, while not serving
        self._nc: Client | None = None  # once serving: its max_payload is the server's (INFO)
        self.detached: OrderedDict[str, Nic] = OrderedDict()  # newest last, in memory only

    def table(self) -> dict[str, tuple[type, Handler]]:
        """Endpoint name → (request type, handler); the names are ``schemas.api.ENDPOINTS``."""
        return {
            "network.create": (api.NetworkCreate, self.network_create),
            "network.list": (api.Empty, self.network_list),
            "network.show": (api.ByName, self.network_show),
            "network.delete": (api.NetworkDelete, self.network_delete),
            "nic.attach": (api.NicAttach, self.nic_attach),
            "nic.detach": (api.NicDetach, self.nic_detach),
            "nic.list": (api.NicFilter, self.nic_list),
            "node.register": (api.NodeRegister, self.node_register),
            "node.list": (api.Page, self.node_list),
            "node.remove": (api.NodeRemove, self.node_remove),
            "node.rekey": (api.ByName, self.node_rekey),
            "status": (api.Page, self.status),
            "section.get": (SectionGet, self.section_get),
        }

    async def serve(self, nc: Client, endpoints: tuple[str, ...] = api.ENDPOINTS) -> Service:
        """A micro service answering ``endpoints`` (the leader serves the writes, everyone the
        reads: a write reaches only the leader's queue subscription)."""
        self._nc = nc
        service = await nats.micro.add_service(
            nc,
            name="otherix-networking",
            version="1.0.0",
            description="Otherix networking controller API",
            queue_group="otherix-controller",
        )
        table = self.table()
        for name in endpoints:
            scoped = name in api.NODE_SCOPED_ENDPOINTS  # otherix.v1.api.<name>.<node>
            await service.add_endpoint(
                name=name.replace(".", "-"),
                subject=naming.api_subject(name, "*") if scoped else naming.api_subject(name),
                handler=self._endpoint(name, *table[name], scoped=scoped),
            )
        return service

    def _endpoint(
        self, name: str, request_type: type, handler: Handler, scoped: bool = False
    ) -> Callable[[MicroRequest], Awaitable[None]]:
        async def timed(req: MicroRequest) -> None:
            with self.metrics.requests.labels(name).time():
                await handle(req)

        async def handle(req: MicroRequest) -> None:
            if not self._answerable(name, req):
                return
            try:
                parsed = ops.decode_request(name, req.data or b"{}", request_type)
                ops.check_schema(parsed)
                if scoped and parsed.name != req.subject.rsplit(".", 1)[-1]:
                    # the bus lets a node publish only on its own subject: the body must agree
                    raise BadRequest(f"{name} for node {parsed.name!r} sent on {req.subject}")
                if self.catch_up is not None:
                    await self.catch_up()
                async with self._lock:
                    reply = await handler(parsed)
            except ApiError as e:
                await self._fail(req, name, e)
            except NotLeader as e:  # deposed, or a write's outcome unknown: the fence refused it
                leader = f"; leader is {self.leader()}" if self.leader() else ""
                await self._fail(
                    req, name, Unavailable(f"not the leading controller ({e}){leader}; retry")
                )
            except Exception as e:
                log.exception("controller: %s failed", name)
                await self._fail(req, name, Internal(f"{name} failed: {e}"))
            else:
                data = encode(reply)
                self.metrics.answered(name, reply, data)  # changes; section.get's bytes
                await req.respond(data)

        return timed

    async def _fail(self, req: MicroRequest, name: str, error: ApiError) -> None:
        self.metrics.failed(name, error.code)
        await _respond_error(req, error)

    def _answerable(self, name: str, req: MicroRequest) -> bool:
        """Answer only into an inbox. The reply subject is the caller's choice, and the
        controller may publish where no caller may (desired state, the intent bucket): a reply
        aimed there would make it a confused deputy. Such requests are counted, not answered."""
        reply = req._msg.reply or ""  # nats.micro's Request has no public reply subject
        if reply.startswith(f"{INBOX_ROOT}."):
            return True
        self.refused["request with a reply subject outside _INBOX"] += 1
        log.warning("controller: %s request with reply subject %r refused", name, reply[:200])
        return False

    # --- networks -------------------------------------------------------------------------------

    def _network_info(self, name: str, existed: bool = False) -> api.NetworkInfo:
        net = ops.network(self.intent, name)
        return api.NetworkInfo(
            network=net,
            mtu=network_mtu(net, self.config.underlay_mtu),
            nics=sum(1 for n in self.intent.nics.values() if n.network == name),
            bridge=network_bridge(net),
            existed=existed,
        )

    async def network_create(self, req: api.NetworkCreate) -> api.NetworkInfo:
        net = ops.create_network(self.intent, req, self.clock(), self.config)
        if self.intent.networks.get(net.name) is net:  # a retry: nothing to write
            return self._network_info(net.name, existed=True)
        await self.store.put(net)
        self.intent.networks[net.name] = net
        log.info("controller: network %s created (%s %s)", net.name, net.type.value, net.subnet)
        self.publisher.wake(("network", net.name))
        return self._network_info(net.name)

    async def network_list(self, _: api.Empty) -> list[api.NetworkInfo]:
        return [self._network_info(name) for name in sorted(self.intent.networks)]

    async def network_show(self, req: api.ByName) -> api.NetworkInfo:
        return self._network_info(req.name)

    async def network_delete(self, req: api.NetworkDelete) -> api.NetworkInfo:
        info = self._network_info(req.name)
        net, nics = ops.delete_network(self.intent, req)
        for nic in nics:
            await self.store.delete(nic)
            del self.intent.nics[nic.id]
        self._remember_detached(nics)
        await self.store.delete(net)
        del self.intent.networks[net.name]
        log.info("controller: network %s deleted (%d NICs with it)", net.name, len(nics))
        self.publisher.wake(("network", net.name), *(("nic", nic.id) for nic in nics))
        return info

    # --- NICs -----------------------------------------------------------------------------------

    async def nic_attach(self, req: api.NicAttach) -> api.NicInfo:
        nic = ops.attach_nic(self.intent, req, self.clock())
        if self.intent.nics.get(nic.id) is nic:  # a retry: nothing to write
            log.info(
                "controller: NIC %s of vm %s on %s existed already", nic.id, nic.vm, nic.network
            )
            return api.NicInfo(nic=nic, tap=naming.tap_name(nic.id), existed=True)
        await self.store.put(nic)
        self.intent.nics[nic.id] = nic
        log.info(
            "controller: NIC %s of vm %s attached to %s on %s",
            nic.id,
            nic.vm,
            nic.network,
            nic.node,
        )
        self.publisher.wake(("nic", nic.id))
        return api.NicInfo(nic=nic, tap=naming.tap_name(nic.id))

    async def nic_detach(self, req: api.NicDetach) -> api.NicInfo:
        try:
            nic = ops.find_nic(self.intent, req.id)
        except NotFound:
            if gone := ops.find_detached(self.detached.values(), req.id):
                raise NotFound(
                    f"NIC {gone.id} is already detached (vm {gone.vm!r} on network"
                    f" {gone.network!r}, node {gone.node}): nothing to do"
                ) from None
            raise
        # the release order first: a crash in between must not hand the address out at once
        await self._released([nic])
        await self.store.delete(nic)
        del self.intent.nics[nic.id]
        self._remember_detached([nic])
        log.info("controller: NIC %s detached from %s on %s", nic.id, nic.network, nic.node)
        self.publisher.wake(("nic", nic.id))
        return api.NicInfo(nic=nic, tap=naming.tap_name(nic.id))

    async def nic_list(self, req: api.NicFilter) -> api.NicPage:
        if req.network is not None:
            ops.network(self.intent, req.network)
        after = paging.decode_cursor(req.cursor, 4)
        nics = sorted(
            (
                n
                for n in self.intent.nics.values()
                if req.network in (None, n.network) and req.node in (None, n.node)
            ),
            key=_nic_key,
        )
        now, stale = self.clock(), stale_after(self.config)

        def render(n: Nic) -> bytes:
            state = self._nic_state(n, now, stale)
            return encode(api.NicInfo(nic=n, tap=naming.tap_name(n.id), state=state))

        items, cursor = paging.page(
            nics, _nic_key, after, req.limit, self._budget(api.NicPage(items=())), render
        )
        return api.NicPage(items=tuple(items), next=cursor)  # items pre-encoded (msgspec.Raw)

    def _budget(self, envelope: msgspec.Struct) -> int:
        """Bytes a page's items may take: a share of max_payload, less the reply around them
        and the longest cursor (a key of four names)."""
        limit = self._nc.max_payload if self._nc is not None else self.max_payload
        return int(limit * PAGE_SHARE) - len(encode(envelope)) - 4 * 256

    def _remember_detached(self, nics: list[Nic]) -> None:
        """Remember detached NICs (bounded) so that a repeated detach can say what happened."""
        for nic in nics:
            self.detached[nic.id] = nic
            self.detached.move_to_end(nic.id)
        while len(self.detached) > DETACHED_REMEMBERED:
            self.detached.popitem(last=False)

    async def _released(self, nics: list[Nic]) -> None:
        """Record the detached NICs' addresses in their networks' release order."""
        for net in ops.released_networks(self.intent, nics):
            await self.store.put(net)
            self.intent.networks[net.name] = net

    def _nic_state(self, nic: Nic, now: float, stale: float) -> api.NicState:
        """From the node's fresh health: is the tap there, and does a hypervisor hold it?"""
        health = self.tracker.fresh_health(nic.node, now, stale)
        carrier = health.taps.get(naming.tap_name(nic.id)) if health else None
        if carrier is None:
            return api.NicState.PENDING
        return api.NicState.UP if carrier else api.NicState.NO_CARRIER

    # --- nodes and status -----------------------------------------------------------------------

    async def node_register(self, req: api.NodeRegister) -> api.NodeStatus:
        node = ops.register_node(self.intent, req, self.clock(), self.config.mesh_prefix)
        previous = self.intent.nodes.get(node.name)
        if previous is not None and msgspec.structs.replace(
            previous, registered_at=0
        ) == msgspec.structs.replace(node, registered_at=0):
            # an agent re-registers on every connect: unchanged, it is no change
            return msgspec.structs.replace(self._node_status(node.name), existed=True)
        await self.store.put(node)
        self.intent.nodes[node.name] = node
        log.info(
            "controller: node %s registered (underlay %s, tunnel %s)",
            node.name,
            node.underlay_ip,
            node.tunnel_ip,
        )
        self.publisher.wake(("node", node.name))
        return self._node_status(node.name)

    async def node_rekey(self, req: api.ByName) -> api.NodeStatus:
        node = ops.rekey_node(self.intent, req)
        await self.store.put(node)
        self.intent.nodes[node.name] = node
        log.info("controller: node %s may register a new key or endpoint once", node.name)
        return self._node_status(node.name)

    async def node_list(self, req: api.Page) -> api.NodePage:
        items, cursor = self._node_page(req, self._budget(api.NodePage(items=())))
        return api.NodePage(items=tuple(items), next=cursor)  # items pre-encoded (msgspec.Raw)

    def _node_page(self, req: api.Page, budget: int) -> tuple[list[msgspec.Raw], str | None]:
        def render(name: str) -> bytes:
            status = self._node_status(name)
            data = encode(status)
            if len(data) > budget and status.health is not None:
                # one node alone past the budget (a health report with thousands of peers):
                # its peer and tap lists stay out of the listing rather than the node
                trimmed = msgspec.structs.replace(status.health, peers=(), taps={})
                data = encode(msgspec.structs.replace(status, health=trimmed))
            return data

        after = paging.decode_cursor(req.cursor, 1)
        return paging.page(sorted(self.intent.nodes), _name_key, after, req.limit, budget, render)

    async def node_remove(self, req: api.NodeRemove) -> api.NodeStatus:
        status = self._node_status(req.name) if req.name in self.intent.nodes else None
        node, nics = ops.remove_node(self.intent, req)
        await self._released(nics)  # before the deletes, as in nic_detach
        for nic in nics:
            await self.store.delete(nic)
            del self.intent.nics[nic.id]
        self._remember_detached(nics)
        await self.store.delete(node)
        del self.intent.nodes[node.name]
        # keep version.<node>: a node that comes back must never see its version go down
        self.tracker.forget(node.name)
        log.info("controller: node %s removed (%d NICs with it)", node.name, len(nics))
        self.publisher.wake(("node", node.name), *(("nic", nic.id) for nic in nics))
        assert status is not None
        return status

    async def section_get(self, req: SectionGet) -> SectionData:
        """An agent's fetch of one of its own sections (node-scoped: the bus checks who asks)."""
        return self.publisher.section_get(req)

    def _node_status(self, name: str) -> api.NodeStatus:
        return self.tracker.status(
            self.intent.nodes[name],
            self.desired(name),  # the latest change's, not yet persisted
            self.clock(),
            stale_after(self.config),
        )

    async def status(self, req: api.Page) -> api.Status:
        names = sorted(self.intent.nodes)
        envelope = api.Status(
            nodes=(),
            networks=len(self.intent.networks),
            nics=len(self.intent.nics),
            heartbeat_interval=self.config.heartbeat_interval,
            underlay_mtu=self.config.underlay_mtu,
            converged=all(self._node_status(name).converged for name in names),
            now=self.clock(),
            refused_reports=dict(self.refused),
            leader=self.leader(),
        )
        items, cursor = self._node_page(req, self._budget(envelope))
        # nodes pre-encoded (msgspec.Raw); the counts and ``converged`` cover every node
        return msgspec.structs.replace(envelope, nodes=tuple(items), next=cursor)


def _name_key(name: str) -> paging.Key:
    return (name,)


def _nic_key(nic: Nic) -> paging.Key:
    return (nic.network, nic.node, nic.ip, nic.id)


async def _respond_error(req: MicroRequest, error: ApiError) -> None:
    reply = api.ErrorReply(code=error.code, message=error.message)
    await req.respond_error(str(error.code), error.message, data=encode(reply))
