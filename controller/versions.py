"""Pure: the version each node's desired snapshot carries.

A node's version changes only when its snapshot's content (digest) does, and only ever grows,
also past a version a node reports having applied that this controller never issued (its store
was lost, or restored from an older backup). These functions return values; they never read a
clock, write the store or publish: ``controller.publisher`` persists a version before sending it.
"""

from collections.abc import Mapping

from schemas.desired import Snapshot
from schemas.intent import NodeVersion


def stamp(previous: NodeVersion | None, snapshot: Snapshot) -> NodeVersion:
    """``previous`` itself while the content is the same, else one version above it."""
    if previous is not None and previous.digest == snapshot.digest:
        return previous
    return NodeVersion(
        node=snapshot.node,
        version=(previous.version if previous else 0) + 1,
        digest=snapshot.digest,
    )


def stamp_all(
    versions: Mapping[str, NodeVersion], snapshots: Mapping[str, Snapshot]
) -> dict[str, NodeVersion]:
    """Every snapshot's version; an unchanged node keeps the very object it had."""
    return {node: stamp(versions.get(node), snap) for node, snap in snapshots.items()}


def continue_above(
    known: NodeVersion | None, node: str, applied_version: int
) -> NodeVersion | None:
    """The version to continue from when ``node`` has applied one above ours, else ``None``.

    Its digest is unknown (empty), so the next ``stamp`` goes one above it even for the same
    content; without that the agent would refuse every snapshot as stale.
    """
    if applied_version <= (known.version if known else 0):
        return None
    return NodeVersion(node=node, version=applied_version, digest="")
