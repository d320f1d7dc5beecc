"""The running controller: intent in memory (written through to the store), the API as a NATS
micro service, the heartbeat publisher and ack tracking.

Every mutation runs under one lock: validate (pure, ``controller.ops``) → persist → update memory →
wake the publisher. A refused request returns before the first write.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.micro
from nats.aio.client import Client
from nats.micro.request import Request as MicroRequest

from controller import ops
from controller.compute import ClusterConfig, compute_snapshots, network_bridge, network_mtu
from controller.store import Store
from controller.tracker import Tracker
from schemas import api, naming
from schemas.codec import decode, encode
from schemas.desired import Snapshot
from schemas.errors import ApiError, BadRequest, Internal
from schemas.intent import Intent, NodeVersion
from schemas.messages import Ack, Health

log = logging.getLogger(__name__)
T = TypeVar("T", Ack, Health)


def stamp(previous: NodeVersion | None, snapshot: Snapshot) -> NodeVersion:
    """Versions change only when content does, and only ever grow."""
    if previous is not None and previous.digest == snapshot.digest:
        return previous
    return NodeVersion(
        node=snapshot.node,
        version=(previous.version if previous else 0) + 1,
        digest=snapshot.digest,
    )


class Controller:
    def __init__(
        self,
        nc: Client,
        store: Store,
        config: ClusterConfig,
        clock: Callable[[], float] = time.time,
    ):
        self.nc, self.store, self.config, self.clock = nc, store, config, clock
        self.intent = Intent()
        self.versions: dict[str, NodeVersion] = {}
        self.tracker = Tracker()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._encoded: dict[str, bytes] = {}  # node → snapshot bytes, rebuilt on change only
        self._dirty = True
        self._tasks: list[asyncio.Task] = []
        self._service: nats.micro.service.Service | None = None
        self._subs: list[Any] = []
        self._stopping = False

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.intent, self.versions = await self.store.load()
        log.info(
            "controller: loaded %d networks, %d NICs, %d nodes",
            len(self.intent.networks),
            len(self.intent.nics),
            len(self.intent.nodes),
        )
        self._subs.append(await self.nc.subscribe(naming.ack_subject("*"), cb=self._on_ack))
        self._subs.append(await self.nc.subscribe(naming.health_subject("*"), cb=self._on_health))
        self._service = await nats.micro.add_service(
            self.nc,
            name="otherix-networking",
            version="1.0.0",
            description="Otherix networking controller API",
            queue_group="otherix-controller",
        )
        for endpoint in api.ENDPOINTS:
            await self._service.add_endpoint(
                name=endpoint.replace(".", "-"),
                subject=naming.api_subject(endpoint),
                handler=self._endpoint(endpoint),
            )
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))

    async def stop(self) -> None:
        # A flag as well as cancel(): on 3.11 a cancel that races a finishing nats-py request
        # (asyncio.wait_for inside) can be swallowed, and the loop must still end.
        self._stopping = True
        self._changed.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._service is not None:
            await self._service.stop()
        for sub in self._subs:
            await sub.unsubscribe()

    # --- heartbeat ------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while not self._stopping:
            try:
                await self.publish_all()
            except Exception:
                log.exception("controller: heartbeat failed; retrying next cycle")
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that arrives as the
            # wait ends, and this loop would never stop.
            try:
                async with asyncio.timeout(self.config.heartbeat_interval):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()

    async def publish_all(self) -> None:
        async with self._lock:
            if self._dirty:
                await self._restamp()
            encoded = dict(self._encoded)
        for node, data in encoded.items():
            try:
                await self.nc.publish(naming.desired_subject(node), data)
            except nats.errors.MaxPayloadError:  # one oversized node must not starve the rest
                log.error(
                    "controller: snapshot of node %s is %d bytes, above the server's max_payload; not sent",
                    node, len(data),
                )  # fmt: skip

    async def _restamp(self) -> None:
        """Recompute snapshots after an intent change; persist versions before publishing them."""
        now = self.clock()
        encoded = {}
        for node, snapshot in compute_snapshots(self.intent, self.config).items():
            version = stamp(self.versions.get(node), snapshot)
            if version is not self.versions.get(node):
                await self.store.put(version)
                self.versions[node] = version
            stamped = msgspec.structs.replace(snapshot, version=version.version, published_at=now)
            encoded[node] = encode(stamped)
        self._encoded, self._dirty = encoded, False

    def _wake(self) -> None:
        self._dirty = True
        self._changed.set()

    # --- acks and health ------------------------------------------------------------------------

    def _from_node(self, msg, type_: type[T]) -> T | None:
        """A registered node's own ack or health; anything else is logged and dropped."""
        try:
            value = decode(msg.data, type_)
        except msgspec.DecodeError as e:
            log.warning("controller: malformed %s on %s: %s", type_.__name__, msg.subject, e)
            return None
        if value.node != msg.subject.rsplit(".", 1)[-1]:
            log.warning(
                "controller: %s of node %s arrived on %s; ignored",
                type_.__name__,
                value.node,
                msg.subject,
            )
            return None
        # unregistered nodes are not tracked: memory stays bounded by registered nodes
        return value if value.node in self.intent.nodes else None

    async def _on_ack(self, msg) -> None:
        if (ack := self._from_node(msg, Ack)) is None:
            return
        self.tracker.record_ack(ack, self.clock())
        known = self.versions.get(ack.node)
        if ack.applied_version > (known.version if known else 0):
            # The node holds a version we never issued (the store was lost or restored from an
            # older backup): continue above it, or the agent would refuse everything as stale.
            log.warning(
                "controller: node %s has applied version %d, above ours (%d); continuing above it",
                ack.node, ack.applied_version, known.version if known else 0,
            )  # fmt: skip
            self.versions[ack.node] = NodeVersion(
                node=ack.node, version=ack.applied_version, digest=""
            )
            self._wake()
        if not ack.ok:
            log.warning(
                "controller: node %s refused or failed version %d: %s",
                ack.node,
                ack.version,
                ack.error,
            )

    async def _on_health(self, msg) -> None:
        if (health := self._from_node(msg, Health)) is not None:
            self.tracker.record_health(health, self.clock())

    # --- API ------------------------------------------------------------------------------------

    def _endpoint(self, name: str) -> Callable[[MicroRequest], Awaitable[None]]:
        request_type, handler = self._handlers()[name]

        async def handle(req: MicroRequest) -> None:
            try:
                parsed = decode(req.data or b"{}", request_type)
                ops.check_schema(parsed)
                async with self._lock:
                    reply = await handler(parsed)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                await _respond_error(req, BadRequest(f"invalid {name} request: {e}"))
            except ApiError as e:
                await _respond_error(req, e)
            except Exception as e:
                log.exception("controller: %s failed", name)
                await _respond_error(req, Internal(f"{name} failed: {e}"))
            else:
                await req.respond(encode(reply))

        return handle

    def _handlers(self) -> dict[str, tuple[type, Callable[[Any], Awaitable[Any]]]]:
        return {
            "network.create": (api.NetworkCreate, self._network_create),
            "network.list": (api.Empty, self._network_list),
            "network.show": (api.ByName, self._network_show),
            "network.delete": (api.NetworkDelete, self._network_delete),
            "nic.attach": (api.NicAttach, self._nic_attach),
            "nic.detach": (api.NicDetach, self._nic_detach),
            "nic.list": (api.NicFilter, self._nic_list),
            "node.register": (api.NodeRegister, self._node_register),
            "node.list": (api.Empty, self._node_list),
            "node.remove": (api.NodeRemove, self._node_remove),
            "status": (api.Empty, self._status),
        }

    def _network_info(self, name: str) -> api.NetworkInfo:
        net = ops.network(self.intent, name)
        return api.NetworkInfo(
            network=net,
            mtu=network_mtu(net, self.config.underlay_mtu),
            nics=sum(1 for n in self.intent.nics.values() if n.network == name),
            bridge=network_bridge(net),
        )

    async def _network_create(self, req: api.NetworkCreate) -> api.NetworkInfo:
        net = ops.create_network(self.intent, req, self.clock())
        await self.store.put(net)
        self.intent.networks[net.name] = net
        log.info("controller: network %s created (%s %s)", net.name, net.type.value, net.subnet)
        self._wake()
        return self._network_info(net.name)

    async def _network_list(self, _: api.Empty) -> list[api.NetworkInfo]:
        return [self._network_info(name) for name in sorted(self.intent.networks)]

    async def _network_show(self, req: api.ByName) -> api.NetworkInfo:
        return self._network_info(req.name)

    async def _network_delete(self, req: api.NetworkDelete) -> api.NetworkInfo:
        info = self._network_info(req.name)
        net, nics = ops.delete_network(self.intent, req)
        for nic in nics:
            await self.store.delete(nic)
            del self.intent.nics[nic.id]
        await self.store.delete(net)
        del self.intent.networks[net.name]
        log.info("controller: network %s deleted (%d NICs with it)", net.name, len(nics))
        self._wake()
        return info

    async def _nic_attach(self, req: api.NicAttach) -> api.NicInfo:
        nic = ops.attach_nic(self.intent, req, self.clock())
        await self.store.put(nic)
        self.intent.nics[nic.id] = nic
        log.info(
            "controller: NIC %s of vm %s attached to %s on %s",
            nic.id,
            nic.vm,
            nic.network,
            nic.node,
        )
        self._wake()
        return api.NicInfo(nic=nic, tap=naming.tap_name(nic.id))

    async def _nic_detach(self, req: api.NicDetach) -> api.NicInfo:
        nic = ops.find_nic(self.intent, req.id)
        await self.store.delete(nic)
        del self.intent.nics[nic.id]
        log.info("controller: NIC %s detached from %s on %s", nic.id, nic.network, nic.node)
        self._wake()
        return api.NicInfo(nic=nic, tap=naming.tap_name(nic.id))

    async def _nic_list(self, req: api.NicFilter) -> list[api.NicInfo]:
        if req.network is not None:
            ops.network(self.intent, req.network)
        nics = sorted(self.intent.nics.values(), key=lambda n: (n.network, n.node, n.ip))
        return [
            api.NicInfo(nic=n, tap=naming.tap_name(n.id))
            for n in nics
            if req.network in (None, n.network) and req.node in (None, n.node)
        ]

    async def _node_register(self, req: api.NodeRegister) -> api.NodeStatus:
        node = ops.register_node(self.intent, req, self.clock(), self.config.mesh_prefix)
        previous = self.intent.nodes.get(node.name)
        if previous is None or msgspec.structs.replace(
            previous, registered_at=0
        ) != msgspec.structs.replace(node, registered_at=0):
            await self.store.put(node)
            self.intent.nodes[node.name] = node
            log.info(
                "controller: node %s registered (underlay %s, tunnel %s)",
                node.name,
                node.underlay_ip,
                node.tunnel_ip,
            )
            self._wake()
        await self._restamp_if_dirty()
        return self._node_status(node.name)

    async def _node_list(self, _: api.Empty) -> list[api.NodeStatus]:
        await self._restamp_if_dirty()
        return [self._node_status(name) for name in sorted(self.intent.nodes)]

    async def _node_remove(self, req: api.NodeRemove) -> api.NodeStatus:
        status = self._node_status(req.name) if req.name in self.intent.nodes else None
        node, nics = ops.remove_node(self.intent, req)
        for nic in nics:
            await self.store.delete(nic)
            del self.intent.nics[nic.id]
        await self.store.delete(node)
        del self.intent.nodes[node.name]
        # keep version.<node>: a node that comes back must never see its version go down
        self.tracker.forget(node.name)
        log.info("controller: node %s removed (%d NICs with it)", node.name, len(nics))
        self._wake()
        assert status is not None
        return status

    def _node_status(self, name: str) -> api.NodeStatus:
        version = self.versions.get(name)
        return self.tracker.status(
            self.intent.nodes[name],
            version.version if version else 0,
            self.clock(),
            self.stale_after,
        )

    @property
    def stale_after(self) -> float:
        """Agents ack every heartbeat; this many seconds of silence mark a node stale."""
        return max(5 * self.config.heartbeat_interval, 10.0)

    async def _restamp_if_dirty(self) -> None:
        if self._dirty:
            await self._restamp()  # so replies show the desired version of the latest change

    async def _status(self, _: api.Empty) -> api.Status:
        await self._restamp_if_dirty()
        nodes = tuple(self._node_status(name) for name in sorted(self.intent.nodes))
        return api.Status(
            nodes=nodes,
            networks=len(self.intent.networks),
            nics=len(self.intent.nics),
            heartbeat_interval=self.config.heartbeat_interval,
            underlay_mtu=self.config.underlay_mtu,
            converged=all(n.converged for n in nodes),
            now=self.clock(),
        )


async def _respond_error(req: MicroRequest, error: ApiError) -> None:
    reply = api.ErrorReply(code=error.code, message=error.message)
    await req.respond_error(str(error.code), error.message, data=encode(reply))
