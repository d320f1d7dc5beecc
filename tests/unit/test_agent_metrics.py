"""agent.metrics without a kernel or a broker: refusal codes, outcomes counted through the agent,
netlink writes through the links kernel, bus bytes by kind, the scrape-time gauges, readiness.
The same figures over real HTTP from a real agent: tests/e2e/test_agent_metrics.py."""

import errno
import time

import msgspec
import pytest

from agent.assemble import head_for
from agent.links.applier import LinkApplier
from agent.metrics import (
    NO_METRICS,
    AgentMetrics,
    CountingBus,
    CountingLinks,
    bus_kind,
    handshake_ages,
    outcome,
    refusal_reason,
)
from agent.runner import Agent, AgentConfig
from agent.validate import Rejected, accept
from schemas import limits
from schemas.codec import encode
from schemas.messages import PeerHealth
from tests.unit.fake_kernel import FakeKernel
from tests.unit.test_hostile_snapshots import ASSEMBLED, as_head, untouchable_agent
from tests.unit.test_subsystems import AGENT_SNAP, TAP, FakeNats, FakeNft
from tests.unit.test_validate import GOOD

pytestmark = pytest.mark.timeout(30)


def value(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def refusal_of(data: bytes, applied_version: int = 0) -> str:
    with pytest.raises(Rejected) as e:
        accept(data, "n1", applied_version)
    return refusal_reason(str(e.value))


def test_every_refusal_the_gate_makes_has_its_own_stable_code():
    """Through agent.validate itself, so a reworded message that loses its code fails here."""
    data = encode(GOOD)
    assert refusal_of(data, applied_version=GOOD.version + 1) == "stale"
    assert refusal_of(encode(msgspec.structs.replace(GOOD, node="n2"))) == "wrong_node"
    assert refusal_of(data[:-1] + b',"schema":99}') == "schema"
    assert refusal_of(b" " * (limits.MAX_SNAPSHOT_BYTES + 1)) == "too_large"
    assert refusal_of(b'{"node": "n1", "version": "x"}') == "malformed"
    assert refusal_reason("something new") == "other"


async def test_hostile_snapshots_count_as_refusals_by_reason(tmp_path):
    expected = {"limits": 1, "malformed": 6, "content": len(ASSEMBLED) - 7}
    metrics = AgentMetrics()
    for data, _ in ASSEMBLED.values():
        agent = untouchable_agent(tmp_path)
        agent.nc.is_connected = False
        metrics.watch(agent)
        await agent.handle(as_head(agent, data))
    assert {
        reason: value(metrics, "otherix_agent_refusals_total", reason=reason) for reason in expected
    } == expected
    assert value(metrics, "otherix_agent_heads_total", outcome="refused") == len(ASSEMBLED)
    assert value(metrics, "otherix_agent_apply_duration_seconds_count") == len(ASSEMBLED)
    assert metrics.ready() == "not connected to NATS; no desired version applied yet"


def test_outcome_of_a_reconciled_head():
    assert outcome((4, "a"), (5, "b"), errors=0) == "applied"
    assert outcome((5, "b"), (5, "b"), errors=0) == "unchanged"
    assert outcome((5, "b"), (5, "c"), errors=0) == "applied"  # same version, new content
    assert outcome((4, "a"), (5, "b"), errors=2) == "failed"


async def test_heads_changes_and_netlink_writes_through_the_agent(tmp_path):
    metrics = AgentMetrics()
    kernel, nft = FakeKernel(), FakeNft()
    kernel.fail[("CreateTap", TAP)] = errno.EBUSY
    agent = Agent(FakeNats(), AgentConfig(node="n1", state_dir=tmp_path),
                  LinkApplier(CountingLinks(kernel, metrics)), nft)  # type: ignore[arg-type]  # fmt: skip
    agent.nc.is_connected = True
    metrics.watch(agent)
    head = encode(head_for(AGENT_SNAP))

    assert not (await agent.handle(head)).ok
    counts = {o: value(metrics, "otherix_agent_heads_total", outcome=o) for o in ("failed",)}
    assert counts == {"failed": 1} and metrics.ready() == "no desired version applied yet"
    assert value(metrics, "otherix_agent_changes_applied_total") == 1  # bridge and VXLAN made
    # the busy tap was sent and refused by the kernel; its master, learning and up were not sent
    assert value(metrics, "otherix_agent_netlink_writes_total") == kernel.writes + 1

    del kernel.fail[("CreateTap", TAP)]
    writes_before = kernel.writes
    ack = await agent.handle(head)
    assert ack.ok and ack.changes > 0 and metrics.ready() is None
    assert value(metrics, "otherix_agent_heads_total", outcome="applied") == 1
    assert value(metrics, "otherix_agent_changes_applied_total") == 2
    assert value(metrics, "otherix_agent_netlink_writes_total") == kernel.writes + 1
    assert kernel.writes > writes_before

    assert (await agent.handle(head)).changes == 0  # the no-op heartbeat
    assert value(metrics, "otherix_agent_heads_total", outcome="unchanged") == 1
    assert value(metrics, "otherix_agent_changes_applied_total") == 2
    assert value(metrics, "otherix_agent_netlink_writes_total") == kernel.writes + 1
    assert value(metrics, "otherix_agent_apply_duration_seconds_count") == 3

    metrics.refresh()
    assert value(metrics, "otherix_agent_applied_version") == AGENT_SNAP.version
    assert value(metrics, "otherix_agent_nft_rules") == nft.rule_count > 0
    assert value(metrics, "otherix_agent_connected") == 1


def test_handshake_ages_by_node_name_and_gone_peers_vanish():
    now = 1000.0
    peers = [
        PeerHealth(public_key="k2", node="n2", latest_handshake=990.0),
        PeerHealth(public_key="k3", node="n3"),  # never shaken hands with: no age
        PeerHealth(public_key="k4", node="", latest_handshake=999.0),  # unknown node: no label
    ]
    assert handshake_ages(peers, now) == {"n2": 10.0}

    metrics = AgentMetrics()
    metrics.watch(untouchable_agent_with_nft())
    metrics.peers_read(peers)
    metrics.refresh()
    assert value(metrics, "otherix_agent_wireguard_peers") == 3
    assert value(metrics, "otherix_agent_wireguard_handshake_age_seconds", peer="n2") > 0
    metrics.peers_read(peers[1:])
    metrics.refresh()
    assert value(metrics, "otherix_agent_wireguard_handshake_age_seconds", peer="n2") is None


def untouchable_agent_with_nft():
    """Enough of an agent for ``refresh``: a connection, an applied version, nft's rule count."""

    class Seen:
        nc = type("Nc", (), {"is_connected": False})()
        applied = type("Applied", (), {"version": 7})()
        nft = FakeNft()

    return Seen()


class Bus:
    is_connected = True

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"", **kwargs) -> None:
        self.sent.append((subject, payload))

    async def request(self, subject: str, payload: bytes = b"", **kwargs) -> str:
        self.sent.append((subject, payload))
        return "answer"


