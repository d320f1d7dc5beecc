"""The controller's parts without a broker: the publisher's stamping against an in-memory store,
ack filtering, and the API's endpoint table."""

import asyncio
from types import SimpleNamespace

import msgspec

from controller.acks import Acks
from controller.api import Api
from controller.compute import ClusterConfig
from controller.publisher import Publisher
from controller.tracker import Tracker
from controller.versions import BLOCK
from schemas import api, naming
from schemas.codec import decode, encode
from schemas.intent import Generation, Intent, NodeVersions
from schemas.messages import Ack, Health, PeerHealth
from schemas.wire import Head
from tests.unit.factories import bridge_net, nic, node


class MemoryStore:
    """Records every write of the versions' mark (``marks``) and of the nodes' versions
    (``saved``); the publisher's only store calls are put."""

    def __init__(self):
        self.writes: list[Generation] = []
        self.saved: list[NodeVersions] = []

    async def put(self, obj):
        (self.saved if isinstance(obj, NodeVersions) else self.writes).append(obj)


class Bus:
    """What the publisher needs of a NATS client: max_payload and publish (recorded)."""

    max_payload = 1024 * 1024

    def __init__(self):
        self.sent: list[tuple[str, Head]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, decode(data, Head)))

    def take(self) -> dict[str, Head]:
        out = {subject.rsplit(".", 1)[-1]: head for subject, head in self.sent}
        self.sent.clear()
        return out


def publisher(it: Intent) -> tuple[Publisher, MemoryStore]:
    store = MemoryStore()
    pub = Publisher(Bus(), store, ClusterConfig(), it, asyncio.Lock(), clock=lambda: 1.0)
    return pub, store


def cluster() -> Intent:
    return Intent(networks={"lan": bridge_net()}, nodes={"n1": node("n1", False)})


async def test_pending_version_is_computed_in_memory_and_the_mark_written_once_per_block():
    it = cluster()
    pub, store = publisher(it)
    assert pub.desired("n1").version == 1 and store.writes == []
    await pub.publish_all()
    assert store.writes == [Generation(reserved=1 + BLOCK)]
    assert pub.nc.take()["n1"].version == 1

    it.nics["a"] = nic(1, "lan", "n1")
    pub.wake(("nic", "a"))
    for _ in range(3):
        assert pub.desired("n1").version == 2
    await pub.publish_all()
    sent = pub.nc.take()
    assert sent["n1"].version == 2 and [s.name for s in sent["n1"].sections] == ["node"]
    assert len(store.writes) == 1 and pub.versions["n1"].version == 2  # still in the block


async def test_unchanged_content_keeps_its_version():
    pub, store = publisher(cluster())
    await pub.publish_all()
    pub.wake()  # woken without a content change
    await pub.publish_all()
    assert len(store.writes) == 1 and pub.desired("n1").version == 1


async def test_a_change_is_sent_only_to_the_nodes_it_affects_until_the_heartbeat():
    it = cluster()
    it.nodes["n2"] = node("n2", False)
    pub, _ = publisher(it)
    await pub.publish_all()  # the first heartbeat: everyone
    assert set(pub.nc.take()) == {"n1", "n2"}
    it.nics["a"] = nic(1, "lan", "n1")
    pub.wake(("nic", "a"))
    await pub.publish_all()
    assert set(pub.nc.take()) == {"n1"}
    sent = await whole_heartbeat(pub)  # every HEAD, refs only
    assert set(sent) == {"n1", "n2"} and all(h.sections == () for h in sent.values())


async def whole_heartbeat(pub: Publisher) -> dict[str, Head]:
    """Every tick of one heartbeat interval, each one due (``Publisher.ticks``)."""
    sent = {}
    for _ in range(pub.ticks):
        pub._next_heartbeat = 0.0  # the next tick is due
        await pub.publish_all()
        sent.update(pub.nc.take())
    return sent


