"""The agent's Prometheus metrics and its /readyz answer, in the process's own registry.

Counters move where things happen, through one-line hooks: the runner reports each HEAD's
outcome (``head_started`` … ``reconciled`` / ``refused`` / ``head_done``) and the WireGuard peers
its health report read; ``CountingLinks`` wraps the links kernel (the one path every link,
address and FDB write takes) and ``CountingBus`` the NATS client (acks, health, API requests).
Gauges that are states, not events (applied version, nft rules, connection, handshake ages), are
read from the agent at each scrape (``refresh``). An Agent without metrics has ``NO_METRICS``,
whose hooks do nothing, so tests and the hollow-agent bench run unchanged.

It only counts and reads: it never writes to the kernel or the bus, and never decides anything.
"""

import heapq
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.errors import ApplyError, ApplyResult
from agent.links.model import Link, LinkPlan, Observed
from schemas import naming

OUTCOMES = ("unchanged", "applied", "refused", "incomplete", "failed")
BUS_KINDS = ("ack", "health", "request")
# a refusal's message → a short code that stays stable while the wording evolves;
# the first matching prefix wins (agent.validate writes these messages)
REFUSALS = (
    ("snapshot of ", "too_large"),
    ("malformed snapshot", "malformed"),
    ("snapshot schema ", "schema"),
    ("snapshot is for node ", "wrong_node"),
    ("stale snapshot", "stale"),
)
REFUSAL_REASONS = ("too_large", "malformed", "schema", "wrong_node", "stale", "limits", "content")
# a no-op heartbeat takes well under a millisecond, a cold apply of a large snapshot seconds
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def refusal_reason(message: str) -> str:
    """The stable code of a refusal (``agent.validate.Rejected``'s message)."""
    for prefix, code in REFUSALS:
        if message.startswith(prefix):
            return code
    if message.startswith("invalid snapshot version "):  # check_snapshot: caps, then content
        return "limits" if "entries, more than the limit of" in message else "content"
    return "other"


def outcome(applied: tuple[int, str | None], snap: tuple[int, str | None], errors: int) -> str:
    """A reconciled HEAD's outcome: failed, applied (a version or digest not held before) or
    unchanged. ``applied`` and ``snap``: (version, digest) before this apply and of the snapshot."""
    if errors:
        return "failed"
    return "unchanged" if applied == snap else "applied"


def bus_kind(subject: str, node: str) -> str:
    """What a published message is, by its subject: ack, health, or a request (the API)."""
    if subject == naming.ack_subject(node):
        return "ack"
    return "health" if subject == naming.health_subject(node) else "request"


def handshake_ages(peers: Iterable[Any], now: float) -> dict[str, float]:
    """Node name → seconds since its peer's latest handshake; peers never shaken hands with (or
    whose node is not known) are left out."""
    return {
        p.node: max(now - p.latest_handshake, 0.0)
        for p in peers
        if p.node and p.latest_handshake > 0
    }


PEER_SERIES = 256  # per-peer handshake series by default: a whole mesh up to this size


def worst_ages(ages: dict[str, float], limit: int) -> dict[str, float]:
    """The ``limit`` peers with the oldest handshakes (all of them when there are no more):
    per-peer series would be nodes² across a large fleet, and the stale peers are the ones an
    operator looks for."""
    if len(ages) <= limit:
        return ages
    return dict(heapq.nlargest(limit, ages.items(), key=lambda kv: kv[1]))


def netlink_requests(result: ApplyResult[Any]) -> int:
    """Write requests one executed plan sent: the writes made, plus those the kernel refused
    (an error with an errno; a foreign device or a bad value is refused before sending)."""
    return result.writes + sum(e.errno is not None for e in result.errors)


class NoMetrics:
    """The hooks, doing nothing: an Agent's default."""

    def head_started(self) -> None:
        pass

    def head_done(self, outcome: str, changes: int = 0) -> None:
        pass

    def refused(self, error: Exception) -> None:
        pass

    def reconciled(self, snap: Any, applied: Any, changes: int, errors: list[ApplyError]) -> None:
        pass

    def peers_read(self, peers: Iterable[Any]) -> None:
        pass


NO_METRICS = NoMetrics()


