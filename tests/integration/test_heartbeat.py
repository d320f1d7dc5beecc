"""The heartbeat publisher and ack tracking against a real nats-server.

A subscription counts as live only once its first message arrived (DESIGN.md: flush() alone is
not proof); every wait has a timeout.
"""

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable

import pytest

from agent.assemble import Assembler, complete
from client.api import ApiClient
from schemas import naming
from schemas.codec import decode, encode
from schemas.desired import SNAPSHOT_SCHEMA, Snapshot
from schemas.intent import Nic
from schemas.messages import Ack, Health
from schemas.wire import Head, SectionData, SectionGet
from tests.conftest import NatsServer, start_controller

pytestmark = pytest.mark.timeout(30)


async def listen(server, node: str) -> "Listener":
    """A listener on its own connection as ``node`` (only it may read its desired state)."""
    return await Listener(await server.connect(node), node).start()


async def publish_as(server, node: str, subject: str, data: bytes) -> None:
    await (await server.connect(node)).publish(subject, data)


class Listener:
    """Snapshots of one node, in arrival order: each HEAD assembled into the whole state as an
    agent does it (``agent.assemble``: attached content, held sections, ``section.get``)."""

    def __init__(self, nc, node: str):
        self.nc, self.node = nc, node
        self.queue: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.seen: list[Snapshot] = []  # everything that arrived, also what was read
        self.heads: list[Head] = []
        self.fetched: list[SectionData] = []  # section.get replies
        self.assemblers: dict[str, Assembler] = {}

    async def start(self) -> "Listener":
        api = ApiClient(self.nc, timeout=10)

        async def fetch(req: SectionGet) -> SectionData:
            self.fetched.append(await api.section_get(req))
            return self.fetched[-1]

        async def on_msg(msg):
            head = decode(msg.data, Head)
            self.heads.append(head)
            assembler = self.assemblers.setdefault(head.node, Assembler(head.node))
            snap = await complete(assembler, head, fetch)
            if snap is None:
                return
            self.seen.append(snap)
            self.queue.put_nowait(snap)

        self.sub = await self.nc.subscribe(naming.desired_subject(self.node), cb=on_msg)
        return self

    async def live(
        self, poke: Callable[[int], Awaitable[object]] | None = None, timeout: float = 10.0
    ) -> Snapshot:
        """Wait for the first snapshot; ``poke`` triggers an immediate publish while we wait."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while time.monotonic() < deadline:
            if poke is not None:
                await poke(attempt)
                attempt += 1
            try:
                return await asyncio.wait_for(self.queue.get(), 0.3)
            except TimeoutError:
                continue
        raise TimeoutError(f"no snapshot for {self.node} within {timeout}s")

    async def next(self, timeout: float = 5.0) -> Snapshot:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def until(self, predicate, timeout: float = 5.0) -> Snapshot:
        """The first snapshot from now on that matches (older ones in flight are skipped)."""
        async with asyncio.timeout(timeout):
            while not predicate(snap := await self.queue.get()):
                pass
        return snap

    def drain(self) -> list[Snapshot]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


async def wait_status(api: ApiClient, node: str, predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        status = next(s for s in (await api.status()).nodes if s.node.name == node)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"status of {node} never matched: {status}")
        await asyncio.sleep(0.05)


@pytest.fixture
def api(controller, nc):
    return ApiClient(nc)


async def test_snapshots_repeat_every_heartbeat_unchanged(api, nats_server):
    """Without any change the same snapshot keeps coming (the period itself: bench heartbeat)."""
    await api.node_register(name="n1")
    listener = await listen(nats_server, "n1")
    first = await listener.live()
    repeats = [await listener.next() for _ in range(5)]
    assert {(s.version, s.digest, s.published_at) for s in repeats} == {
        (first.version, first.digest, first.published_at)
    }
    assert all(s.node == "n1" and s.schema == SNAPSHOT_SCHEMA for s in repeats)


async def test_change_is_published_at_once(nats_server, nc):
    # The heartbeat is far longer than the test's timeout: a snapshot that arrives at all was
    # published by the change, not by a heartbeat (latency: bench heartbeat).
    ctl = await start_controller(nats_server, heartbeat=3600.0)
    try:
        api = ApiClient(nc)
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/24")
        await api.network_create("pokes", "bridge", "10.9.0.0/24")
        listener = await listen(nats_server, "n1")
        # a change of n1's own state publishes its HEAD at once (other nodes' changes do not)
        first = await listener.live(lambda i: api.nic_attach("pokes", "n1", f"poke{i}"))

        await api.nic_attach("br", "n1", "vm")
        bridge = naming.bridge_network_bridge("br")
        snap = await listener.until(lambda s: bridge in {b.name for b in s.bridges})
        assert snap.version > first.version  # versions are generations: they grow, by any step
        assert [t.bridge for t in snap.taps].count(bridge) == 1
    finally:
        await ctl.stop()


async def test_versions_grow_only_on_content_change(api, nats_server):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    await api.network_create("br", "bridge", "10.0.0.0/24")
    n1, n2 = await listen(nats_server, "n1"), await listen(nats_server, "n2")
    v1 = await n1.live()
    await n2.live()

    # another node's change: n2's snapshot shows it; n1's heartbeats after it keep its version
    await api.nic_attach("br", "n2", "vm-on-n2")
    await n2.until(lambda s: len(s.taps) == 1)
    n1.drain()
    for _ in range(2):
        later = await n1.next()
        assert (later.version, later.digest) == (v1.version, v1.digest)
    # a change of n1's content: a new version
    nic = await api.nic_attach("br", "n1", "vm")
    v2 = await n1.until(lambda s: len(s.taps) == 1)
    assert v2.version > v1.version and v2.digest != v1.digest
    # back to the old content: the version still only grows
    await api.nic_detach(nic.nic.id)
    v3 = await n1.until(lambda s: s.version > v2.version)
    assert v3.taps == () and v3.digest == v1.digest


async def test_publishing_stops_for_a_removed_node(open_nats_server):
    """Needs the open bus: one subscription to every node's desired state (no identity may
    have that) is what makes arrival order the publish order."""
    ctl = await start_controller(open_nats_server)
    nc = await open_nats_server.connect()
    try:
        await _publishing_stops_for_a_removed_node(ApiClient(nc), nc)
    finally:
        await ctl.stop()


async def _publishing_stops_for_a_removed_node(api, nc):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    every = await Listener(nc, "*").start()  # one subscription: arrival order is publish order
    await every.until(lambda s: s.node == "n1")
    before = await every.until(lambda s: s.node == "n2")
    assert before.node == "n2"
    await api.node_remove("n1")
    # a cycle under way may still carry n1; once two of n2's come in a row, only n2's come
    previous = None
    async with asyncio.timeout(10):
        while (current := (await every.next()).node) != "n2" or previous != "n2":
            previous = current
    assert [(await every.next()).node for _ in range(3)] == ["n2", "n2", "n2"]


async def test_acks_and_health_show_in_status(api, nats_server):
    n1 = await nats_server.connect("n1")
    await api.node_register(name="n1")
    desired = (await api.status()).nodes[0]
    v = desired.desired_version
    assert v >= 1 and desired.applied_version == 0 and not desired.converged
    snap = await (await Listener(n1, "n1").start()).live()
    assert snap.version == v

    # an ack of the right version but another content proves nothing
    other = Ack(node="n1", version=v, applied_version=v, digest="not-the-snapshot")
    await n1.publish(naming.ack_subject("n1"), encode(other))
    st = await wait_status(api, "n1", lambda s: s.last_ack == other)
    assert not st.converged
    # the right digest, but no health yet: not converged either
    ok = Ack(node="n1", version=v, applied_version=v, digest=snap.digest, changes=3)
    await n1.publish(naming.ack_subject("n1"), encode(ok))
    st = await wait_status(api, "n1", lambda s: s.last_ack == ok)
    assert not st.converged and st.last_error is None and st.last_heard > 0
    health = Health(node="n1", applied_version=v, ok=True, started_at=1.0, sent_at=time.time())
    await n1.publish(naming.health_subject("n1"), encode(health))
    st = await wait_status(api, "n1", lambda s: s.health is not None)
    assert st.health == health and st.converged and (await api.status()).converged

    bad = Ack(node="n1", version=v, applied_version=v, ok=False, error="netlink: boom")
    await n1.publish(naming.ack_subject("n1"), encode(bad))
    st = await wait_status(api, "n1", lambda s: s.last_error is not None)
    assert st.last_error == "netlink: boom" and not st.converged and st.applied_version == v
    assert not (await api.status()).converged

    await n1.publish(naming.ack_subject("n1"), encode(ok))
    st = await wait_status(api, "n1", lambda s: s.last_error is None)
    assert st.converged


async def test_ack_on_another_nodes_subject_is_ignored(api, nats_server):
    """n2's identity may publish on ack.n2 only, but what it says there is still checked."""
    n1, n2 = await nats_server.connect("n1"), await nats_server.connect("n2")
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    v1 = (await api.status()).nodes[0].desired_version
    foreign = Ack(node="n1", version=v1, applied_version=v1)
    marker = Ack(node="n2", version=0, applied_version=0, error="marker", ok=False)
    await n1.publish(naming.ack_subject("n1"), b"{not an ack")  # malformed: dropped
    await n2.publish(naming.ack_subject("n2"), encode(foreign))
    await n2.publish(naming.ack_subject("n2"), encode(marker))  # same subject, so after it
    await wait_status(api, "n2", lambda s: s.last_error == "marker")
    n1 = (await api.status()).nodes[0]
    assert n1.node.name == "n1" and n1.last_ack is None and n1.applied_version == 0
    assert not n1.converged


