"""lab.invariants: History checks every event; IntentLedger finds lost writes; PingProbe parses."""

import asyncio
from types import SimpleNamespace

import msgspec
import pytest

from agent.assemble import head_for
from lab.invariants import DeliveryOrder, History, IntentLedger
from schemas import naming
from schemas.codec import encode
from schemas.desired import Snapshot, Tap
from schemas.messages import Ack
from schemas.wire import SectionGet


def head(snap: Snapshot, attached: bool = True) -> bytes:
    """What the controller publishes: a HEAD, with the sections of its change attached or not
    (a heartbeat)."""
    h = head_for(snap)
    return encode(h if attached else msgspec.structs.replace(h, sections=()))


def ack(version, applied=None, digest=None, ok=True, node="n1"):
    applied = version if applied is None else applied
    return Ack(
        node=node, version=version, applied_version=applied, digest=digest or f"d{version}", ok=ok
    )


def test_a_clean_history_has_no_violation_and_counts_its_checks():
    h = History()
    for v in (1, 2, 3):
        h.published("n1", v, f"d{v}")
        h.acked("n1", ack(v))
    h.acked("n1", ack(3))  # a duplicated ack changes nothing
    h.assert_ok()
    assert h.checks == 2 * 3 + 4 * 3
    assert h.converged("n1")


def test_an_applied_version_going_down_is_a_violation_at_that_event():
    h = History()
    for v in (4, 5):
        h.published("n1", v, f"d{v}")
    h.acked("n1", ack(5))
    h.acked("n1", ack(4))  # applied an older snapshot after a newer one
    assert [v.invariant for v in h.violations] == ["monotonic"]
    assert h.violations[0].message == "n1: applied version went down from 5 to 4"
    assert h.violations[0].event == ack(4)
    with pytest.raises(AssertionError, match="1 invariant violation"):
        h.assert_ok()


def test_a_refused_older_snapshot_keeps_the_applied_version():
    h = History()
    for v in (4, 5):
        h.published("n1", v, f"d{v}")
    h.acked("n1", ack(5))
    h.acked("n1", ack(4, applied=5, ok=False))  # a reordered duplicate, refused: fine
    h.assert_ok()


def test_an_ack_of_a_version_never_published_for_that_node_is_a_violation():
    h = History(start={"n1": 2})
    h.published("n1", 3, "d3")
    h.published("n2", 9, "d9")
    h.acked("n1", ack(2))  # the version it started with: allowed
    h.acked("n1", ack(3))
    h.acked("n1", ack(9))  # n2's version
    assert [v.invariant for v in h.violations] == ["published", "published"]
    assert "ack version 9 was never published for n1" in h.violations[0].message
    assert "ack applied_version 9" in h.violations[1].message


def test_an_ok_ack_with_another_digest_and_a_republished_version_with_another_are_violations():
    h = History()
    h.published("n1", 1, "d1")
    h.acked("n1", ack(1, digest="other"))
    h.published("n1", 1, "changed")
    assert [v.invariant for v in h.violations] == ["digest", "published"]


def frame(subject, payload, direction="to_server", op="PUB", reply=None):
    return SimpleNamespace(identity="x", direction=direction, op=op, subject=subject,
                           reply=reply, payload=payload, fate="pass")  # fmt: skip


def test_observe_reads_the_proxys_frames_and_ignores_the_rest():
    h = History()
    snap = Snapshot(node="n1", version=3, digest="d3")

    h.observe(frame(naming.desired_subject("n1"), head(snap)))
    h.observe(frame(naming.desired_subject("n1"), head(snap), direction="to_client", op="MSG"))
    h.observe(frame(naming.health_subject("n1"), b"{}"))
    headers = b"NATS/1.0\r\nX: 1\r\n\r\n"
    h.observe(frame(naming.ack_subject("n1"), headers + encode(ack(3)), op="HPUB"))
    assert h.publications == {"n1": {3: "d3"}}
    assert h.acks == {"n1": [ack(3)]}
    h.assert_ok()
    h.observe(frame(naming.ack_subject("n1"), b"not json"))
    assert [v.invariant for v in h.violations] == ["decode"]


async def test_wait_converged_counts_heartbeats_and_fails_past_its_bound():
    h = History()
    h.published("n1", 1, "d1")
    h.published("n2", 1, "d1")
    h.acked("n1", ack(1))
    h.acked("n2", ack(1, node="n2"))
    assert await h.wait_converged(["n1", "n2"], within_heartbeats=2, heartbeat=0.1) == 0

    h.published("n1", 2, "d2")

    async def late_ack():
        await asyncio.sleep(0.25)
        h.acked("n1", ack(2))

    task = asyncio.create_task(late_ack())
    assert 3 <= await h.wait_converged(["n1", "n2"], within_heartbeats=6, heartbeat=0.1) <= 4
    await task

    h.published("n2", 2, "d2")
    h.acked("n2", ack(2, digest="stale", ok=False, applied=1, node="n2"))
    with pytest.raises(AssertionError, match="not converged within 2 heartbeats: n2"):
        await h.wait_converged(["n1", "n2"], within_heartbeats=2, heartbeat=0.05)
    assert h.violations[-1].invariant == "converged"


class FakeApi:
    def __init__(self, networks, nics):
        self.networks, self.nics = networks, nics

    async def network_list(self):
        return [SimpleNamespace(network=SimpleNamespace(name=n)) for n in self.networks]

    async def nic_list(self):
        return [
            SimpleNamespace(nic=SimpleNamespace(id=i, network=net, node=node))
            for i, (net, node) in self.nics.items()
        ]