async def test_unchanged_heads_are_spread_over_the_heartbeat_and_changes_go_at_once():
    """100 agents on one machine all doing their heartbeat work at once delayed any change
    that arrived then; so each tick sends its share of the nodes' HEADs, every node's once per
    interval, while a change still goes to every node it affects on the tick it is made."""
    it = cluster()
    names = [f"n{i}" for i in range(1, 101)]
    it.nodes.update({n: node(n, False) for n in names})
    pub, _ = publisher(it)
    await pub.publish_all()  # the first HEADs: everyone, at once
    assert set(pub.nc.take()) == set(names)
    assert pub.ticks == 10
    for _ in range(2):
        seen: list[str] = []
        for _ in range(pub.ticks):
            pub._next_heartbeat = 0.0
            await pub.publish_all()
            sent = list(pub.nc.take())
            assert len(sent) == 10  # 100 nodes over 10 ticks, dealt in turn
            seen += sent
        assert sorted(seen) == sorted(names)  # each exactly once per interval
    it.nics["a"] = nic(1, "lan", "n7")
    it.nics["b"] = nic(2, "lan", "n8")
    pub.wake(("nic", "a"), ("nic", "b"))
    await pub.publish_all()  # no tick due: the change alone, at once
    assert set(pub.nc.take()) == {"n7", "n8"}


async def test_a_node_that_comes_mid_interval_gets_a_heartbeat_within_one_interval():
    """Each tick sends only its own nodes (not a scan of every node: at 5,000 nodes that scan,
    ten times a second, was most of the controller's heartbeat CPU); a node registered between
    ticks is dealt to a tick at once, so after its first HEAD (sent at once, with its content)
    it gets an unchanged one within one interval, and once per interval after; a node removed
    gets nothing more."""
    it = cluster()
    names = [f"n{i}" for i in range(1, 101)]
    it.nodes.update({n: node(n, False) for n in names})
    pub, _ = publisher(it)
    await pub.publish_all()
    pub.nc.take()
    for _ in range(4):  # into the interval
        pub._next_heartbeat = 0.0
        await pub.publish_all()
    pub.nc.take()
    it.nodes["late"] = node("late", False)
    del it.nodes["n5"]
    pub.wake(("node", "late"), ("node", "n5"))
    await pub.publish_all()  # no tick due: the newcomer's first HEAD, at once
    assert "late" in pub.nc.take()
    wait = (pub._ticks_of["late"] - pub._tick) % pub.ticks  # its tick, in this interval
    ticks: list[list[str]] = []
    for _ in range(2 * pub.ticks):
        pub._next_heartbeat = 0.0
        await pub.publish_all()
        ticks.append(list(pub.nc.take()))
    assert [i for i, sent in enumerate(ticks[: pub.ticks]) if "late" in sent] == [wait]
    assert sum("late" in sent for sent in ticks[-pub.ticks :]) == 1  # then once per interval
    assert not any("n5" in sent for sent in ticks)


async def test_nodes_that_come_and_go_stay_spread_over_the_ticks():
    """A node replaced by another, thirty times (hardware swapped one machine at a time): each
    newcomer is dealt a tick of its own turn, so no tick gathers them all (review20: numbered by
    the count of nodes, every newcomer took the number the last one left free, tick 9: ~37 HEADs
    while the others had 7)."""
    it = cluster()
    del it.nodes["n1"]
    it.nodes.update({f"n{i}": node(f"n{i}", False) for i in range(100)})
    pub, _ = publisher(it)
    await pub.publish_all()
    pub.nc.take()
    for i in range(30):
        del it.nodes[f"n{i}"]
        it.nodes[f"m{i}"] = node(f"m{i}", False)
        pub.wake()
        pub._next_heartbeat = float("inf")  # no tick: the change alone
        await pub.publish_all()
        assert set(pub.nc.take()) == {f"m{i}"}
    while pub._tick != 0:  # to the start of an interval
        pub._next_heartbeat = 0.0
        await pub.publish_all()
    pub.nc.take()
    sizes = []
    for _ in range(pub.ticks):
        pub._next_heartbeat = 0.0
        await pub.publish_all()
        sizes.append(len(pub.nc.take()))
    assert sum(sizes) == 100 and max(sizes) <= 13, sizes


async def test_a_heartbeat_is_metered_once_per_interval_however_it_is_cut():
    """``otherix_controller_heartbeat_duration_seconds`` is one heartbeat's publish work (every
    node's HEAD) and its overruns heartbeats longer than the interval (README): ten ticks of a
    tenth of the nodes each are one heartbeat, not ten of a tenth of the work each (review20)."""
    it = cluster()
    it.nodes.update({f"n{i}": node(f"n{i}", False) for i in range(2, 101)})
    pub, _ = publisher(it)
    count = "otherix_controller_heartbeat_duration_seconds_count"
    await pub.publish_all()  # tick 0 of the first interval
    assert pub.ticks == 10
    for _ in range(2 * pub.ticks - 1):  # to the end of the second interval
        pub._next_heartbeat = 0.0
        await pub.publish_all()
    assert pub.metrics.registry.get_sample_value(count) == 2


