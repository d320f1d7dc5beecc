"""The links subsystem: bridges, taps, VXLAN devices, their addresses and VXLAN FDB entries.

``observe`` reads every managed link (one dump per heartbeat, shared with the other
subsystems), ``plan`` is ``agent.links.plan`` plus the observed ifindexes (``plan_change``: only
the FDB entries a change gained and lost, ``agent.links.plan.plan_fdb_change``, and the taps,
``plan_tap_change``), ``apply`` executes
the plan on the kernel (``agent.links.netlink.NetlinkLinks``, or a fake in the unit tests) and
reports the managed devices that exist afterwards. ``otwg0`` is left to the WireGuard subsystem,
which uses ``observe_link`` and ``apply`` for its own link work.
"""

from collections.abc import Iterable, Mapping
from typing import Protocol

from agent.errors import ApplyResult
from agent.links.model import Link, LinkPlan, Observed
from agent.links.plan import plan as plan_actions
from agent.links.plan import plan_fdb_change, plan_tap_change
from agent.subsystem import Subsystem
from agent.validate import FdbDelta, TapDelta
from schemas.desired import Snapshot


class LinkKernel(Protocol):
    async def observe(self) -> Observed: ...
    async def observe_link(self, name: str) -> Link | None: ...
    async def observe_devices(self, names: Iterable[str]) -> Observed: ...
    async def execute(self, plan: LinkPlan) -> ApplyResult[frozenset[str]]: ...


class LinkApplier(Subsystem[Snapshot, Observed, LinkPlan, frozenset[str]]):
    name = "links"
    mesh_reads = False  # otwg0 is the WireGuard subsystem's; no route or FDB reads the peers

    def __init__(self, kernel: LinkKernel):
        self.kernel = kernel
        self.applied: LinkPlan | None = None  # the last plan given to ``apply``

    def desired(self, snapshot: Snapshot) -> Snapshot:
        return snapshot

    async def observe(self, seen: Observed | None = None) -> Observed:
        return seen if seen is not None else await self.kernel.observe()

    def plan(self, desired: Snapshot, observed: Observed) -> LinkPlan:
        return LinkPlan(
            actions=tuple(plan_actions(desired, observed)),
            indexes={name: link.index for name, link in observed.links.items()},
        )

    def plan_change(
        self,
        desired: Snapshot,
        observed: Observed,
        changes: Mapping[str, FdbDelta],
        taps: TapDelta | None = None,
    ) -> LinkPlan | None:
        if taps is not None:
            actions = plan_tap_change(desired, observed, changes, taps)
        else:
            actions = plan_fdb_change(desired, observed, changes)
        if actions is None:
            return None
        return LinkPlan(
            actions=tuple(actions),
            indexes={name: link.index for name, link in observed.links.items()},
        )

    async def apply(self, plan: LinkPlan) -> ApplyResult[frozenset[str]]:
        self.applied = plan
        if not plan.actions:  # nothing to write: not even a trip to the netlink thread
            return ApplyResult(writes=0, reached=frozenset(plan.indexes))
        return await self.kernel.execute(plan)

    async def observe_link(self, name: str) -> Link | None:
        """One managed link, read now (for a device created or replaced outside this plan)."""
        return await self.kernel.observe_link(name)

    async def observe_devices(self, names: Iterable[str]) -> Observed:
        """A few managed links and their ports' bridge entries, read now (the devices a plan
        wrote, read back: ``agent.links.plan.settle``)."""
        return await self.kernel.observe_devices(names)
