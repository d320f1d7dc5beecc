"""What the controller knows of each agent: last ack, last health, last error, when last heard.

In memory only, by design: it is rebuilt from the next acks after a restart, never persisted and
never read by the publisher.
"""

import msgspec

from schemas.api import NodeStatus
from schemas.intent import Node, NodeVersion
from schemas.messages import Ack, Health


class NodeTrack(msgspec.Struct, kw_only=True):
    last_ack: Ack | None = None
    last_error: str | None = None
    last_heard: float = 0.0
    health: Health | None = None
    health_heard: float = 0.0


class Tracker:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeTrack] = {}

    def record_ack(self, ack: Ack, now: float) -> None:
        track = self.nodes.setdefault(ack.node, NodeTrack())
        track.last_ack, track.last_heard = ack, now
        track.last_error = None if ack.ok else ack.error

    def record_health(self, health: Health, now: float) -> None:
        track = self.nodes.setdefault(health.node, NodeTrack())
        track.health, track.last_heard, track.health_heard = health, now, now

    def forget(self, node: str) -> None:
        self.nodes.pop(node, None)

    def fresh_health(self, node: str, now: float, stale_after: float) -> Health | None:
        track = self.nodes.get(node)
        if track is None or track.health is None or now - track.health_heard > stale_after:
            return None
        return track.health

    def status(
        self, node: Node, desired: NodeVersion | None, now: float, stale_after: float
    ) -> NodeStatus:
        """Converged only when the last ack applied exactly the desired content (its digest)
        without error and the agent's health is fresh; a silent agent is ``stale``."""
        track = self.nodes.get(node.name, NodeTrack())
        ack = track.last_ack
        applied = ack.applied_version if ack else 0
        if track.health and track.health.applied_version > applied:
            applied = track.health.applied_version
        stale = bool(track.last_heard) and now - track.last_heard > stale_after
        health = self.fresh_health(node.name, now, stale_after)
        # an agent whose key is not the registered one (its state was lost and its new key
        # refused) has its mesh peers' trust wrong, whatever it acked
        wrong_key = bool(
            health and health.wg_public_key and node.wg_public_key
            and health.wg_public_key != node.wg_public_key
        )  # fmt: skip
        last_error = track.last_error
        if wrong_key and not last_error:
            last_error = (
                f"the agent's WireGuard key {health.wg_public_key} is not the registered one"
                f" {node.wg_public_key}; if the node really has a new key, run"
                f" 'otherixctl node rekey {node.name}'"
            )
        return NodeStatus(
            node=node,
            desired_version=desired.version if desired else 0,
            desired_digest=desired.digest if desired else "",
            applied_version=applied,
            converged=bool(
                desired
                and ack is not None
                and ack.ok
                and ack.digest == desired.digest
                and ack.applied_version >= desired.version
                and health is not None
                and not stale
                and not wrong_key
            ),
            stale=stale,
            last_ack=ack,
            last_error=last_error,
            last_heard=track.last_heard,
            health=track.health,
            no_carrier=tuple(sorted(t for t, up in health.taps.items() if not up))
            if health
            else (),
        )