class AgentMetrics(NoMetrics):
    def __init__(self, peer_series: int = PEER_SERIES) -> None:
        self.peer_series = peer_series  # at most this many handshake-age series (the oldest)
        self.registry = r = CollectorRegistry()
        self.apply_duration = Histogram(
            "otherix_agent_apply_duration_seconds", "one HEAD handled to its ack (applied or refused)",
            buckets=APPLY_BUCKETS, registry=r,
        )  # fmt: skip
        self.heads = Counter("otherix_agent_heads", "HEADs handled, by outcome", ["outcome"], registry=r)  # fmt: skip
        self.changes_applied = Counter(
            "otherix_agent_changes_applied", "applies that wrote to the kernel", registry=r
        )
        self.refusals = Counter(
            "otherix_agent_refusals", "snapshots refused, by reason", ["reason"], registry=r
        )
        self.netlink_writes = Counter(
            "otherix_agent_netlink_writes", "netlink write requests sent (links, addresses, FDB)",
            registry=r,
        )  # fmt: skip
        self.nft_rules = Gauge(
            "otherix_agent_nft_rules", "rules in the agent's nft tables as last applied", registry=r
        )
        self.wireguard_peers = Gauge(
            "otherix_agent_wireguard_peers", "peers on otwg0 as last read", registry=r
        )
        self.handshake_age = Gauge(
            "otherix_agent_wireguard_handshake_age_seconds",
            "seconds since the latest handshake with a peer (node name); absent before the first",
            ["peer"], registry=r,
        )  # fmt: skip
        self.handshake_age_max = Gauge(
            "otherix_agent_wireguard_handshake_age_max_seconds",
            "seconds since the oldest latest-handshake among the peers that have had one",
            registry=r,
        )
        self.peers_without_handshake = Gauge(
            "otherix_agent_wireguard_peers_without_handshake",
            "peers on otwg0 never shaken hands with since wireguard started",
            registry=r,
        )
        self.applied_version = Gauge(
            "otherix_agent_applied_version",
            "desired-state version the data plane holds",
            registry=r,
        )
        self.bus_bytes = Counter(
            "otherix_agent_bus_published_bytes", "payload bytes published, by kind", ["kind"],
            registry=r,
        )  # fmt: skip
        self.connected = Gauge("otherix_agent_connected", "1 while connected to NATS", registry=r)
        for name in OUTCOMES:  # every series from the start: a rate needs its zero
            self.heads.labels(name)
        for name in REFUSAL_REASONS:
            self.refusals.labels(name)
        for name in BUS_KINDS:
            self.bus_bytes.labels(name)
        self.agent: Any = None  # set by ``watch``: what the gauges and readiness read
        self.applies = 0  # HEADs applied (or unchanged) since start: readiness
        self._started: float | None = None
        # the HEAD begun last is counted: a later head_done (the worker's "failed" for a crash
        # after the count) adds nothing. None: hooks called without head_started (tests).
        self._counted: bool | None = None
        self._peers: tuple[Any, ...] = ()

    def watch(self, agent: Any) -> None:
        """Read gauges and readiness from ``agent`` (an ``agent.runner.Agent``) from now on."""
        self.agent = agent
        agent.metrics = self

    # --- hooks (agent.runner) ----------------------------------------------------------------

    def head_started(self) -> None:
        self._started, self._counted = time.perf_counter(), False

    def head_done(self, outcome: str, changes: int = 0) -> None:
        if self._counted:
            return
        if self._counted is not None:  # False: this is the HEAD's first outcome
            self._counted = True
        self.heads.labels(outcome).inc()
        if changes:
            self.changes_applied.inc()
        if outcome in ("applied", "unchanged"):
            self.applies += 1
        if self._started is not None:  # None: an apply not started by a HEAD (tests)
            self.apply_duration.observe(time.perf_counter() - self._started)
            self._started = None

    def refused(self, error: Exception) -> None:
        self.refusals.labels(refusal_reason(str(error))).inc()
        self.head_done("refused")

    def reconciled(self, snap: Any, applied: Any, changes: int, errors: list[ApplyError]) -> None:
        """Called before the applied state moves to ``snap``."""
        before = (applied.version, applied.digest)
        self.head_done(outcome(before, (snap.version, snap.digest), len(errors)), changes)

    def peers_read(self, peers: Iterable[Any]) -> None:
        self._peers = tuple(peers)

    # --- scrape and probes -------------------------------------------------------------------

    def refresh(self) -> None:
        """Before each scrape: the gauges that are states, read from the agent now."""
        agent = self.agent
        self.connected.set(bool(agent is not None and agent.nc.is_connected))
        if agent is None:
            return
        self.applied_version.set(agent.applied.version)
        self.nft_rules.set(getattr(agent.nft, "rule_count", 0))
        self.wireguard_peers.set(len(self._peers))
        ages = handshake_ages(self._peers, time.time())
        self.handshake_age_max.set(max(ages.values(), default=0.0))
        self.peers_without_handshake.set(sum(p.latest_handshake <= 0 for p in self._peers))
        self.handshake_age.clear()  # a peer that went has no series any more
        for peer, age in worst_ages(ages, self.peer_series).items():
            self.handshake_age.labels(peer).set(age)

    def ready(self) -> str | None:
        """/readyz: connected to NATS and a desired version applied since start; else what is
        missing."""
        missing = []
        if self.agent is None or not self.agent.nc.is_connected:
            missing.append("not connected to NATS")
        if not self.applies:
            missing.append("no desired version applied yet")
        return "; ".join(missing) or None


class CountingLinks:
    """The links kernel (``agent.links.netlink.NetlinkLinks``), counting the netlink write
    requests of every plan it executes; reads pass through."""

    def __init__(self, kernel: Any, metrics: AgentMetrics):
        self.kernel, self.metrics = kernel, metrics

    async def observe(self) -> Observed:
        return await self.kernel.observe()

    async def observe_link(self, name: str) -> Link | None:
        return await self.kernel.observe_link(name)

    async def execute(self, plan: LinkPlan) -> ApplyResult[frozenset[str]]:
        result = await self.kernel.execute(plan)
        self.metrics.netlink_writes.inc(netlink_requests(result))
        return result


class CountingBus:
    """The agent's NATS client, counting the payload bytes it publishes by kind (ack, health,
    request); everything else is the client's own."""

    def __init__(self, nc: Any, node: str, metrics: AgentMetrics):
        self._nc, self._node, self._metrics = nc, node, metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def publish(self, subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        await self._nc.publish(subject, payload, **kwargs)
        self._count(bus_kind(subject, self._node), payload)

    async def request(self, subject: str, payload: bytes = b"", **kwargs: Any) -> Any:
        try:
            return await self._nc.request(subject, payload, **kwargs)
        finally:  # published even when no answer came
            self._count("request", payload)

    def _count(self, kind: str, payload: bytes) -> None:
        self._metrics.bus_bytes.labels(kind).inc(len(payload))
