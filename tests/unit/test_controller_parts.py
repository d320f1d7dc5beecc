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
from schemas import api, naming
from schemas.codec import decode, encode
from schemas.intent import Intent, NodeVersion
from schemas.messages import Ack, Health, PeerHealth
from tests.unit.factories import bridge_net, nic, node


class MemoryStore:
    """Records every write; the publisher's only store calls are put."""

    def __init__(self):
        self.writes: list[NodeVersion] = []

    async def put(self, obj):
        self.writes.append(obj)


def publisher(it: Intent) -> tuple[Publisher, MemoryStore]:
    store = MemoryStore()
    return Publisher(None, store, ClusterConfig(), it, asyncio.Lock(), clock=lambda: 1.0), store


def cluster() -> Intent:
    return Intent(networks={"lan": bridge_net()}, nodes={"n1": node("n1", False)})


async def test_pending_version_is_computed_in_memory_and_persisted_once():
    it = cluster()
    pub, store = publisher(it)
    assert pub.desired("n1").version == 1 and store.writes == []
    await pub._restamp()
    assert [(v.node, v.version) for v in store.writes] == [("n1", 1)]

    it.nics["a"] = nic(1, "lan", "n1")
    pub.wake()
    for _ in range(3):
        assert pub.desired("n1").version == 2
    assert len(store.writes) == 1  # reads wrote nothing
    await pub._restamp()
    assert [v.version for v in store.writes] == [1, 2] and pub.versions["n1"].version == 2


async def test_unchanged_content_is_not_written_again():
    pub, store = publisher(cluster())
    await pub._restamp()
    pub.wake()  # woken without a content change
    await pub._restamp()
    assert len(store.writes) == 1 and pub.desired("n1").version == 1


async def test_a_failed_write_leaves_the_change_pending():
    pub, store = publisher(cluster())

    async def broken(obj):
        raise ConnectionError("store down")

    store.put = broken
    try:
        await pub._restamp()
    except ConnectionError:
        pass
    assert pub._dirty and pub.desired("n1").version == 1 and pub.versions == {}


async def test_continuing_above_a_node_is_pending_until_restamped():
    pub, store = publisher(cluster())
    await pub._restamp()
    pub.continue_above("n1", 500)
    assert pub.desired("n1").version == 501 and len(store.writes) == 1
    pub.continue_above("n1", 3)  # behind us: nothing to do
    await pub._restamp()
    assert store.writes[-1].version == 501


def msg(subject: str, value) -> SimpleNamespace:
    return SimpleNamespace(subject=subject, data=encode(value))


async def test_acks_count_only_a_registered_nodes_own():
    it = cluster()
    pub, _ = publisher(it)
    await pub._restamp()  # version 1 is published to n1
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
    await pub._restamp()
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
    await pub._restamp()
    good = dict(pub._encoded)
    # a damaged record: a VNI whose device name cannot exist, on a NIC of n1 only
    it.networks["bad"] = msgspec.structs.replace(bridge_net("bad"), type="overlay", vni=10**13)
    it.nodes["n1"] = node("n1", True)
    it.nics["x"] = nic(1, "bad", "n1")
    it.nics["y"] = nic(2, "lan", "n2")
    pub.wake()
    await pub._restamp()
    assert pub._encoded["n1"] == good["n1"]  # n1 keeps its last good snapshot
    assert pub._encoded["n2"] != good["n2"] and pub.desired("n2").version == 2


async def test_a_failed_write_for_one_node_does_not_stop_the_others():
    it = cluster()
    it.nodes["n2"] = node("n2", False)
    pub, store = publisher(it)
    put = store.put

    async def flaky(obj):
        if obj.node == "n1":
            raise ConnectionError("store down for n1")
        await put(obj)

    store.put = flaky
    await pub._restamp()
    assert set(pub._encoded) == {"n2"} and pub._dirty  # n1 is retried next heartbeat
    store.put = put
    await pub._restamp()
    assert set(pub._encoded) == {"n1", "n2"}


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