async def test_bus_bytes_by_kind():
    assert bus_kind("otherix.v1.ack.n1", "n1") == "ack"
    assert bus_kind("otherix.v1.health.n1", "n1") == "health"
    assert bus_kind("otherix.v1.api.section.get", "n1") == "request"
    metrics = AgentMetrics()
    bus = CountingBus(Bus(), "n1", metrics)
    await bus.publish("otherix.v1.ack.n1", b"12345")
    await bus.publish("otherix.v1.health.n1", b"123")
    assert await bus.request("otherix.v1.api.section.get", b"12") == "answer"
    assert bus.is_connected and len(bus.sent) == 3  # the client's own attributes pass through
    sent = {k: value(metrics, "otherix_agent_bus_published_bytes_total", kind=k) for k in ("ack", "health", "request")}  # fmt: skip
    assert sent == {"ack": 5, "health": 3, "request": 2}


def test_an_agent_without_metrics_counts_nothing(tmp_path):
    """The default: hooks that do nothing, shared, with no registry (tests, the hollow bench)."""
    agent = untouchable_agent(tmp_path)
    assert agent.metrics is NO_METRICS and not hasattr(agent.metrics, "registry")


def test_a_large_mesh_exports_only_its_oldest_handshakes_and_the_aggregates():
    """Per-peer series are capped (nodes² across a fleet otherwise): the oldest handshakes keep
    theirs, and the maximum age and the peers never shaken hands with cover the rest."""
    now = time.time()
    peers = [
        PeerHealth(public_key=f"k{i}", node=f"n{i}", latest_handshake=now - i) for i in range(1, 11)
    ] + [PeerHealth(public_key="k0", node="n0")]
    metrics = AgentMetrics(peer_series=3)
    metrics.watch(untouchable_agent_with_nft())
    metrics.peers_read(peers)
    metrics.refresh()
    labelled = {
        s.labels["peer"]
        for m in metrics.registry.collect()
        if m.name == "otherix_agent_wireguard_handshake_age_seconds"
        for s in m.samples
    }
    assert labelled == {"n10", "n9", "n8"}
    assert value(metrics, "otherix_agent_wireguard_handshake_age_max_seconds") >= 10
    assert value(metrics, "otherix_agent_wireguard_peers_without_handshake") == 1
    assert value(metrics, "otherix_agent_wireguard_peers") == 11
    everyone = AgentMetrics()  # the default: a whole small mesh, every peer
    everyone.watch(untouchable_agent_with_nft())
    everyone.peers_read(peers)
    everyone.refresh()
    assert value(everyone, "otherix_agent_wireguard_handshake_age_seconds", peer="n1") is not None
