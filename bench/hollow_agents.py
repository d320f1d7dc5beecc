"""Hollow agents for the scale bench: the real ``agent.runner.Agent`` on an in-memory kernel,
many in one process (like Kubernetes' kubemark).

Links and FDB live in ``tests.unit.fake_kernel.FakeKernel`` (behind the real ``LinkApplier``),
nftables and WireGuard in the two small subsystems below, which keep the real planning (rules,
digests and batch; the peer diff) and replace only the writes. Owns nothing else; it never
touches the kernel, and nothing on the path a user runs uses it.
"""

import inspect
from pathlib import Path

import msgspec

from agent.errors import ApplyResult
from agent.links.applier import LinkApplier
from agent.links.model import Observed
from agent.nft.applier import NftApplier
from agent.nft.rules import NftObserved, NftPlan
from agent.runner import Agent, AgentConfig
from agent.subsystem import Subsystem
from agent.wireguard.plan import (
    ObservedPeer,
    PeerPlan,
    normalize_allowed,
    normalize_endpoint,
    plan_peer_change,
    plan_peers,
    validate,
)
from schemas.desired import Snapshot, WireGuard
from schemas.intent import Node
from schemas.naming import WIREGUARD_IFNAME, WIREGUARD_PORT
from tests.unit.fake_kernel import FakeKernel


class IndexedKernel(FakeKernel):
    """The fake kernel with an ifindex on every link, as a real dump has: an FDB-only write is
    then known from its echoes (``agent.links.plan.advance``) and the next heartbeat is not a
    full reconcile, as on a real agent."""

    def __init__(self) -> None:
        super().__init__()
        self._indexes = 0

    def observe_now(self) -> Observed:
        for name, link in self.links.items():
            if not link.index:
                self._indexes += 1
                self.links[name] = msgspec.structs.replace(link, index=self._indexes)
        return super().observe_now()


class MemoryNft(NftApplier):
    """The real nftables planning (rules, digest, the JSON batch) on tables held in memory: no
    ``nft`` process, no sysctl."""

    def __init__(self, node: str):
        super().__init__(node=node)
        self.tables = NftObserved(exists=False, digest=None, rule_count=0, forwarding=False)
        self._sets: dict[str, tuple[str, ...]] = {}

    async def observe(self, seen: Observed | None = None) -> NftObserved:
        return self.tables

    def plan(self, desired, observed: NftObserved) -> NftPlan:
        # the kernel would hold the sets the batch loads; without them every heartbeat reloads
        self._sets = {k: tuple(sorted(v)) for k, v in desired.sets.items()}
        return super().plan(desired, observed)

    async def apply(self, plan: NftPlan) -> ApplyResult[NftObserved]:
        writes = int(plan.enable_forwarding) + (plan.load is not None)
        if writes:
            self.tables = NftObserved(
                exists=plan.digest is not None,
                digest=plan.digest,
                rule_count=plan.rule_count,
                forwarding=bool(plan.enable_forwarding or self.tables.forwarding),
                sets=self._sets if plan.digest is not None else {},
            )
        return ApplyResult(writes, self.tables)


class MemoryWireGuard(
    Subsystem[WireGuard, tuple[ObservedPeer, ...], tuple[PeerPlan, WireGuard], frozenset[str]]
):
    """``otwg0`` in memory: the real peer diff (``agent.wireguard.plan.plan_peers``) against the
    peers last applied; no device, no key material beyond the public key the node registered."""

    name = "wireguard"
    backend_name = "memory"

    def __init__(self, public_key: str):
        self.public_key = public_key
        self.peers_now: tuple[ObservedPeer, ...] = ()
        self._checked: tuple[WireGuard, ApplyResult] | None = None

    async def check(self, desired: WireGuard, seen: Observed | None = None) -> ApplyResult:
        """Nothing changes memory behind the agent's back: the real agent's check is one UAPI
        read compared as bytes; here it is "the same desired state as last checked"."""
        if self._checked is not None and (
            desired is self._checked[0] or desired == self._checked[0]
        ):
            return self._checked[1]
        result = await self.reconcile(desired, seen)
        self._checked = None if result.errors else (desired, ApplyResult(0, result.reached))
        return result

    def desired(self, snapshot: Snapshot) -> WireGuard | None:
        return snapshot.wireguard

    async def observe(self, seen: Observed | None = None) -> tuple[ObservedPeer, ...]:
        return self.peers_now

    def plan(
        self, desired: WireGuard, observed: tuple[ObservedPeer, ...]
    ) -> tuple[PeerPlan, WireGuard]:
        validate(desired)
        return plan_peers(desired.peers, observed, self.public_key), desired

    async def apply(self, plan: tuple[PeerPlan, WireGuard]) -> ApplyResult[frozenset[str]]:
        peers, desired = plan
        if peers.writes:
            self.peers_now = tuple(
                ObservedPeer(
                    public_key=p.public_key,
                    endpoint=normalize_endpoint(p.endpoint),
                    allowed_ips=frozenset(normalize_allowed(p.allowed_ips)),
                )
                for p in desired.peers
                if p.public_key != self.public_key
            )
        result = ApplyResult(writes=peers.writes, reached=frozenset({WIREGUARD_IFNAME}))
        # as the real one: a plan with nothing to do says the device holds ``desired``
        self._checked = None if peers.writes else (desired, result)
        return result

    async def apply_change(self, desired: WireGuard, base, gained, lost) -> ApplyResult | None:
        """The touched peers only (``plan_peer_change``), when memory holds ``base``."""
        if self._checked is None or not (base is self._checked[0] or base == self._checked[0]):
            return None
        peers = plan_peer_change(gained, lost, self.public_key)
        now = {p.public_key: p for p in self.peers_now}
        for key in peers.remove:
            del now[key]
        for p in (*peers.add, *peers.update):
            now[p.public_key] = ObservedPeer(
                public_key=p.public_key,
                endpoint=p.endpoint,
                allowed_ips=frozenset(p.allowed_ips or ()),
            )
        self.peers_now = tuple(now.values())
        self._checked = None  # the next check plans whole, as the real one verifies its write
        return ApplyResult(writes=peers.writes, reached=frozenset({WIREGUARD_IFNAME}))

    async def peers(self) -> list:
        return []


def hollow_agent(nc, node: Node, state_dir: Path) -> Agent:
    """The real ``agent.runner.Agent`` for ``node`` on an in-memory kernel (links and FDB in
    ``tests.unit.fake_kernel``, nftables and WireGuard above); it registers with the address
    and key the store already holds, so registering changes nothing."""
    assert node.wg_public_key is not None
    config = AgentConfig(
        node=node.name,
        state_dir=state_dir,
        underlay_ip=node.underlay_ip,
        wg_listen_port=node.wg_listen_port or WIREGUARD_PORT,
    )
    return Agent(
        nc,
        config,
        LinkApplier(IndexedKernel()),
        MemoryNft(node.name),
        MemoryWireGuard(node.wg_public_key),
        **_no_drift(),
    )


def _no_drift() -> dict:
    """An agent that takes kernel notifications gets "nothing changes behind you" (true of an
    in-memory kernel), so it runs its shipped steady-state path; older agents take none."""
    try:
        from agent.kernel_events import NoDrift
    except ImportError:
        return {}
    return {"events": NoDrift()} if "events" in inspect.signature(Agent).parameters else {}
