"""The running controller: composes the API, the publisher and ack ingestion around one intent in
memory (written through to the store) and one lock, and owns their life cycle.

Nothing else lives here: handlers are ``controller.api``, the heartbeat ``controller.publisher``,
versions ``controller.versions``, acks and health ``controller.acks``. It must never grow logic
of its own beyond start and stop.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from nats.aio.client import Client
from nats.micro.service import Service

from controller.acks import Acks
from controller.api import Api, stale_after
from controller.compute import ClusterConfig
from controller.publisher import Publisher
from controller.store import Store
from controller.tracker import Tracker
from schemas.intent import Intent, NodeVersion

log = logging.getLogger(__name__)


class Controller:
    def __init__(
        self,
        nc: Client,
        store: Store,
        config: ClusterConfig,
        clock: Callable[[], float] = time.time,
    ):
        self.nc, self.store, self.config, self.clock = nc, store, config, clock
        # One intent object shared by all parts and never rebound: start() loads into it.
        self.intent = Intent()
        self.tracker = Tracker()
        lock = asyncio.Lock()
        self.publisher = Publisher(nc, store, config, self.intent, lock, clock)
        self.acks = Acks(self.intent, self.tracker, self.publisher, clock)
        self.api = Api(
            store, config, self.intent, self.tracker, self.publisher, lock, clock, self.acks.refused
        )
        self._tasks: list[asyncio.Task] = []
        self._service: Service | None = None
        self._subs: list[Any] = []

    @property
    def versions(self) -> Mapping[str, NodeVersion]:
        return self.publisher.versions

    @property
    def stale_after(self) -> float:
        return stale_after(self.config)

    async def start(self) -> None:
        intent, versions = await self.store.load()
        self.intent.networks.update(intent.networks)
        self.intent.nics.update(intent.nics)
        self.intent.nodes.update(intent.nodes)
        reserved, saved = await self.store.generation()
        self.publisher.start_from(reserved, versions, saved)
        log.info(
            "controller: loaded %d networks, %d NICs, %d nodes",
            len(self.intent.networks),
            len(self.intent.nics),
            len(self.intent.nodes),
        )
        self._subs = await self.acks.subscribe(self.nc)
        self._service = await self.api.serve(self.nc)
        self._tasks.append(asyncio.create_task(self.publisher.run(), name="heartbeat"))

    async def stop(self) -> None:
        self.publisher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.publisher.close()
        except Exception as e:  # the bus may be gone already: versions are a nicety, not state
            log.warning("controller: node versions not saved at stop: %s", e)
        if self._service is not None:
            await self._service.stop()
        for sub in self._subs:
            await sub.unsubscribe()

    async def publish_all(self) -> None:
        await self.publisher.publish_all()
