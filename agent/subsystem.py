"""The one contract every kernel subsystem (WireGuard, links + FDB, nftables) follows.

``desired(snapshot)`` picks the subsystem's part of a snapshot (None: nothing to do, silence
never tears down); ``observe(seen)`` reads the kernel, given the heartbeat's one rtnetlink dump
so no link is read twice; ``plan(desired, observed)`` is pure; ``apply(plan)`` writes and
returns an ``ApplyResult``. An equal state plans nothing and ``apply`` of an empty plan makes no
write, so a no-op heartbeat makes zero netlink writes.
"""

import contextlib
from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from agent.errors import ApplyResult
from agent.links.model import Observed
from schemas.desired import Snapshot

D, Obs, P, R = TypeVar("D"), TypeVar("Obs"), TypeVar("P"), TypeVar("R")


class Subsystem(ABC, Generic[D, Obs, P, R]):
    name: str

    @abstractmethod
    def desired(self, snapshot: Snapshot) -> D | None: ...

    @abstractmethod
    async def observe(self, seen: Observed | None = None) -> Obs: ...

    @abstractmethod
    def plan(self, desired: D, observed: Obs) -> P: ...

    @abstractmethod
    async def apply(self, plan: P) -> ApplyResult[R]: ...

    def exclusive(self) -> AbstractAsyncContextManager[Any]:
        """Held from observe to apply (a subsystem with a background task overrides it)."""
        return contextlib.nullcontext()

    async def reconcile(self, desired: D, seen: Observed | None = None) -> ApplyResult[R]:
        """observe → plan → apply; a ``ValueError`` from ``plan`` means nothing was written."""
        async with self.exclusive():
            return await self.apply(self.plan(desired, await self.observe(seen)))