async def test_a_small_cluster_is_not_cut_into_ticks():
    """Each tick wakes the controller (~0.25 ms of CPU here): fewer than ``NODES_PER_TICK``
    nodes per tick are not worth it, so a few nodes get their HEADs together, once per interval."""
    it = cluster()
    it.nodes["n2"] = node("n2", False)
    pub, _ = publisher(it)
    await pub.publish_all()
    assert pub.ticks == 1
    pub.nc.take()
    pub._next_heartbeat = 0.0
    await pub.publish_all()
    assert set(pub.nc.take()) == {"n1", "n2"}


async def test_no_version_above_the_persisted_mark_is_ever_sent():
    pub, store = publisher(cluster())

    async def broken(obj):
        raise ConnectionError("store down")

    store.put = broken
    await pub.publish_all()
    assert pub.nc.take() == {} and pub.desired("n1").version == 1
    del store.put
    await pub.publish_all()
    assert pub.nc.take()["n1"].version == 1 and store.writes == [Generation(reserved=1 + BLOCK)]


async def test_continuing_above_a_node_moves_the_mark_only_past_the_block():
    pub, store = publisher(cluster())
    await pub.publish_all()
    pub.continue_above("n1", 500)
    assert pub.desired("n1").version == 501
    pub.continue_above("n1", 3)  # behind us: nothing to do
    await pub.publish_all()
    assert pub.nc.take()["n1"].version == 501 and len(store.writes) == 1
    pub.continue_above("n1", 5000)
    await pub.publish_all()
    assert pub.nc.take()["n1"].version == 5001
    assert store.writes[-1] == Generation(reserved=5001 + BLOCK)


async def test_a_restarted_publisher_keeps_the_versions_of_unchanged_nodes():
    it = cluster()
    it.nodes["n2"] = node("n2", False)
    pub, store = publisher(it)
    it.nics["a"] = nic(1, "lan", "n1")
    pub.wake()
    await pub.publish_all()
    before = {n: pub.versions[n].version for n in ("n1", "n2")}
    await pub.close()  # a clean stop: the versions are saved as final
    assert store.saved[-1] == NodeVersions(
        nodes={n: (v.version, v.digest) for n, v in pub.versions.items()}, final=True
    )
    # a restart: same intent except n2 gained a NIC while the controller was down
    it.nics["b"] = nic(2, "lan", "n2")
    again, again_store = publisher(it)
    again.start_from(store.writes[-1].reserved, {}, store.saved[-1])
    await again.publish_all()
    assert again.versions["n1"].version == before["n1"]  # same content, same version
    assert again.versions["n2"].version > store.writes[-1].reserved  # changed: above the mark
    # before its first HEAD the record stopped being final: a crash of the restarted publisher
    # from here on must not hand the next one these versions as exact
    assert again_store.saved[0] == NodeVersions(nodes=store.saved[-1].nodes, final=False)


async def test_a_publisher_restarted_after_a_crash_never_goes_back():
    """A crash saves nothing: the record on file may be a second old, and the node's content may
    have changed and changed back since. Its versions are not reused."""
    it = cluster()
    pub, store = publisher(it)
    pub.wake()
    await pub.publish_all()  # saved (not final): n1 at its first version
    saved, first = store.saved[-1], pub.nc.take()["n1"].version
    it.nics["a"] = nic(1, "lan", "n1")
    pub.wake()
    await pub.publish_all()  # within SAVE_EVERY: not saved
    del it.nics["a"]
    pub.wake()
    await pub.publish_all()  # the content is back to what was saved
    sent = pub.nc.take()["n1"].version
    assert store.saved[-1] == saved and not saved.final and sent > first
    again, _ = publisher(it)  # SIGKILL, restart: no close(), so no final save
    again.start_from(store.writes[-1].reserved, {}, saved)
    await again.publish_all()
    assert again.nc.take()["n1"].version > sent


