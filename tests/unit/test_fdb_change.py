"""A change of FDB entries costs what it changes (issue 10 item 5), and changes no answer.

The incremental path (``agent.assemble`` keeps each VNI's FDB entry by entry and says what
changed since the snapshot last applied; ``agent.validate.check_fdb_change`` checks only that;
subsystems it does not concern are not planned) must refuse exactly what ``check_snapshot``
refuses, with the same ack text, and leave the data plane exactly where the whole path leaves
it. Random delta sequences, hostile entries among them (the style of test_hostile_snapshots.py:
multicast and all-zero MACs, a local tap's MAC, destinations off the mesh or not a peer,
non-canonical addresses, a MAC sent to two destinations, a VXLAN over its cap), drive an agent
with the incremental path and one without, side by side.
"""

import asyncio
import base64
import itertools
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.assemble import Assembler, build, head_for
from agent.kernel_events import NoDrift
from agent.links.applier import LinkApplier
from agent.runner import Agent, AgentConfig
from agent.validate import Rejected, check_fdb_change, check_snapshot
from bench.hollow_agents import IndexedKernel, MemoryNft, MemoryWireGuard
from schemas import limits
from schemas.codec import decode, encode
from schemas.desired import WgPeer
from schemas.wire import (
    FdbItem,
    Head,
    Item,
    Ref,
    SectionData,
    add_hash,
    digest_of,
    head_digest,
    item_hash,
    item_key,
    vni_section,
)
from tests.unit.test_hostile_snapshots import Acks
from tests.unit.test_validate import GOOD, OVERLAY_TAP, PEER, VXLAN, WG

replace = msgspec.structs.replace
VNI = vni_section(VXLAN.vni)


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


PEERS = tuple(
    replace(PEER, node=f"n{i}", public_key=key(i), allowed_ips=(f"100.64.0.{i}/32",))
    for i in range(2, 6)
)  # n2..n5 at 100.64.0.2..5; n1 (this node) is 100.64.0.1
BASE = replace(GOOD, wireguard=replace(WG, peers=PEERS))

NICS = [f"{i:012x}" for i in range(1, 9)]
MACS = [
    *(f"02:00:00:00:10:{i:02x}" for i in range(1, 5)),  # unicast
    OVERLAY_TAP.mac,  # a local tap's MAC (refused)
    "00:00:00:00:00:00",  # the flood MAC as a NIC's (refused)
    "01:00:5e:00:00:01",  # multicast (refused)
    "02:00:00:00:10:0A",  # upper case (refused)
    "02:00:00:00:10",  # not a MAC (refused)
]
DSTS = [
    *(f"100.64.0.{i}" for i in range(2, 6)),  # current peers
    "100.64.0.9",  # in the mesh, not a peer (refused)
    "10.0.0.5",  # outside the mesh (refused)
    "100.64.000.2",  # not canonical (refused)
    "100.64.0.1",  # this node's own tunnel address: not a peer (refused)
]
NODES = ["n1", "n2", "n3", "n4"]  # n1's own entries are left out of its FDB

ITEM = st.builds(
    lambda nic, node, mac, dst: FdbItem(nic=nic, node=node, mac=mac, dst=dst),
    st.sampled_from(NICS),
    st.sampled_from(NODES),
    st.sampled_from(MACS[:4] * 3 + MACS[4:]),  # valid ones more often than not
    st.sampled_from(DSTS[:4] * 3 + DSTS[4:]),
)
DELTA = st.tuples(
    st.lists(ITEM, max_size=3), st.lists(st.sampled_from(NICS), max_size=2, unique=True)
)


class Vni:
    """The controller's side of the VNI section: items by key, deltas from one version on."""

    def __init__(self, items: list[Item]):
        self.items = {item_key(i): encode(i) for i in items}
        self.version = BASE.version

    @property
    def digest(self) -> str:
        total = 0
        for blob in self.items.values():
            total = add_hash(total, item_hash(blob))
        return digest_of(total)

    def change(self, upserts: list[FdbItem], removals: list[str]) -> SectionData:
        base, self.version = self.version, self.version + 1
        ups = {item_key(i): encode(i) for i in upserts}
        gone = [k for k in removals if k not in ups]
        for key in gone:
            self.items.pop(key, None)
        self.items.update(ups)
        return SectionData(
            name=VNI,
            version=self.version,
            digest=self.digest,
            base=base,
            upserts=tuple(msgspec.Raw(b) for b in ups.values()),
            removals=tuple(gone),
        )


