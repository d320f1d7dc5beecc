"""The running controller: composes the API, the publisher, ack ingestion and the lease around one
intent in memory and one lock, and owns their life cycle, as leader or as follower.

Every controller serves the read endpoints and ingests acks and health. The one holding the
lease (``controller.lease``) also serves the write endpoints and ``section.get`` and runs the
publisher; on becoming leader it reloads the whole intent and the versions' high-water mark, so
it continues above every version the previous leader may have sent. A follower keeps its copy of
intent current by watching the bucket and, before answering a read, catches up with the bucket's
last write (a client reads its own acknowledged writes whichever controller answers).

Nothing else lives here: handlers are ``controller.api``, the heartbeat ``controller.publisher``,
lease decisions ``controller.lease``, fencing ``controller.store``, metrics and readiness
``controller.metrics`` (this module only hands them its parts). It must never grow logic of its
own beyond start, stop and the change of role.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.micro.service import Service

from controller.acks import Acks
from controller.api import Api, stale_after
from controller.compute import ClusterConfig
from controller.lease import Lease, Timing
from controller.metrics import ControllerMetrics, age, readiness
from controller.publisher import Publisher
from controller.store import Store
from controller.tracker import Tracker
from schemas import api as api_schema
from schemas.bus import cancel_and_wait
from schemas.codec import decode
from schemas.intent import Generation, Intent, NodeVersion, NodeVersions

log = logging.getLogger(__name__)

CATCH_UP = 1.0  # seconds a follower waits for its copy to reach the bucket's last write


class Controller:
    def __init__(
        self,
        nc: Client,
        store: Store,
        config: ClusterConfig,
        clock: Callable[[], float] = time.time,
        instance: str = "otherix-controller",
        metrics: ControllerMetrics | None = None,
    ):
        self.nc, self.store, self.config, self.clock = nc, store, config, clock
        self.instance = instance
        self.metrics = metrics or ControllerMetrics()
        # One intent object shared by all parts and never rebound: loads go into it.
        self.intent = Intent()
        self.tracker = Tracker()
        self.lock = asyncio.Lock()
        self.lease = Lease(store, instance, Timing(config.heartbeat_interval))
        self.publisher = self._new_publisher()
        self.acks = Acks(self.intent, self.tracker, self.publisher, clock, self.metrics.refused)
        self.api = Api(
            store, config, self.intent, self.tracker, self.publisher, self.lock, clock,
            self.acks.refused, self.metrics,
        )  # fmt: skip
        self.api.leader = lambda: self.lease.leader
        self.acks.follower_bound = lambda: None  # acks wait for a role (controller.acks)
        self._saved: dict[str, NodeVersion] = {}  # a follower's view of the nodes' versions
        self._reserved = 0  # a follower's view of the leader's versions mark
        self._caught_up = asyncio.Event()
        self._follow_from: int | None = None  # the bucket's last sequence as following began
        self._tasks: list[asyncio.Task] = []
        self._role_tasks: list[asyncio.Task] = []  # the publisher's (leader) or the watch's
        self._services: list[Service] = []
        self._write_service: Service | None = None
        self._subs: list[Any] = []

    @property
    def versions(self) -> Mapping[str, NodeVersion]:
        return self.publisher.versions

    @property
    def stale_after(self) -> float:
        return stale_after(self.config)

    @property
    def leading(self) -> bool:
        return self._write_service is not None

    def _new_publisher(self) -> Publisher:
        return Publisher(
            self.nc, self.store, self.config, self.intent, self.lock, self.clock,
            may_publish=lambda: self.lease.holds(time.monotonic()), metrics=self.metrics,
        )  # fmt: skip

    async def start(self) -> None:
        self._subs = await self.acks.subscribe(self.nc)
        if await self.lease.try_acquire(time.monotonic()):
            await self._lead()  # writes first: once status answers, they answer too
        else:
            await self._follow()
        self._services.append(await self.api.serve(self.nc, api_schema.READ_ENDPOINTS))
        self._tasks.append(asyncio.create_task(self._campaign(), name="lease"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self.leading:
            await self._stop_leading()
            try:
                # a renewal cut short by the cancel above may have landed (its ack unread): renew
                # once more, so the fence is our last write again and the save and release land
                await self.lease.renew(time.monotonic())
            except Exception as e:
                log.warning("controller: lease not renewed at stop: %s", e)
            try:
                await self.publisher.close()
            except Exception as e:  # the bus may be gone already: versions are a nicety
                log.warning("controller: node versions not saved at stop: %s", e)
            try:
                await self.lease.release()  # a follower takes over at once
            except Exception as e:  # the lease then expires
                log.warning("controller: lease not released at stop: %s", e)
        await self._stop_role()
        for service in self._services:
            await service.stop()
        for sub in self._subs:
            await sub.unsubscribe()

    async def publish_all(self) -> None:
        await self.publisher.publish_all()

    # --- probes (schemas.probes) ----------------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why this controller is not ready to serve (None: it is)."""
        following = any(not t.done() for t in self._role_tasks) and not self.leading
        behind = None if self._follow_from is None else self._follow_from - self.store.followed
        return readiness(
            self.nc.is_connected, self.leading, age(self.publisher.heartbeat_at),
            self.stale_after, following, behind,
        )  # fmt: skip

    def refresh_metrics(self) -> None:
        """The gauges read at a scrape: nodes by state, the highest desired version."""
        desired = self.versions if self.leading else self._saved
        # the lease, not the write service: a leader woken from a freeze reads 0 at once
        self.metrics.leader.set(int(self.leading and self.lease.holds(time.monotonic())))
        self.metrics.refresh(
            self.intent.nodes.values(), self.tracker, desired, self.clock(), self.stale_after
        )

    # --- roles ----------------------------------------------------------------------------------

    async def _campaign(self) -> None:
        """Renew twice a heartbeat while leading; look at the lease often while following."""
        step_at = time.monotonic()
        while True:
            timing = self.lease.timing
            # at a fixed rate, not a fixed pause: a slow step must not push renewals apart
            step_at += timing.renew if self.leading else timing.poll
            step_at = max(step_at, time.monotonic())
            await asyncio.sleep(step_at - time.monotonic())
            try:
                await self._step()
            except Exception as e:  # the bus is away: retried next step
                log.warning("controller %s: lease step failed: %s", self.instance, e)

    async def _step(self) -> None:
        now = time.monotonic()
        if self.leading:
            try:
                renewed = await self.lease.renew(now)
            except Exception:
                if self.lease.holds(time.monotonic()):
                    raise  # still ours for a while: try again next heartbeat
                renewed = False  # expired unrenewed: another may lead by now
            if not renewed:
                log.warning("controller %s: lease lost; following", self.instance)
                self.lease.lost()
                await self._stop_leading()
                await self._follow()
        elif await self.lease.try_acquire(now):
            await self._stop_role()
            await self._lead()
        elif all(task.done() for task in self._role_tasks):  # the watch ended (or never began)
            await self._stop_role()
            await self._follow()

    async def _load(self) -> tuple[int, NodeVersions, dict[str, NodeVersion]]:
        intent, versions = await self.store.load()
        for mine, loaded in (
            (self.intent.networks, intent.networks),
            (self.intent.nics, intent.nics),
            (self.intent.nodes, intent.nodes),
        ):
            mine.clear()
            mine.update(loaded)
        reserved, saved = await self.store.generation()
        return reserved, saved, versions

    async def _lead(self) -> None:
        async with self.lock:
            reserved, saved, versions = await self._load()
            self.publisher = self._new_publisher()
            self.publisher.start_from(reserved, versions, saved)
            self.api.publisher = self.acks.publisher = self.publisher
            self.acks.follower_bound = None
            self.api.desired = self.publisher.desired
            self.api.catch_up = None
        writes = tuple(e for e in api_schema.ENDPOINTS if e not in api_schema.READ_ENDPOINTS)
        self._write_service = await self.api.serve(self.nc, writes)
        self._role_tasks.append(asyncio.create_task(self.publisher.run(), name="heartbeat"))
        self.metrics.leader.set(1)
        log.info(
            # "loaded …": bench scale reads this line to catch a short load of the store
            "controller %s: leading (versions above %d); loaded %d networks, %d NICs, %d nodes",
            self.instance, self.publisher.model.generation, len(self.intent.networks),
            len(self.intent.nics), len(self.intent.nodes),
        )  # fmt: skip

    async def _stop_leading(self) -> None:
        self.metrics.leader.set(0)
        self.publisher.stop()
        await self._stop_role()
        if self._write_service is not None:
            service, self._write_service = self._write_service, None
            await service.stop()

    async def _follow(self) -> None:
        """Reload everything, then keep it current from the bucket's watch."""
        self._follow_from = None
        self.acks.follower_bound = lambda: None  # a deposed leader's versions no longer bound
        async with self.lock:
            self._reserved, saved, _ = await self._load()
            self.acks.follower_bound = lambda: self._reserved
            self._saved = {n: NodeVersion(node=n, version=v, digest=d) for n, (v, d) in saved.nodes.items()}  # fmt: skip
            self.api.desired = self._saved.get
            self.api.catch_up = self._catch_up
        self._follow_from = await self.store.last_sequence()  # ready once the copy is past it
        self._role_tasks.append(
            asyncio.create_task(self.store.follow(self.intent, self._followed), name="follow")
        )

    async def _stop_role(self) -> None:
        tasks, self._role_tasks = self._role_tasks, []
        await cancel_and_wait(tasks)

    def _followed(self, key: str, value: bytes | None) -> None:
        if key == "generation.reserved" and value is not None:
            with contextlib.suppress(msgspec.DecodeError):
                self._reserved = max(self._reserved, decode(value, Generation).reserved)
        if key == "generation.nodes" and value is not None:
            try:
                saved = decode(value, NodeVersions)
            except msgspec.DecodeError:
                return
            self._saved.clear()
            self._saved.update(
                {n: NodeVersion(node=n, version=v, digest=d) for n, (v, d) in saved.nodes.items()}
            )
        self._caught_up.set()

    async def _catch_up(self) -> None:
        """Until our copy includes the bucket's last write (at most ``CATCH_UP`` seconds)."""
        last = await self.store.last_sequence()
        try:
            async with asyncio.timeout(CATCH_UP):
                while self.store.followed < last:
                    self._caught_up.clear()
                    await self._caught_up.wait()
        except TimeoutError:
            log.warning("controller %s: answering from a copy behind the bucket", self.instance)
