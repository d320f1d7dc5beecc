"""What the controller knows of each agent: last ack, last health, last error, when last heard.

In memory only, by design: it is rebuilt from the next acks after a restart, never persisted and
never read by the publisher.
"""

import msgspec

from schemas.api import NodeStatus
from schemas.intent import Node
from schemas.messages import Ack, Health


class NodeTrack(msgspec.Struct, kw_only=True):
    last_ack: Ack | None = None
    last_error: str | None = None
    last_heard: float = 0.0
    health: Health | None = None


class Tracker:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeTrack] = {}

    def record_ack(self, ack: Ack, now: float) -> None:
        track = self.nodes.setdefault(ack.node, NodeTrack())
        track.last_ack, track.last_heard = ack, now
        track.last_error = None if ack.ok else ack.error

    def record_health(self, health: Health, now: float) -> None:
        track = self.nodes.setdefault(health.node, NodeTrack())
        track.health, track.last_heard = health, now

    def forget(self, node: str) -> None:
        self.nodes.pop(node, None)

    def status(
        self, node: Node, desired_version: int, now: float, stale_after: float
    ) -> NodeStatus:
        """``stale``: not heard from for ``stale_after`` seconds; a silent agent is not converged."""
        track = self.nodes.get(node.name, NodeTrack())
        applied = track.last_ack.applied_version if track.last_ack else 0
        if track.health and track.health.applied_version > applied:
            applied = track.health.applied_version
        stale = bool(track.last_heard) and now - track.last_heard > stale_after
        return NodeStatus(
            node=node,
            desired_version=desired_version,
            applied_version=applied,
            converged=bool(
                desired_version
                and applied >= desired_version
                and not track.last_error
                and not stale
            ),
            stale=stale,
            last_ack=track.last_ack,
            last_error=track.last_error,
            last_heard=track.last_heard,
            health=track.health,
        )
