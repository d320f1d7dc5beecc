"""The heartbeat publisher and ack tracking against a real nats-server.

A subscription counts as live only once its first message arrived (DESIGN.md: flush() alone is
not proof); every wait has a timeout.
"""

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import nats
import pytest

from client.api import ApiClient
from schemas import naming
from schemas.codec import decode, encode
from schemas.desired import Snapshot
from schemas.messages import Ack, Health
from tests.conftest import NatsServer, start_controller

pytestmark = pytest.mark.timeout(30)


class Listener:
    """Snapshots of one node with their arrival time (monotonic)."""

    def __init__(self, nc, node: str):
        self.nc, self.node = nc, node
        self.queue: asyncio.Queue[tuple[float, Snapshot]] = asyncio.Queue()

    async def start(self) -> "Listener":
        async def on_msg(msg):
            self.queue.put_nowait((time.monotonic(), decode(msg.data, Snapshot)))

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
                return (await asyncio.wait_for(self.queue.get(), 0.3))[1]
            except TimeoutError:
                continue
        raise TimeoutError(f"no snapshot for {self.node} within {timeout}s")

    async def next(self, timeout: float = 3.0) -> tuple[float, Snapshot]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def drain(self) -> list[tuple[float, Snapshot]]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    async def collect(self, seconds: float) -> list[tuple[float, Snapshot]]:
        await asyncio.sleep(seconds)
        return self.drain()


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


async def test_snapshots_arrive_every_heartbeat(api, nc):
    await api.node_register(name="n1")
    listener = await Listener(nc, "n1").start()
    first = await listener.live()
    got = await listener.collect(1.2)  # heartbeat is 0.2 s: about 6
    assert 4 <= len(got) <= 9, [t for t, _ in got]
    gaps = [b - a for (a, _), (b, _) in zip(got, got[1:], strict=False)]
    assert 0.12 <= statistics.median(gaps) <= 0.35, gaps
    assert {(s.version, s.digest) for _, s in got} == {(first.version, first.digest)}
    assert all(s.node == "n1" and s.schema == 1 for _, s in got)


async def test_change_is_published_at_once(nc):
    ctl = await start_controller(nc, heartbeat=5.0)
    try:
        api = ApiClient(nc)
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/24")
        listener = await Listener(nc, "n1").start()
        # registering another node publishes every node's snapshot at once
        first = await listener.live(lambda i: api.node_register(name=f"poke{i}"))
        listener.drain()

        start = time.monotonic()
        await api.nic_attach("br", "n1", "vm")
        while True:  # skip any snapshot still in flight from a poke
            arrived, snap = await listener.next(timeout=4.0)
            if snap.version > first.version:
                break
        assert arrived - start < 2.0, "a change must not wait for the 5 s heartbeat"
        assert len(snap.taps) == 1 and snap.bridges[0].name == naming.bridge_network_bridge("br")
    finally:
        await ctl.stop()


async def test_versions_grow_only_on_content_change(api, nc):
    await api.node_register(name="n1")
    await api.network_create("br", "bridge", "10.0.0.0/24")
    listener = await Listener(nc, "n1").start()
    v1 = await listener.live()

    async def settle() -> Snapshot:
        """The newest snapshot after a few heartbeats, all of which agree."""
        await asyncio.sleep(0.1)
        listener.drain()
        got = await listener.collect(0.5)
        assert len(got) >= 2 and len({(s.version, s.digest) for _, s in got}) == 1
        return got[-1][1]

    assert (await settle()).version == v1.version
    # other nodes' changes that do not touch n1's snapshot leave its version alone
    await api.node_register(name="n2")
    await api.nic_attach("br", "n2", "vm-on-n2")
    assert (await settle()).version == v1.version
    # a change of n1's content: one step up
    nic = await api.nic_attach("br", "n1", "vm")
    v2 = await settle()
    assert v2.version == v1.version + 1 and v2.digest != v1.digest
    # back to the old content: the version still only grows
    await api.nic_detach(nic.nic.id)
    v3 = await settle()
    assert v3.version == v2.version + 1 and v3.digest == v1.digest


