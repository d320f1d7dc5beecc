"""Pure: the version each node's desired snapshot carries.

A node's version changes only when its snapshot's content (digest) does, and only ever grows,
also past a version a node reports having applied that this controller never issued (its store
was lost, or restored from an older backup). These functions return values; they never read a
clock, write the store or publish: ``controller.publisher`` persists a version before sending it.
"""

from schemas import MAX_VERSION
from schemas.desired import Snapshot
from schemas.intent import NodeVersion


class VersionExhausted(Exception):
    """A node's version reached ``MAX_VERSION``; no snapshot can be stamped above it."""


def stamp(previous: NodeVersion | None, snapshot: Snapshot) -> NodeVersion:
    """``previous`` itself while the content is the same, else one version above it."""
    if previous is not None and previous.digest == snapshot.digest:
        return previous
    if previous is not None and previous.version >= MAX_VERSION:
        raise VersionExhausted(f"node {snapshot.node}: version {previous.version} is the maximum")
    return NodeVersion(
        node=snapshot.node,
        version=(previous.version if previous else 0) + 1,
        digest=snapshot.digest,
    )


def continue_above(
    known: NodeVersion | None, node: str, applied_version: int
) -> NodeVersion | None:
    """The version to continue from when ``node`` has applied one above ours, else ``None``.

    Its digest is unknown (empty), so the next ``stamp`` goes one above it even for the same
    content; without that the agent would refuse every snapshot as stale. Never up to
    ``MAX_VERSION``: there must be room for the next stamp.
    """
    if applied_version <= (known.version if known else 0) or applied_version >= MAX_VERSION:
        return None
    return NodeVersion(node=node, version=applied_version, digest="")