async def test_the_ledger_names_each_acknowledged_write_the_intent_lost():
    ledger = IntentLedger()
    ledger.network_created("ov")
    ledger.network_created("tmp")
    ledger.network_deleted("tmp")
    ledger.network_created("gone")
    ledger.nic_attached("a" * 32, "ov", "n1")
    ledger.nic_attached("b" * 32, "ov", "n2")
    ledger.nic_attached("c" * 32, "ov", "n1")
    ledger.nic_detached("c" * 32)
    intact = FakeApi({"ov", "gone"}, {"a" * 32: ("ov", "n1"), "b" * 32: ("ov", "n2")})
    assert await ledger.verify(intact) == []
    broken = FakeApi({"ov", "tmp"}, {"a" * 32: ("ov", "n2"), "c" * 32: ("ov", "n1")})
    assert await ledger.verify(broken) == [
        "network gone: creation acknowledged, missing from intent",
        "network tmp: deletion acknowledged, still in intent",
        f"nic {'a' * 32}: attached to ov on n1, intent says ov on n2",
        f"nic {'b' * 32} (ov, n2): attach acknowledged, missing",
        f"nic {'c' * 32}: detach acknowledged, still attached",
    ]
    assert ledger.writes == 8


def test_published_versions_never_go_down_and_a_snapshot_names_its_subjects_node():
    h = History()
    h.published("n1", 5, "d5")
    h.published("n1", 5, "d5")  # the heartbeat's republication
    h.assert_ok()
    h.published("n1", 4, "d4")
    assert [v.invariant for v in h.violations] == ["monotonic"]
    h.observe(frame(naming.desired_subject("n2"), head(Snapshot(node="n1", version=9))))
    assert [v.invariant for v in h.violations] == ["monotonic", "subject"]


async def test_wait_acked_mac_returns_the_first_ack_of_the_version_that_carried_the_nic():
    h = History()
    tap = Tap(name="ot1", bridge="otb1", mtu=1390, mac="02:00:00:00:00:01", ip="10.0.0.5")
    h.acked("n1", ack(1, digest="d1"))  # before the NIC existed: never the answer
    for v, taps, attached in (
        (1, (), True),
        (2, (tap,), True),
        (2, (tap,), False),
        (3, (tap,), True),
    ):
        snap = Snapshot(node="n1", version=v, digest=f"d{v}", taps=taps)
        h.observe(frame(naming.desired_subject("n1"), head(snap, attached)))
    assert h.first_with_mac == {("n1", tap.mac): 2}
    h.acked("n1", ack(2, applied=1, ok=False))  # failed: not applied

    async def later():
        await asyncio.sleep(0.05)
        h.acked("n1", ack(3))

    task = asyncio.create_task(later())
    assert (await h.wait_acked_mac("n1", tap.mac, timeout=1)).applied_version == 3
    await task
    with pytest.raises(AssertionError, match="no ack of the version carrying"):
        await h.wait_acked_mac("n2", tap.mac, timeout=0.05)


def test_a_nic_is_also_found_in_a_fetched_node_section():
    """The change's HEAD never left (a controller killed before sending it): the tap reaches
    the node through section.get; its version is the first HEAD naming that node section."""
    h = History()
    tap = Tap(name="ot1", bridge="otb1", mtu=1390, mac="02:00:00:00:00:01", ip="10.0.0.5")
    whole = head_for(Snapshot(node="n1", version=4, digest="d4", taps=(tap,)))
    node_section = next(s for s in whole.sections if s.name == "node")
    bare = msgspec.structs.replace(whole, version=7, digest="d7", sections=())
    h.observe(frame(naming.desired_subject("n1"), encode(bare)))
    assert h.first_with_mac == {}
    get = naming.node_api_subject("section.get", "n1")
    h.observe(frame(get, encode(SectionGet(name="n1", section="node")), reply="_INBOX.k.1"))
    h.observe(frame("_INBOX.k.2", encode(node_section)))  # not a reply to a section.get
    assert h.first_with_mac == {}
    h.observe(frame("_INBOX.k.1", encode(node_section)))
    assert h.first_with_mac == {("n1", tap.mac): 7}
    h.assert_ok()


def test_delivery_order_counts_snapshots_delivered_after_a_newer_one():
    order = DeliveryOrder()
    for node, v in (("n1", 1), ("n1", 3), ("n2", 1), ("n1", 2), ("n1", 3), ("n1", 1)):
        payload = head(Snapshot(node=node, version=v), attached=False)
        order.observe(frame(naming.desired_subject(node), payload, "to_client", "MSG"))
    order.observe(frame(naming.desired_subject("n1"), head(Snapshot(node="n1", version=0))))
    assert order.delivered == {"n1": [1, 3, 2, 3, 1], "n2": [1]} and order.late == 2


async def test_the_ledger_does_not_judge_a_write_whose_outcome_is_unknown():
    ledger = IntentLedger()
    ledger.nic_attached("a" * 32, "ov", "n1")
    ledger.network_created("tmp")
    ledger.unknown("a" * 32)  # its detach timed out
    ledger.unknown("tmp")  # its delete timed out
    ledger.unknown("b" * 32)
    assert await ledger.verify(FakeApi(set(), {})) == []
    ledger.nic_detached("a" * 32)  # a later acknowledged write: known again
    after = await ledger.verify(FakeApi(set(), {"a" * 32: ("ov", "n1")}))
    assert after == [f"nic {'a' * 32}: detach acknowledged, still attached"]  # tmp: still unknown