def msg(subject: str, value) -> SimpleNamespace:
    return SimpleNamespace(subject=subject, data=encode(value))


async def test_acks_count_only_a_registered_nodes_own():
    it = cluster()
    pub, _ = publisher(it)
    await pub.publish_all()  # version 1 is published to n1
    tracker = Tracker()
    acks = Acks(it, tracker, pub, clock=lambda: 2.0)
    ok = Ack(node="n1", version=1, applied_version=1)
    await acks.on_ack(msg(naming.ack_subject("n2"), ok))  # on another node's subject
    stranger = Ack(node="n9", version=1, applied_version=1)
    await acks.on_ack(msg(naming.ack_subject("n9"), stranger))  # not registered
    await acks.on_ack(SimpleNamespace(subject=naming.ack_subject("n1"), data=b"{nope"))
    assert tracker.nodes == {}
    assert acks.refused == {"wrong subject": 1, "malformed": 1}
    await acks.on_ack(msg(naming.ack_subject("n1"), ok))
    assert tracker.nodes["n1"].last_ack == ok and tracker.nodes["n1"].last_heard == 2.0


async def test_an_ack_of_a_version_never_published_is_refused_and_counted():
    it = cluster()
    pub, _ = publisher(it)
    await pub.publish_all()
    tracker = Tracker()
    acks = Acks(it, tracker, pub, clock=lambda: 2.0)
    forged = Ack(node="n1", version=2, applied_version=2, digest=pub.versions["n1"].digest)
    await acks.on_ack(msg(naming.ack_subject("n1"), forged))
    assert tracker.nodes == {} and acks.refused == {"unpublished version": 1}
    assert pub.desired("n1").version == 1  # and no continuation above it
    real = Ack(node="n1", version=1, applied_version=1, digest=pub.versions["n1"].digest)
    await acks.on_ack(msg(naming.ack_subject("n1"), real))
    assert tracker.nodes["n1"].last_ack == real


async def test_a_node_that_cannot_be_computed_does_not_stop_the_others():
    it = cluster()
    it.nodes["n2"] = node("n2", False)
    pub, store = publisher(it)
    await pub.publish_all()
    good = dict(pub._encoded)
    # a damaged record: a VNI whose device name cannot exist, on a NIC of n1 only
    it.networks["bad"] = msgspec.structs.replace(bridge_net("bad"), type="overlay", vni=10**13)
    it.nodes["n1"] = node("n1", True)
    it.nics["x"] = nic(1, "bad", "n1")
    it.nics["y"] = nic(2, "lan", "n2")
    pub.wake()
    await pub.publish_all()
    assert pub._encoded["n1"] == good["n1"]  # n1 keeps its last good state
    assert pub._encoded["n2"] != good["n2"] and pub.desired("n2").version == 2


def test_endpoint_table_is_the_published_list():
    it = cluster()
    pub, store = publisher(it)
    table = Api(store, ClusterConfig(), it, Tracker(), pub, asyncio.Lock(), clock=lambda: 0.0)
    assert set(table.table()) == set(api.ENDPOINTS)


async def test_a_node_too_large_for_a_page_is_listed_without_its_peer_list():
    it = cluster()
    it.nodes["n2"] = node("n2", False)
    pub, store = publisher(it)
    tracker = Tracker()
    peers = tuple(PeerHealth(public_key=f"key-{i}", node=f"peer-{i}") for i in range(400))
    health = Health(node="n1", applied_version=1, ok=True, started_at=0, sent_at=0, peers=peers)
    tracker.record_health(health, now=0.0)
    table = Api(store, ClusterConfig(), it, tracker, pub, asyncio.Lock(), clock=lambda: 0.0)
    table.max_payload = 16 * 1024  # one node's health report alone is about 20 KB
    page = decode(encode(await table.node_list(api.Page())), api.NodePage)
    assert [s.node.name for s in page.items] == ["n1", "n2"] and page.next is None
    assert page.items[0].health.peers == () and page.items[0].health.ok
    assert len(encode(page)) < table.max_payload
    status = decode(encode(await table.status(api.Page())), api.Status)
    assert status.nodes == page.items
    table.max_payload = 1024 * 1024  # room enough: the whole report
    (whole,) = decode(encode(await table.node_list(api.Page(limit=1))), api.NodePage).items
    assert len(whole.health.peers) == 400
