"""The heartbeat publisher: every node's stamped desired snapshot on ``otherix.v1.desired.<node>``,
every heartbeat and at once after a change.

It owns the desired versions (a new one is persisted before it is ever sent), the encoded
snapshots (rebuilt only after a change) and the isolation of one node's send failure from the
others. It never changes intent and never answers the API. ``desired`` serves read
endpoints: after a change it computes the coming version in memory and never writes.
"""

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.client import Client

from controller import versions
from controller.compute import ClusterConfig, compute_snapshots
from controller.store import Store
from schemas import naming
from schemas.codec import encode
from schemas.desired import Snapshot
from schemas.intent import Intent, NodeVersion

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        nc: Client,
        store: Store,
        config: ClusterConfig,
        intent: Intent,
        lock: asyncio.Lock,
        clock: Callable[[], float] = time.time,
    ):
        self.nc, self.store, self.config, self.intent, self.clock = nc, store, config, intent, clock
        self.versions: dict[str, NodeVersion] = {}  # last persisted (or continued) per node
        self._lock = lock  # the controller's one lock: intent does not move while we stamp
        self._dirty = True  # intent or versions changed since the last restamp
        self._pending: dict[str, tuple[Snapshot, NodeVersion]] | None = None  # while dirty
        self._encoded: dict[str, bytes] = {}  # node → snapshot bytes, rebuilt on change only
        self._changed = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Intent or versions changed: restamp and publish at once."""
        self._dirty, self._pending = True, None
        self._changed.set()

    def continue_above(self, node: str, applied_version: int) -> None:
        """``node`` has applied a version we never issued: publish above it from now on."""
        known = self.versions.get(node)
        version = versions.continue_above(known, node, applied_version)
        if version is not None:
            log.warning(
                "controller: node %s has applied version %d, above ours (%d); continuing above it",
                node, applied_version, known.version if known else 0,
            )  # fmt: skip
            self.versions[node] = version
            self.wake()

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.publish_all()
            except Exception:
                log.exception("controller: heartbeat failed; retrying next cycle")
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that arrives as the
            # wait ends, and this loop would never stop.
            try:
                async with asyncio.timeout(self.config.heartbeat_interval):
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
        async with self._lock:
            if self._dirty:
                await self._restamp()
            encoded = dict(self._encoded)
        for node, data in encoded.items():
            try:
                await self.nc.publish(naming.desired_subject(node), data)
            except nats.errors.MaxPayloadError:  # one oversized node must not starve the rest
                log.error(
                    "controller: snapshot of node %s is %d bytes, above the server's max_payload; not sent",
                    node, len(data),
                )  # fmt: skip
            except nats.errors.Error as e:
                log.error("controller: snapshot of node %s not sent: %s", node, e)

    # --- stamping -------------------------------------------------------------------------------

    def _plan(self) -> dict[str, tuple[Snapshot, NodeVersion]]:
        """Each node's snapshot and the version it will carry; computed once per change.

        A node that cannot be computed or stamped is left out (and logged): it keeps its last
        good snapshot, and the others are never held back by it.
        """
        if self._pending is None:
            failed: dict[str, Exception] = {}
            skipped: list[str] = []
            snapshots = compute_snapshots(
                self.intent, self.config, on_error=failed.__setitem__, on_skip=skipped.append
            )
            for problem in skipped:  # logged once per change: the plan is computed once
                log.error("controller: %s; left out of every snapshot", problem)
            plan = {}
            for node, snapshot in snapshots.items():
                try:
                    plan[node] = (snapshot, versions.stamp(self.versions.get(node), snapshot))
                except versions.VersionExhausted as e:
                    failed[node] = e
            for node, e in failed.items():
                log.error("controller: node %s: no new snapshot (%s); its last one stays", node, e)
            self._pending = plan
        return self._pending

    def desired(self, node: str) -> NodeVersion | None:
        """Version and digest of ``node``'s next snapshot. In memory only: reads never persist."""
        if self._dirty and node in self.intent.nodes:
            planned = self._plan().get(node)
            if planned is not None:
                return planned[1]
        return self.versions.get(node)

    async def _restamp(self) -> None:
        """Persist new versions, then encode every snapshot with its version. A node whose write
        or encoding fails keeps its last good bytes and is retried on the next heartbeat."""
        plan = self._plan()
        self._dirty, self._pending = False, None  # a wake during the writes below counts again
        now = self.clock()
        encoded = {n: data for n, data in self._encoded.items() if n in self.intent.nodes}
        try:
            for node, (snapshot, version) in plan.items():
                previous = self.versions.get(node)
                try:
                    if version is not previous:
                        await self.store.put(version)
                        if self.versions.get(node) is previous:  # not continued meanwhile
                            self.versions[node] = version
                    stamped = msgspec.structs.replace(
                        snapshot, version=version.version, published_at=now
                    )
                    encoded[node] = encode(stamped)
                except Exception as e:
                    self._dirty = True
                    log.error("controller: node %s: version %d not published: %s",
                              node, version.version, e)  # fmt: skip
        except BaseException:  # cancelled mid-way: what was not written is still pending
            self._dirty = True
            raise
        finally:
            self._encoded = encoded
