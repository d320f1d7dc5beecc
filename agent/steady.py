"""Pure: how much of a reconcile (validate → observe → plan → apply) does this heartbeat need?

A full reconcile reads the whole kernel state (a 10,000-entry FDB dump, both nftables tables)
and is the level-triggered heart of the agent; it is only worth running when the kernel may
differ from what the last read saw. That read still holds when every heartbeat since it wrote
nothing and failed nothing, the kernel notifications (``agent.kernel_events``) showed nothing of
ours changing since it began, and fewer than ``RESYNC_EVERY`` heartbeats passed (the safety net
against anything notifications cannot say: a bug in our filter, a state the kernel does not
announce). Then a snapshot with the content last reconciled (its bytes, or its version and
digest) is skipped outright, and a new one is planned against that read (``QUIET``): the cost of
a change is the decode, validating the sections that changed, the plan and the writes. An agent
without notifications reads the kernel on every heartbeat. A heartbeat that wrote is followed by
a full one, which checks the writes took, unless the runner knows what its writes reached from
their echoes alone (FDB entries, this node's taps read back, its own ``nft -f`` loads).

WireGuard has no notifications: a skipped heartbeat still checks the WireGuard device (one
UAPI or genetlink read, proportional to the peers, not the FDB), so a removed peer is put back
on the next heartbeat either way (a change HEAD right after a read may leave it out). This
module only decides; the runner does the work.
"""

from schemas.desired import Snapshot

# at a 1 s heartbeat: a full resync at least every two minutes (Calico Felix refreshes its
# routes every 90 s), about 1 ms per heartbeat amortised at 10,000 FDB entries
RESYNC_EVERY = 120

SKIP = "skip"  # nothing to do but the WireGuard check
QUIET = "quiet"  # new content: plan against the kernel state last observed (it has not changed)
FULL = "full"  # read the whole kernel state and plan against it


def same_snapshot(snap: Snapshot, last: Snapshot | None) -> bool:
    """``snap`` has the content of ``last`` (the controller's digest covers all content)."""
    return (
        last is not None
        and bool(snap.digest)
        and (snap.node, snap.version, snap.digest) == (last.node, last.version, last.digest)
    )


def decide(
    *,
    same_content: bool,
    clean: bool,
    kernel_changed: bool,
    since_full: int,
    resync_every: int = RESYNC_EVERY,
) -> tuple[str, str]:
    """(SKIP | QUIET | FULL, why) for one heartbeat.

    ``same_content``: the snapshot is the one last reconciled; ``clean``: every heartbeat since
    the last full read of the kernel had no error and no write, so the kernel still holds what
    that read saw, unless ``kernel_changed`` (a notification touched our state since, or
    notifications are unavailable); ``since_full``: heartbeats since that read."""
    if not clean:
        return FULL, "last heartbeat wrote or failed"
    if kernel_changed:
        return FULL, "kernel changed"
    if since_full + 1 >= resync_every:
        return FULL, "periodic resync"
    if not same_content:
        return QUIET, "new content, kernel as last read"
    return SKIP, "unchanged"
