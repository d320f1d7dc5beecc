"""Pure: may this heartbeat skip the full reconcile (validate → observe → plan → apply)?

A full reconcile reads the whole kernel state (a 10,000-entry FDB dump, both nftables tables)
and is the level-triggered heart of the agent; it is only worth running when something may
differ. It may be skipped only when all of these hold:

- the snapshot carries the content last reconciled without an error and without a write (its
  bytes, or its version and digest, are those of that snapshot);
- the kernel notifications (``agent.kernel_events``) showed nothing of ours changing since that
  reconcile began to observe; an agent without notifications never skips;
- fewer than ``RESYNC_EVERY`` heartbeats have been skipped in a row: the safety net against
  anything notifications cannot say (a bug in our filter, a state the kernel does not announce).

WireGuard has no notifications: a skipped heartbeat still checks the WireGuard device (one
UAPI or genetlink read, proportional to the peers, not the FDB), so a removed peer is put back
on the next heartbeat either way. This module only decides; the runner does the work.
"""

# at a 1 s heartbeat: a full resync at least every two minutes (Calico Felix refreshes its
# routes every 90 s), about 1 ms per heartbeat amortised at 10,000 FDB entries
RESYNC_EVERY = 120


def full_reason(
    *,
    same_content: bool,
    clean: bool,
    kernel_changed: bool,
    skipped_in_a_row: int,
    resync_every: int = RESYNC_EVERY,
) -> str | None:
    """Why this heartbeat needs a full reconcile, or None when it may skip it.

    ``same_content``: the snapshot is the one last reconciled; ``clean``: that reconcile (and
    every heartbeat since) had no error and no write; ``kernel_changed``: a notification touched
    our state since, or notifications are unavailable."""
    if not same_content:
        return "new content"
    if not clean:
        return "last heartbeat wrote or failed"
    if kernel_changed:
        return "kernel changed"
    if skipped_in_a_row + 1 >= resync_every:
        return "periodic resync"
    return None
