"""The one contract every kernel subsystem (WireGuard, links + FDB, nftables) follows.

``desired(snapshot)`` picks the subsystem's part of a snapshot (None: nothing to do, silence
never tears down); ``observe(seen)`` reads the kernel, given the heartbeat's one rtnetlink dump
so no link is read twice; ``plan(desired, observed)`` is pure; ``apply(plan)`` writes and
returns an ``ApplyResult``. An equal state plans nothing and ``apply`` of an empty plan makes no
write, so a no-op heartbeat makes zero netlink writes.

A snapshot that only gains and loses FDB entries of the last one is not planned by a subsystem
those entries do not concern (``fdb_reads``, ``concerned``): its desired state is unchanged;
the same for the mesh's peers (``mesh_reads``) and this node's taps (``tap_reads``).

``reconcile(..., quiet=True)`` plans against the observation of the subsystem's last reconcile,
without reading the kernel, when that reconcile wrote nothing and failed nothing: the caller
says the kernel has not changed since (``agent.steady``, from kernel notifications).
"""

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from agent.errors import ApplyResult
from agent.links.model import Observed
from agent.validate import FLOOD_MAC, FdbDelta, TapDelta
from schemas.desired import Snapshot

D, Obs, P, R = TypeVar("D"), TypeVar("Obs"), TypeVar("P"), TypeVar("R")


class Subsystem(ABC, Generic[D, Obs, P, R]):
    name: str
    _quiet_observed: Any = None  # the last observation when its reconcile changed nothing
    # what ``desired`` reads of the VXLANs' FDB: "entries" (every one), "destinations" (the set
    # of each VXLAN's destinations, i.e. its flood entries: one per destination), or "nothing"
    fdb_reads = "entries"
    # whether ``desired`` reads the mesh's peers: a snapshot whose peers alone changed (a node
    # joined, left or moved) is not planned by a subsystem that does not
    mesh_reads = True
    # whether ``desired`` reads this node's taps: a change of the taps alone (a VM's NIC
    # attached or detached) is not planned by a subsystem that does not
    tap_reads = True

    def concerned(self, changes: Iterable[FdbDelta]) -> bool:
        """Whether a snapshot that differs from the last reconciled one only by these FDB
        entries gained and lost may have another ``desired`` state (see ``fdb_reads``)."""
        if self.fdb_reads == "nothing":
            return False
        if self.fdb_reads == "destinations":
            return any(e.mac == FLOOD_MAC for c in changes for e in (*c.gained, *c.lost))
        return True

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

    async def check(self, desired: D, seen: Observed | None = None) -> ApplyResult[R]:
        """A heartbeat without news (``agent.steady``): only a subsystem the kernel does not
        notify about (WireGuard) is asked, and checks itself here; by default in full."""
        return await self.reconcile(desired, seen)

    def plan_change(
        self,
        desired: D,
        observed: Obs,
        changes: Mapping[str, FdbDelta],
        taps: TapDelta | None = None,
    ) -> P | None:
        """``plan`` of a snapshot that differs from the last one planned against ``observed``
        (with nothing left to do) only by FDB entries gained and lost (and ``taps`` gained and
        lost), in work proportional to them; None: plan it whole (the default)."""
        return None

    async def reconcile(
        self,
        desired: D,
        seen: Observed | None = None,
        *,
        quiet: bool = False,
        change: Mapping[str, FdbDelta] | None = None,
        taps: TapDelta | None = None,
    ) -> ApplyResult[R]:
        """observe → plan → apply; a ``ValueError`` from ``plan`` means nothing was written.
        ``quiet``: the kernel has not changed since the last reconcile (see the docstring);
        ``change`` (quiet only): the FDB entries that alone changed since (``plan_change``), and
        ``taps``: the taps that changed too."""
        async with self.exclusive():
            observed = self._quiet_observed if quiet else None
            self._quiet_observed = None  # until this reconcile is known to change nothing
            if observed is None:
                observed = await self.observe(seen)
            plan = None
            if quiet and (change or taps):
                plan = self.plan_change(desired, observed, change or {}, taps)
            result = await self.apply(plan if plan is not None else self.plan(desired, observed))
            if not result.writes and not result.errors:
                self._quiet_observed = observed
            return result