async def test_versions_continue_above_what_a_node_already_applied(api, nats_server):
    """A controller whose store was lost must not publish versions the agent calls stale."""
    await api.node_register(name="n1")
    nc = await nats_server.connect("n1")  # only the node itself may say what it applied
    listener = await Listener(nc, "n1").start()
    first = await listener.live()
    assert first.version < 500
    refused = Ack(
        node="n1", version=first.version, applied_version=500, ok=False, error="stale snapshot"
    )
    await nc.publish(naming.ack_subject("n1"), encode(refused))
    snap = await listener.until(lambda s: s.version > 500)
    assert snap.version == 501 and snap.digest == first.digest  # same content, higher version
    await wait_status(api, "n1", lambda s: s.desired_version == 501)


async def test_no_payload_cliff_a_state_many_times_max_payload_arrives_whole(tmp_path):
    """Issue 10 item 4, scaled down with max_payload: 50,000 FDB entries and 5,000 peers against
    1 MiB become 1,000 FDB entries and 100 mesh peers against 16 KiB (about the same multiple of
    the payload limit: ~6x for the FDB, ~1x for the mesh), plus a HEAD every heartbeat."""
    (tmp_path / "js").mkdir()
    server = NatsServer(tmp_path / "js", max_payload=16 * 1024)
    server.start()
    ctl = await start_controller(server, heartbeat=0.2)
    try:
        admin = await server.connect("admin")
        api = ApiClient(admin, timeout=20)
        peers = 100
        for i in range(peers):
            key = base64.b64encode(i.to_bytes(32, "big")).decode()
            await api.node_register(
                name=f"p{i}" if i else "big",  # the one we listen as has a bus identity
                underlay_ip=f"192.0.2.{i + 1}",
                wg_public_key=key,
                wg_listen_port=51820,
            )
        vni = (await api.network_create("ov", "overlay", "10.8.0.0/20")).network.vni
        ctl.intent.nics.update(  # loaded like a restart would: 1,000 attaches through the API
            {
                n.id: n
                for n in (fake_nic(i, f"p{i % peers}" if i % peers else "big") for i in range(1000))
            }
        )
        ctl.publisher.wake()
        n0 = await listen(server, "big")
        snap = await n0.live()
        fdb = snap.vxlans[0].fdb
        remote = [n for n in ctl.intent.nics.values() if n.node != "big"]
        assert len(fdb) == len(remote) + peers - 1  # every remote MAC and a flood entry per peer
        assert len(snap.wireguard.peers) == peers - 1
        # it came in pages, each under the limit (or the server would have refused it)
        pages = [d for d in n0.fetched if d.name == f"vni.{vni}"]
        assert len(pages) >= 5 and {d.pages for d in pages} == {len(pages)}
        assert max(len(encode(d)) for d in n0.fetched) <= 16 * 1024
    finally:
        await ctl.stop()
        await server.close_clients()
        server.stop()


def fake_nic(i: int, node: str) -> Nic:
    return Nic(
        id=f"{i:012x}" + "0" * 20,
        network="ov",
        node=node,
        vm=f"vm{i}",
        mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
        ip=f"10.8.{(i + 2) >> 8}.{(i + 2) & 255}",
    )
