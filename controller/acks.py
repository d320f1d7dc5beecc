"""What agents report: acks and health on ``otherix.v1.ack.*`` / ``otherix.v1.health.*``.

It accepts only a registered node's own message on that node's own subject, and an ack only for
a version that was published to that node; everything else is refused and counted. It records
what it accepts in the tracker, and asks the publisher to continue above a version a node has applied that we never
issued. It never writes intent or the store and never replies: agents get their answer from the
next snapshot.
"""

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client

from controller.publisher import Publisher
from controller.tracker import Tracker
from schemas import naming
from schemas.codec import decode
from schemas.intent import Intent
from schemas.messages import Ack, Health

log = logging.getLogger(__name__)
T = TypeVar("T", Ack, Health)


class Acks:
    def __init__(
        self,
        intent: Intent,
        tracker: Tracker,
        publisher: Publisher,
        clock: Callable[[], float],
        refused: Counter[str] | None = None,
    ):
        self.intent, self.tracker, self.publisher, self.clock = intent, tracker, publisher, clock
        # reason → reports refused (status shows it; controller.metrics exposes it)
        self.refused: Counter[str] = Counter() if refused is None else refused
        # A follower has published nothing; it bounds acks by the leader's persisted mark of
        # versions (the leader never sends above it), read from the bucket. None: we lead. A
        # bound of None: no role loaded yet (start, a deposed leader reloading); its acks are
        # dropped, not refused as forged (the next heartbeat's acks carry the same truth).
        self.follower_bound: Callable[[], int | None] | None = None

    async def subscribe(self, nc: Client) -> list[Any]:
        # bounded queues: a flood of (duplicated) reports drops the excess as slow-consumer
        # messages (counted by schemas.bus.Reconnect) instead of growing memory; the next
        # heartbeat's reports carry the same truth
        limits = {"pending_msgs_limit": 65536, "pending_bytes_limit": 64 * 2**20}
        return [
            await nc.subscribe(naming.ack_subject("*"), cb=self.on_ack, **limits),
            await nc.subscribe(naming.health_subject("*"), cb=self.on_health, **limits),
        ]

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        # the first of a kind in full, then every 100th: a flood must not flood the log too
        if self.refused[reason] % 100 == 1:
            log.warning("controller: refused agent report (%s, %d so far): %s",
                        reason, self.refused[reason], detail)  # fmt: skip

    def _from_node(self, msg, type_: type[T]) -> T | None:
        """A registered node's own ack or health; anything else is refused and counted."""
        try:
            value = decode(msg.data, type_)
        except msgspec.DecodeError as e:
            self._refuse("malformed", f"{type_.__name__} on {msg.subject}: {e}")
            return None
        if value.node != msg.subject.rsplit(".", 1)[-1]:
            self._refuse("wrong subject", f"{type_.__name__} of {value.node} on {msg.subject}")
            return None
        # unregistered nodes are not tracked: memory stays bounded by registered nodes
        return value if value.node in self.intent.nodes else None

    async def on_ack(self, msg) -> None:
        if (ack := self._from_node(msg, Ack)) is None:
            return
        if self.follower_bound is not None:
            if (bound := self.follower_bound()) is None:
                return
        else:
            published = self.publisher.versions.get(ack.node)
            bound = published.version if published else 0
        if ack.version > bound:
            # nothing we sent carries this version: a forged or confused ack must not make a
            # node look converged (version 0 is an agent's "no snapshot" error ack)
            self._refuse("unpublished version", f"node {ack.node} acked version {ack.version}")
            return
        self.tracker.record_ack(ack, self.clock())
        if self.follower_bound is not None:
            return  # the leader hears the same ack and acts on it
        # The node may hold a version we never issued (the store was lost or restored from an
        # older backup): continue above it, or the agent would refuse everything as stale. Only
        # the node's own identity may publish here (bus permissions), and never past the bound.
        self.publisher.continue_above(ack.node, ack.applied_version)
        if not ack.ok:
            log.warning(
                "controller: node %s refused or failed version %d: %s",
                ack.node,
                ack.version,
                ack.error,
            )

    async def on_health(self, msg) -> None:
        if (health := self._from_node(msg, Health)) is not None:
            self.tracker.record_health(health, self.clock())