def start() -> tuple[Head, Vni]:
    head = head_for(BASE)
    vni = Vni([decode(bytes(u), Item) for s in head.sections if s.name == VNI for u in s.upserts])
    return head, vni


def next_head(head: Head, vni: Vni, delta: SectionData) -> Head:
    refs = tuple(Ref(r.name, vni.version, vni.digest) if r.name == VNI else r for r in head.refs)
    return replace(
        head, version=vni.version, refs=refs, digest=head_digest(refs), sections=(delta,)
    )


def passes(snap) -> bool:
    try:
        check_snapshot(snap)
    except Rejected:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DELTA, min_size=1, max_size=8))
def test_the_change_check_answers_as_the_whole_check(deltas):
    """After any delta sequence (each step's base: the last snapshot that passed, as in the
    runner), ``check_fdb_change`` says "passes" exactly when ``check_snapshot`` passes: it never
    lets through what the whole check refuses, and never sends a valid change the long way."""
    head, vni = start()
    assembler = Assembler(BASE.node)
    for section in head.sections:
        assert assembler.offer(section)
    base = assembler.snapshot(head)
    checked = check_snapshot(base)
    assembler.mark()
    for upserts, removals in deltas:
        delta = vni.change(upserts, removals)
        head = next_head(head, vni, delta)
        assert assembler.offer(delta)
        snap = assembler.snapshot(head)
        sections = {r.name: assembler.held[r.name].items.values() for r in head.refs}
        assert snap == build(BASE.node, head, sections)  # the parts kept are the whole build
        change = assembler.change()
        assert change is not None
        was, now = set(base.vxlans[0].fdb), set(snap.vxlans[0].fdb)
        got = change.get(VXLAN.name)
        assert ((got.gained, got.lost) if got else (set(), set())) == (now - was, was - now)
        assert check_fdb_change(snap, base, checked, change) == passes(snap)
        event("passes" if passes(snap) else "refused")
        if passes(snap):
            base, checked = snap, check_snapshot(snap)
            assembler.mark()


def test_the_change_check_holds_the_caps(monkeypatch):
    """A VXLAN's FDB over its cap is for the whole check to refuse (with its message)."""
    head, vni = start()
    assembler = Assembler(BASE.node)
    for section in head.sections:
        assembler.offer(section)
    base = assembler.snapshot(head)
    checked = check_snapshot(base)
    assembler.mark()
    monkeypatch.setattr(limits, "MAX_FDB_PER_VXLAN", len(base.vxlans[0].fdb))
    item = FdbItem(nic=NICS[-1], node="n3", mac=MACS[0], dst="100.64.0.3")
    head = next_head(head, vni, vni.change([item], []))
    assembler.offer(head.sections[0])
    snap = assembler.snapshot(head)
    assert not check_fdb_change(snap, base, checked, assembler.change())
    with pytest.raises(Rejected, match="more than the limit"):
        check_snapshot(snap)


class FullOnly(Agent):
    """The agent as it was: every change assembled, checked and planned whole."""

    def _fdb_change(self, snap):
        return None


class Counted(MemoryNft):
    def __init__(self, node: str):
        super().__init__(node)
        self.planned = 0

    def plan(self, desired, observed):
        self.planned += 1
        return super().plan(desired, observed)


def agent(kind: type[Agent], state: Path) -> Agent:
    state.mkdir()
    config = AgentConfig(node=BASE.node, state_dir=state)
    kernel = LinkApplier(IndexedKernel())
    mesh = MemoryWireGuard(key(1))
    return kind(Acks(), config, kernel, Counted(BASE.node), mesh, events=NoDrift())


def seen(a: Agent) -> tuple:
    published = a.nc.published  # type: ignore[attr-defined]
    ack = decode(published[-1][1], dict) if published else {}
    for moment in ("sent_at", "duration_ms"):
        ack.pop(moment, None)
    kernel = a.links.kernel.observe_now()  # type: ignore[attr-defined]
    return ack, kernel.fdb, kernel.port_fdb, a.applied, a.nft.tables


