"""Which controller leads: a lease held in the intent bucket under the key ``leader``.

Pure decisions first (``Timing``, ``follow``, ``holds``): given a monotonic ``now``, what was
last seen of the lease and who we are, what to do. Time is never read from the entry (no
wall-clock comparison between machines): a follower measures, on its own monotonic clock, how
long the entry's revision has stood still, and the leader measures how long ago it sent its last
successful renewal. Because a follower first sees a renewal no earlier than the leader sent it,
``hold < expire`` means the leader stops publishing before any follower may take over.

``Lease`` is the thin shell: it reads and writes the entry through ``controller.store`` (create
when absent, revision-checked update otherwise) and never decides anything itself. It must never
publish desired state nor change intent.
"""

import enum
import logging
import uuid
from dataclasses import dataclass

import msgspec

from controller.store import Store
from schemas.codec import decode, encode

log = logging.getLogger(__name__)


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """The lease entry's value: who holds it, and which of its terms (new at each acquisition)."""

    instance: str
    term: str


@dataclass(frozen=True)
class Timing:
    """Renew twice a heartbeat; a revision standing still for ``expire`` seconds is expired; the
    leader publishes only while its last renewal was sent less than ``hold`` seconds ago."""

    heartbeat: float

    @property
    def renew(self) -> float:
        return self.heartbeat / 2  # twice a heartbeat: a late one does not lapse the hold

    @property
    def expire(self) -> float:
        return 2.0 * self.heartbeat  # four renewals in a row missed

    @property
    def hold(self) -> float:
        return 1.5 * self.heartbeat  # below expire: the margin is for clock rates, not latency

    @property
    def poll(self) -> float:
        return self.heartbeat / 4  # how often a follower looks at the lease


@dataclass(frozen=True)
class Seen:
    """A lease entry as a follower last saw it change: its revision (0: absent or deleted), its
    holder, and the follower's monotonic time when that revision first appeared."""

    revision: int
    holder: str
    since: float


class Action(enum.Enum):
    WAIT = "wait"
    ACQUIRE = "acquire"


def follow(now: float, seen: Seen | None, revision: int, holder: str, timing: Timing):
    """A follower's step: (what to do, what it has now seen). The lease is taken at once when
    there is none (first start, clean release) and after ``expire`` of a standing revision."""
    if revision == 0:
        return Action.ACQUIRE, Seen(0, "", now)
    if seen is None or seen.revision != revision:
        return Action.WAIT, Seen(revision, holder, now)
    if now - seen.since >= timing.expire:
        return Action.ACQUIRE, seen
    return Action.WAIT, seen


def holds(now: float, renewed_at: float | None, timing: Timing) -> bool:
    """May the leader still act (publish, reserve versions)? ``renewed_at`` is when it sent the
    last renewal that succeeded (or its acquisition), on its monotonic clock."""
    return renewed_at is not None and now - renewed_at < timing.hold


class Lease:
    """The lease's side effects for one controller ``instance``."""

    def __init__(self, store: Store, instance: str, timing: Timing):
        self.store, self.instance, self.timing = store, instance, timing
        self.revision = 0  # of our entry while we lead, 0 otherwise
        self.renewed_at: float | None = None
        self.seen: Seen | None = None
        self._value = b""

    @property
    def leader(self) -> str:
        """Who leads as far as we know ("" if nobody)."""
        if self.revision:
            return self.instance
        holder = self.seen.holder if self.seen else ""
        return "" if holder == self.instance else holder  # ours but not held: a past life's

    async def look(self) -> tuple[int, str]:
        entry = await self.store.lease()
        if entry is None:
            return 0, ""
        revision, value = entry
        try:
            return revision, decode(value, Holder).instance
        except msgspec.DecodeError:
            return revision, "?"

    async def try_acquire(self, now: float) -> bool:
        """One follower step; True when we now lead."""
        revision, holder = await self.look()
        action, self.seen = follow(now, self.seen, revision, holder, self.timing)
        if action is Action.WAIT:
            return False
        value = encode(Holder(instance=self.instance, term=uuid.uuid4().hex))
        got = await self.store.take_lease(value, revision)
        if got is None:
            return False  # someone else was quicker
        if revision:
            log.warning("controller %s: lease of %s expired; taking over", self.instance, holder)
        self.revision, self.renewed_at, self._value = got, now, value
        return True

    async def renew(self, now: float) -> bool:
        """The leader's step; False when the lease is no longer ours (step down)."""
        got = await self.store.renew_lease(self._value, self.revision)
        if got is None:
            self.lost()
            return False
        self.revision, self.renewed_at = got, now
        return True

    def holds(self, now: float) -> bool:
        return holds(now, self.renewed_at, self.timing)

    def lost(self) -> None:
        self.revision, self.renewed_at, self.seen = 0, None, None

    async def release(self) -> None:
        """A clean stop: delete our entry (revision-checked) so a follower takes over at once."""
        if self.revision:
            await self.store.release_lease(self.revision)
        self.lost()
