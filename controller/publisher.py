"""The heartbeat publisher: every node's HEAD on ``otherix.v1.desired.<node>`` every heartbeat,
and at once to the nodes a change affects, with the content of their changed sections attached
once; and ``section.get``, which serves a node the sections its HEAD names.

Unchanged HEADs are spread over the heartbeat: the interval is cut into up to ``TICKS`` ticks (one
per ``NODES_PER_TICK`` nodes: each tick wakes the controller, ~0.25 ms of CPU on this machine)
and each node's HEAD leaves on its own tick (nodes dealt to ticks in turn), so the nodes' agents
do not all do their heartbeat work in the same instant (100 real agents on 2 cores: a burst of
~150 ms every second that a change arriving then waited behind). A change still goes out at once.

It owns the section model (``controller.sections``: incremental, pure), the versions' persisted
high-water mark (reserved in blocks before any version above it is sent, ``controller.versions``),
the encoded HEADs (re-encoded only for the nodes a change affects) and the isolation of one
node's send failure from the others. Changes are taken over lazily: ``wake`` only records which
records changed, so an API reply never waits for this work; the next read, fetch or publish
commits them (synchronously, in memory). It never changes intent and never answers the rest of
the API.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping

import nats.errors
from nats.aio.client import Client

from controller import versions
from controller.compute import ClusterConfig
from controller.metrics import ControllerMetrics
from controller.sections import Attachments, Key, Model, VersionExhausted
from controller.store import Store
from schemas import naming
from schemas.codec import encode
from schemas.intent import Generation, Intent, NodeVersion, NodeVersions
from schemas.wire import SectionData, SectionGet

log = logging.getLogger(__name__)

# Room left in a message for what is not items: JSON envelope, names, digests, reply headers.
ENVELOPE = 2048
SAVE_EVERY = 1.0  # seconds between saves of the nodes' versions (one entry, never per change)
TICKS = 10  # a heartbeat's unchanged HEADs leave in up to this many groups, over its interval
NODES_PER_TICK = 10  # fewer nodes than this per group are not worth a wake-up of their own
MIN_TICK = 0.02  # seconds: shorter intervals are cut into fewer ticks


class Versions(Mapping[str, NodeVersion]):
    """Each node's current desired version and digest, read from the model's HEADs."""

    def __init__(self, model: Model):
        self._heads = model.heads

    def __getitem__(self, node: str) -> NodeVersion:
        head = self._heads[node]
        return NodeVersion(node=node, version=head.version, digest=head.digest)

    def __iter__(self) -> Iterator[str]:
        return iter(self._heads)

    def __len__(self) -> int:
        return len(self._heads)


class Publisher:
    def __init__(
        self,
        nc: Client,
        store: Store,
        config: ClusterConfig,
        intent: Intent,
        lock: asyncio.Lock,
        clock: Callable[[], float] = time.time,
        may_publish: Callable[[], bool] = lambda: True,
        metrics: ControllerMetrics | None = None,
    ):
        self.nc, self.store, self.config, self.intent, self.clock = nc, store, config, intent, clock
        self.may_publish = may_publish  # False once the lease may have passed to another
        self.metrics = metrics or ControllerMetrics()
        self.heartbeat_at: float | None = None  # monotonic time of the last heartbeat sent
        self._lock = lock  # the controller's one lock: intent does not move while we commit
        self.model = Model(config, on_problem=self._problem, on_error=self._node_failed)
        self.versions = Versions(self.model)
        self._reserved = 0  # persisted high-water mark: nothing above it has been sent
        self._everything = True  # take over the whole intent at the next commit
        self._keys: set[Key] = set()
        self._fresh: dict[str, Attachments] = {}  # nodes to publish at once, with their content
        self._encoded: dict[str, bytes] = {}  # node → its HEAD without content, as last encoded
        self._problems: set[str] = set()  # logged once each
        self._changed = asyncio.Event()
        self._next_heartbeat = 0.0  # monotonic time of the next tick
        self._tick = 0  # the tick whose nodes' HEADs leave next
        self._ticks = 1  # ticks in the current interval (``ticks``), set as each interval begins
        self._ticks_of: dict[str, int] = {}  # node → a number; its tick is that modulo ``ticks``
        self._groups: list[list[str]] = [[]]  # the nodes of each tick, dealt as an interval begins
        self._dealt = 0  # numbers dealt so far (never reused: the ticks stay even)
        self._work = 0.0  # seconds spent on the current interval's ticks so far (metrics)
        self._saved: dict[str, tuple[int, str]] = {}  # node versions as last saved
        self._final_on_record = False  # the store holds a clean stop's final versions
        self._save_after = 0.0  # monotonic time before which versions are not saved again
        self._stopping = False

    def start_from(
        self,
        reserved: int,
        loaded: Mapping[str, NodeVersion],
        saved: NodeVersions | None = None,
    ) -> None:
        """Continue above the persisted mark and the per-node versions of older releases; a node
        whose content is what it was in a final ``saved`` (a clean stop's) keeps that version."""
        self._reserved = reserved
        self.model.generation = versions.start_generation(reserved, loaded.values())
        if saved is not None and saved.final:
            self.model.earlier = {
                n: (v, d) for n, (v, d) in saved.nodes.items() if v <= self.model.generation
            }
            self._saved = saved.nodes
            self._final_on_record = True

    def wake(self, *keys: Key) -> None:
        """These records changed (all of them when none are named): publish at once."""
        if keys:
            self._keys.update(keys)
        else:
            self._everything = True
        self._changed.set()

    def continue_above(self, node: str, applied_version: int) -> None:
        """``node`` has applied a version we never issued: publish above it from now on."""
        known = self.model.heads.get(node)
        current = known.version if known else 0
        if node in self.model.nodes and versions.continue_above(current, applied_version):
            log.warning(
                "controller: node %s has applied version %d, above ours (%d); continuing above it",
                node, applied_version, current,
            )  # fmt: skip
            self.model.force(node, applied_version)
            self._changed.set()

    @property
    def budget(self) -> int:
        """Bytes of items one message may carry: the server's max_payload less the envelope."""
        return max(self.nc.max_payload - ENVELOPE, 512)

    # --- commits (in memory, no I/O) ------------------------------------------------------------

    def commit(self) -> None:
        """Take over pending changes; the nodes they affect get a new version and are queued."""
        synced = self._everything or bool(self._keys)  # else no node came or went
        if self._everything:
            self._everything, self._keys = False, set()
            self.model.sync(self.intent)
        elif self._keys:
            keys, self._keys = self._keys, set()
            self.model.sync(self.intent, keys)
        try:
            done = self.model.commit()
        except VersionExhausted as e:
            log.error("controller: no new versions (%s); the last ones stay", e)
            return
        if done.nodes:
            attach = Attachments(done)
            for node in done.nodes:
                self._fresh[node] = attach
        removed = [n for n in self._encoded if n not in self.model.heads] if synced else []
        for node in removed:  # (a scan of every node: not on every tick)
            del self._encoded[node]  # removed: nothing more is published for it
            self._fresh.pop(node, None)
            self._ticks_of.pop(node, None)

    @property
    def ticks(self) -> int:
        """How many ticks the current heartbeat interval is cut into."""
        return self._ticks

    def _cut(self) -> int:
        by_nodes = -(-len(self._encoded) // NODES_PER_TICK)
        return max(1, min(TICKS, by_nodes, int(self.config.heartbeat_interval / MIN_TICK)))

    def desired(self, node: str) -> NodeVersion | None:
        """Version and digest of ``node``'s current HEAD, pending changes included. In memory
        only: reads never persist."""
        self.commit()
        return self.versions.get(node)

    def section_get(self, req: SectionGet) -> SectionData:
        self.commit()
        return self.model.get(req.name, req, self.budget)

    def _problem(self, problem: str) -> None:
        if problem not in self._problems:
            self._problems.add(problem)
            log.error("controller: %s", problem)

    def _node_failed(self, node: str, error: Exception) -> None:
        log.error("controller: node %s: no new state (%s); its last one stays", node, error)

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.publish_all()
            except Exception:
                log.exception("controller: heartbeat failed; retrying next cycle")
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that arrives as the
            # wait ends, and this loop would never stop.
            wait = max(self._next_heartbeat - time.monotonic(), 0.0)
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()

    def stop(self) -> None:
        # A flag as well as the caller's cancel(): on 3.11 a cancel that races a finishing
        # nats-py request (asyncio.wait_for inside) can be swallowed, and the loop must still end.
        self._stopping = True
        self._changed.set()

    async def publish_all(self) -> None:
        """The nodes a change affected, with their content; every node when a heartbeat is due."""
        started = time.monotonic()
        async with self._lock:
            self.commit()
            if not await self._reserve() or not await self._unfinal():
                fresh = {}  # nothing above the persisted mark may leave: old HEADs only
            else:
                fresh, self._fresh = self._fresh, {}
            now, budget = self.clock(), self.budget
            with_content = {}
            for node, attach in fresh.items():
                if node not in self.model.heads:
                    continue
                self._encoded[node] = encode(self.model.head(node, budget, published_at=now))
                if node not in self._ticks_of:  # dealt in turn, also after others left
                    self._ticks_of[node], self._dealt = self._dealt, self._dealt + 1
                    self._groups[self._ticks_of[node] % self._ticks].append(node)
                with_content[node] = encode(self.model.head(node, budget, attach, now))
            heartbeat, last_tick = time.monotonic() >= self._next_heartbeat, False  # tick due?
            if heartbeat:
                if self._tick == 0:  # an interval begins: nodes may have come or gone
                    self._ticks = self._cut()
                    self._groups = [[] for _ in range(self._ticks)]
                    for node, number in self._ticks_of.items():
                        self._groups[number % self._ticks].append(node)
                tick, step = self._tick, self.config.heartbeat_interval / self.ticks
                self._tick = (tick + 1) % self.ticks
                last_tick = self._tick == 0
                # from the last deadline (no drift); afresh when behind by more (no catching up)
                now_m, due_at = time.monotonic(), self._next_heartbeat + step
                self._next_heartbeat = due_at if due_at > now_m else now_m + step
                # O(nodes of the tick); one removed since the groups were dealt has no HEAD
                enc = self._encoded
                due = {n: enc[n] for n in self._groups[tick] if n in enc}
                messages = {**due, **with_content}
            else:
                messages = with_content
        if not self.may_publish():  # checked last: nothing slower than a publish comes after
            log.warning("controller: lease not renewed in time; %d HEADs held back", len(messages))
            return
        for node, data in messages.items():
            try:
                await self.nc.publish(naming.desired_subject(node), data)
            except nats.errors.Error as e:  # one node's failure must not starve the rest
                log.error("controller: HEAD of node %s not sent: %s", node, e)
        self.metrics.published("head", messages.values())  # a send failure above is logged
        await self._save_versions()
        if heartbeat:
            self.heartbeat_at = time.monotonic()
            self._work += self.heartbeat_at - started
            if last_tick:  # an interval's ticks are one heartbeat (every node's HEAD), as metered
                self.metrics.heartbeat_took(self._work, self.config.heartbeat_interval)
                self._work = 0.0

    async def close(self) -> None:
        """On a clean stop, after the last HEAD: save the nodes' versions as final, so the next
        leader keeps the versions of unchanged nodes."""
        async with self._lock:
            await self._save_versions(final=True)

    async def _save_versions(self, final: bool = False) -> None:
        """Every node's version in one entry, at most every ``SAVE_EVERY`` seconds. Only the final
        save is reused by the next leader; the others are for followers' ``status``."""
        if not final and time.monotonic() < self._save_after:
            return  # before the O(nodes) copy: this runs on every tick
        now = {n: (h.version, h.digest) for n, h in self.model.heads.items()}
        if not final and now == self._saved:
            return
        self._save_after = time.monotonic() + SAVE_EVERY
        data = NodeVersions(nodes=now, final=final)
        if len(encode(data)) > self.budget:
            log.warning("controller: %d nodes' versions exceed one entry; not saved", len(now))
            return
        try:
            await self.store.put(data)
        except Exception as e:
            log.warning("controller: node versions not saved (%s); retrying later", e)
            return
        self._saved = now

    async def _unfinal(self) -> bool:
        """Before our first HEAD: the final record on file stops being exact once we send, so a
        crash of ours must not leave it final (the next leader would go back to its versions)."""
        if not self._final_on_record:
            return True
        try:
            await self.store.put(NodeVersions(nodes=self._saved))
        except Exception as e:
            log.error("controller: saved versions not marked in use (%s); HEADs wait", e)
            return False
        self._final_on_record = False
        return True

    async def _reserve(self) -> bool:
        """Persist the high-water mark before any version above it is sent; False if we cannot."""
        mark = versions.reservation(self.model.generation, self._reserved)
        if mark is None:
            return True
        try:
            await self.store.put(Generation(reserved=mark))
        except Exception as e:
            log.error("controller: version mark %d not persisted (%s); new versions wait", mark, e)
            return False
        self._reserved = mark
        return True