async def side_by_side(fast: Agent, full: Agent, heads, seen, quiet_after: bool = True) -> None:
    """The same HEADs to an agent with the change path and to one without (the first with its
    sections offered): the same acks and data plane after each; a refused HEAD moves nothing;
    with ``quiet_after``, the heartbeat after a HEAD finds nothing left to write."""
    for i, h in enumerate(heads):
        for a in (fast, full):
            if i == 0:
                for section in h.sections:
                    a.assembler.offer(section)
            before = seen(a)[1:]
            ack = await a.handle(encode(replace(h, sections=()) if i == 0 else h))
            assert ack is not None and (ack.ok or i)
            if not ack.ok:
                assert seen(a)[1:] == before  # refused: nothing moved
            after = await a.handle(encode(replace(h, sections=())))  # the heartbeat after
            assert not quiet_after or after.changes == 0 or not after.ok
        assert seen(fast) == seen(full), f"after HEAD {i}"
        event(f"HEAD {i}: {'ok' if seen(fast)[0].get('ok') else 'refused'}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DELTA, min_size=1, max_size=6))
def test_an_agent_answers_and_applies_every_change_as_the_whole_path(tmp_path_factory, deltas):
    """The same HEADs to an agent with the incremental path and to one without: the same acks
    (ok, version, digest, the refusal's text), the same kernel FDB and nftables, every time;
    a refused change leaves the data plane where it was."""

    async def run() -> int:
        tmp = tmp_path_factory.mktemp("agents")
        fast, full = agent(Agent, tmp / "fast"), agent(FullOnly, tmp / "full")
        head, vni = start()
        heads = [head]
        for upserts, removals in deltas:
            heads.append(next_head(heads[-1], vni, vni.change(upserts, removals)))
        await side_by_side(fast, full, heads, seen, quiet_after=False)
        return fast.nft.planned - full.nft.planned  # type: ignore[attr-defined]

    assert asyncio.run(run()) <= 0


def test_a_change_without_a_new_destination_plans_only_what_it_concerns(tmp_path):
    """One entry to a destination the VXLAN already has: nftables (whose VXLAN guard reads only
    destinations) is not planned and the next heartbeat is skipped (not a full reconcile); a new
    destination plans nftables again."""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        head, vni = start()
        for section in head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(head, sections=())))).ok
        await a.handle(encode(replace(head, sections=())))
        planned, full = a.nft.planned, a.counters["reconciled"]  # type: ignore[attr-defined]
        same_dst = FdbItem(nic=NICS[-1], node="n2", mac=MACS[1], dst="100.64.0.2")
        head = next_head(head, vni, vni.change([same_dst], []))
        ack = await a.handle(encode(head))
        assert ack.ok and ack.changes == 2  # the VXLAN entry and the bridge's port entry
        assert a.nft.planned == planned  # type: ignore[attr-defined]
        await a.handle(encode(replace(head, sections=())))
        assert a.counters["reconciled"] == full  # both heartbeats planned against the last read
        new_dst = FdbItem(nic=NICS[-2], node="n4", mac=MACS[2], dst="100.64.0.4")
        head = next_head(head, vni, vni.change([new_dst], []))
        ack = await a.handle(encode(head))
        assert ack.ok and a.nft.planned == planned + 1  # type: ignore[attr-defined]

    asyncio.run(run())


def test_the_change_path_waits_for_a_clean_base(tmp_path):
    """Nothing but a snapshot the runner assembled, checked and applied cleanly is a base: after
    a snapshot applied from elsewhere (``apply_snapshot``), the next change is checked whole."""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        head, vni = start()
        for section in head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(head, sections=())))).ok
        other = replace(BASE, wireguard=replace(BASE.wireguard, peers=PEERS[:1]))
        assert (await a.apply_snapshot(other)).ok
        assert a._fdb_change(BASE) is None
        item = FdbItem(nic=NICS[-1], node="n3", mac=MACS[0], dst="100.64.0.3")
        head = next_head(head, vni, vni.change([item], []))
        checks = []
        a._fdb_change = lambda snap: checks.append(Agent._fdb_change(a, snap))  # type: ignore[method-assign]
        ack = await a.handle(encode(head))
        assert ack.ok and checks == [None]  # checked whole

    asyncio.run(run())


def test_peer_fixture_is_what_the_mesh_check_takes():
    assert all(isinstance(p, WgPeer) for p in PEERS)
    assert passes(BASE)
    assert list(itertools.islice(DSTS, 4)) == [p.allowed_ips[0][:-3] for p in PEERS]