async def test_publishing_stops_for_a_removed_node(api, nc):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    gone, stays = await Listener(nc, "n1").start(), await Listener(nc, "n2").start()
    await gone.live()
    await stays.live()
    await api.node_remove("n1")
    await asyncio.sleep(0.3)  # a heartbeat already on the wire may still land
    gone.drain()
    stays.drain()
    await asyncio.sleep(1.0)
    assert gone.drain() == []
    assert len(stays.drain()) >= 3  # the control: heartbeats go on for the others


async def test_acks_and_health_show_in_status(api, nc):
    await api.node_register(name="n1")
    desired = (await api.status()).nodes[0]
    v = desired.desired_version
    assert v >= 1 and desired.applied_version == 0 and not desired.converged

    ok = Ack(node="n1", version=v, applied_version=v, digest="d", changes=3, sent_at=time.time())
    await nc.publish(naming.ack_subject("n1"), encode(ok))
    st = await wait_status(api, "n1", lambda s: s.applied_version == v)
    assert st.converged and st.last_error is None and st.last_ack == ok and st.last_heard > 0
    assert (await api.status()).converged

    bad = Ack(node="n1", version=v + 1, applied_version=v, ok=False, error="netlink: boom")
    await nc.publish(naming.ack_subject("n1"), encode(bad))
    st = await wait_status(api, "n1", lambda s: s.last_error is not None)
    assert st.last_error == "netlink: boom" and not st.converged and st.applied_version == v
    assert not (await api.status()).converged

    await nc.publish(naming.ack_subject("n1"), encode(ok))
    st = await wait_status(api, "n1", lambda s: s.last_error is None)
    assert st.converged

    health = Health(node="n1", applied_version=v, ok=True, started_at=1.0, sent_at=time.time())
    await nc.publish(naming.health_subject("n1"), encode(health))
    st = await wait_status(api, "n1", lambda s: s.health is not None)
    assert st.health == health


async def test_ack_on_another_nodes_subject_is_ignored(api, nc):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    v1 = (await api.status()).nodes[0].desired_version
    foreign = Ack(node="n1", version=v1, applied_version=v1)
    marker = Ack(node="n2", version=0, applied_version=0, error="marker", ok=False)
    await nc.publish(naming.ack_subject("n1"), b"{not an ack")  # malformed: dropped
    await nc.publish(naming.ack_subject("n2"), encode(foreign))
    await nc.publish(naming.ack_subject("n2"), encode(marker))  # same subject, so after it
    await wait_status(api, "n2", lambda s: s.last_error == "marker")
    n1 = (await api.status()).nodes[0]
    assert n1.node.name == "n1" and n1.last_ack is None and n1.applied_version == 0
    assert not n1.converged


async def test_versions_continue_above_what_a_node_already_applied(api, nc):
    """A controller whose store was lost must not publish versions the agent calls stale."""
    await api.node_register(name="n1")
    listener = await Listener(nc, "n1").start()
    first = await listener.live()
    assert first.version < 500
    refused = Ack(
        node="n1", version=first.version, applied_version=500, ok=False, error="stale snapshot"
    )
    await nc.publish(naming.ack_subject("n1"), encode(refused))
    deadline = time.monotonic() + 5
    while (snap := (await listener.next())[1]).version <= 500:
        assert time.monotonic() < deadline, snap.version
    assert snap.version == 501 and snap.digest == first.digest  # same content, higher version
    await wait_status(api, "n1", lambda s: s.desired_version == 501)


async def test_an_oversized_snapshot_does_not_starve_other_nodes(tmp_path):
    server = NatsServer(tmp_path / "js", max_payload=4096)
    server.start()
    nc = await nats.connect(server.url)
    ctl = await start_controller(nc, heartbeat=0.2)
    try:
        api = ApiClient(nc)
        await api.node_register(name="big")  # published first, and too large once it has NICs
        await api.node_register(name="small")
        await api.network_create("lan", "bridge", "10.0.0.0/20")
        for i in range(60):
            await api.nic_attach("lan", "big", f"vm{i}")
        small = await Listener(nc, "small").start()
        await small.live()
        big = await Listener(nc, "big").start()
        got = await small.collect(1.0)
        assert len(got) >= 3  # the small node keeps its heartbeat
        assert big.drain() == []  # the big one's snapshot exceeds max_payload and is not sent
    finally:
        await ctl.stop()
        await nc.close()
        server.stop()
