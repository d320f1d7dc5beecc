"""The controller's Prometheus metrics, in a registry of its own (several controllers may share a
process, as in tests), and the pure computations of what is read rather than counted: nodes by
state, the highest version published, readiness.

Counters are incremented where things happen, one call each (``controller.publisher``: HEADs
and heartbeats; ``controller.api``: requests, changes, errors and ``section.get`` replies;
``controller.service``: the leader gauge). Refusals are counted once, in the ``refused``
Counter that ``controller.api`` and ``controller.acks`` share and ``status`` shows; this module
only exposes it. It never changes controller state and never does I/O.
"""

import time
from collections import Counter as Tally
from collections.abc import Collection, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from controller.tracker import Tracker
from schemas import api
from schemas.api import NodeStatus
from schemas.intent import Node, NodeVersion

NODE_STATES = ("registered", "converged", "stale", "pending")
# Successful calls of these change intent (a retry that found its object, ``existed``, does not).
WRITE_ENDPOINTS = tuple(
    e for e in api.ENDPOINTS if e not in api.READ_ENDPOINTS and e != "section.get"
)
# a heartbeat of a few nodes or an API read takes under a millisecond, thousands of nodes seconds
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.refused: Tally[str] = Tally()  # reason → requests and reports refused (shared)
        self.heartbeat = Histogram(
            "otherix_controller_heartbeat_duration_seconds",
            "One heartbeat's publish work: every node's HEAD, then the versions' save",
            buckets=BUCKETS,
            registry=registry,
        )
        self.overruns = Counter(
            "otherix_controller_heartbeat_overruns",
            "Heartbeats that took longer than the heartbeat interval",
            registry=registry,
        )
        self.nodes = Gauge(
            "otherix_controller_nodes",
            "Nodes by state: registered (all), converged, stale (silent), pending (an applied"
            " version below the desired one)",
            ["state"],
            registry=registry,
        )
        self.changes = Counter(
            "otherix_controller_changes",
            "Intent changes applied (successful writes), by API endpoint",
            ["endpoint"],
            registry=registry,
        )
        self.api_errors = Counter(
            "otherix_controller_api_errors",
            "API requests answered with an error, by endpoint and code (400 bad request, 404 not"
            " found, 409 conflict, 501 deferred, 503 not the leader, 500 internal)",
            ["endpoint", "code"],
            registry=registry,
        )
        self.requests = Histogram(
            "otherix_controller_api_request_duration_seconds",
            "API requests answered by this controller, from arrival to reply",
            ["endpoint"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.bus_bytes = Counter(
            "otherix_controller_bus_published_bytes",
            "Payload bytes published: HEADs (with any attached content) and section.get replies",
            ["kind"],
            registry=registry,
        )
        self.bus_messages = Counter(
            "otherix_controller_bus_published_messages",
            "Messages published: HEADs and section.get replies",
            ["kind"],
            registry=registry,
        )
        self.leader = Gauge(
            "otherix_controller_leader", "1 while this controller leads, else 0", registry=registry
        )
        self.version_max = Gauge(
            "otherix_controller_desired_version_max",
            "Highest desired version of any node (the leader's HEADs, a follower's saved copy)",
            registry=registry,
        )
        registry.register(_Refusals(self.refused))
        for state in NODE_STATES:
            self.nodes.labels(state)  # every state shows, at 0 too
        for kind in ("head", "section"):
            self.bus_bytes.labels(kind)
            self.bus_messages.labels(kind)

    # --- where things happen (one call each) ----------------------------------------------------

    def published(self, kind: str, payloads: Collection[bytes]) -> None:
        """Messages handed to the NATS client (once per heartbeat: labels() costs µs per call)."""
        self.bus_bytes.labels(kind).inc(sum(map(len, payloads)))
        self.bus_messages.labels(kind).inc(len(payloads))

    def heartbeat_took(self, seconds: float, interval: float) -> None:
        self.heartbeat.observe(seconds)
        if seconds > interval:
            self.overruns.inc()

    def failed(self, endpoint: str, code: int) -> None:
        """An API request answered with an error ``code``."""
        self.api_errors.labels(endpoint, str(code)).inc()

    def answered(self, endpoint: str, reply: object, data: bytes) -> None:
        """An API request answered successfully with ``data`` (the encoded ``reply``)."""
        if endpoint in WRITE_ENDPOINTS and not getattr(reply, "existed", False):
            self.changes.labels(endpoint).inc()
        elif endpoint == "section.get":
            self.published("section", (data,))

    # --- read at a scrape -----------------------------------------------------------------------

    def refresh(
        self,
        nodes: Iterable[Node],
        tracker: Tracker,
        desired: Mapping[str, NodeVersion],
        now: float,
        stale_after: float,
    ) -> None:
        statuses = [tracker.status(n, desired.get(n.name), now, stale_after) for n in nodes]
        for state, count in node_states(statuses).items():
            self.nodes.labels(state).set(count)
        self.version_max.set(version_max(desired.values()))


class _Refusals(Collector):
    """``otherix_controller_refusals_total{reason}``, read from the shared tally at a scrape."""

    def __init__(self, refused: Mapping[str, int]):
        self.refused = refused

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for reason, count in sorted(self.refused.items()):
            family.add_metric([reason], count)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "otherix_controller_refusals",
            "Requests and agent reports refused, by reason (as status shows them)",
            labels=["reason"],
        )


# --- pure --------------------------------------------------------------------------------------


def node_states(statuses: Iterable[NodeStatus]) -> dict[str, int]:
    """Nodes by state; a node counts in every state that holds (all are ``registered``)."""
    counts = dict.fromkeys(NODE_STATES, 0)
    for s in statuses:
        counts["registered"] += 1
        counts["converged"] += s.converged
        counts["stale"] += s.stale
        counts["pending"] += s.applied_version < s.desired_version
    return counts


def version_max(versions: Iterable[NodeVersion]) -> int:
    return max((v.version for v in versions), default=0)


def readiness(
    connected: bool,
    leading: bool,
    heartbeat_age: float | None,
    stale_after: float,
    following: bool,
    follow_behind: int | None,
) -> str | None:
    """None when ready, else what is missing. ``heartbeat_age``: seconds since the leader last
    published a heartbeat (None: never); ``follow_behind``: entries a follower's copy still
    lacks of the bucket as it was when it began following (None: not known yet)."""
    if not connected:
        return "not connected to NATS"
    if leading:
        if heartbeat_age is None:
            return "leading, but no heartbeat published yet"
        if heartbeat_age > stale_after:
            return f"leading, but no heartbeat published for {heartbeat_age:.1f}s"
        return None
    if not following:
        return "intent not loaded: neither leading nor following the bucket"
    if follow_behind is None:
        return "following, but the bucket's last sequence is not known yet"
    if follow_behind > 0:
        return f"following, but the copy of intent is {follow_behind} entries behind the bucket"
    return None


def age(since: float | None, now: float | None = None) -> float | None:
    """Seconds since a ``time.monotonic()`` instant (None stays None)."""
    return None if since is None else (time.monotonic() if now is None else now) - since
