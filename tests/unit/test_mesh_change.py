"""A change of the mesh costs what it changes (issue 10 item 5), and changes no answer.

A node joining, leaving or moving (a new underlay address, key or port) gives every other agent
one peer gained, lost or changed. The change path (``agent.assemble`` keeps the mesh peer by
peer and says which peers changed since the snapshot last applied;
``agent.validate.check_change`` checks only those; WireGuard sets only those peers,
``agent.wireguard.plan.plan_peer_change``; links and nftables, which do not read the peers, are
not planned) must refuse exactly what ``check_snapshot`` refuses, with the same ack text, and
leave the data plane exactly where the whole path leaves it. Random delta sequences of the mesh
(and of the FDB riding on it), hostile peers among them (a duplicate key, tunnel address or
underlay address of an existing peer, this node's own key or tunnel address, a wider or foreign
allowed IP, bad endpoints, too many allowed IPs, a peer removed while the FDB still sends to it),
drive an agent with the change path and one without, side by side.
"""

import asyncio
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.assemble import Assembler, build, head_for
from agent.kernel_events import NoDrift
from agent.links.applier import LinkApplier
from agent.runner import Agent, AgentConfig
from agent.validate import Checked, check_change, check_snapshot
from agent.wireguard import keys as wgkeys
from agent.wireguard.applier import _steady_part, verified
from agent.wireguard.plan import ObservedPeer, normalize_allowed, plan_peer_change, plan_peers
from bench.hollow_agents import IndexedKernel, MemoryWireGuard
from schemas import limits
from schemas.codec import decode, encode
from schemas.desired import Snapshot, WgPeer
from schemas.wire import (
    MESH_SECTION,
    FdbItem,
    Head,
    Item,
    PeerItem,
    Ref,
    SectionData,
    add_hash,
    digest_of,
    head_digest,
    item_hash,
    item_key,
)
from tests.unit.test_fdb_change import (
    BASE,
    NICS,
    VNI,
    Counted,
    FullOnly,
    key,
    passes,
    side_by_side,
)
from tests.unit.test_hostile_snapshots import Acks

replace = msgspec.structs.replace
OWN_KEY = key(1)  # this node's (n1's) public key; its tunnel address is 100.64.0.1

NODES = ["n1", "n2", "n3", "n6", "n7", "n8", "Bad Node"]  # n1: this node (left out)
KEYS = [key(2), key(3), key(6), key(7), key(8), OWN_KEY, "bm90IGEga2V5", key(2)[:-2] + "=="]
ENDPOINTS = [
    *(f"198.18.0.{i}:51820" for i in (2, 3, 6, 7)),  # valid (and shared by two peers: allowed)
    "198.18.0.2:51821",  # another port
    "127.0.0.1:51820",  # loopback (refused)
    "100.64.0.9:51820",  # inside the mesh it would carry (refused)
    "198.18.0.2:0",  # port 0 (refused)
    "198.18.0.02:51820",  # not canonical (refused)
    "198.18.0.2",  # no port (refused)
]
ADDRESSES = [
    *(f"100.64.0.{i}/32" for i in (2, 3, 4, 5, 6, 7, 8)),  # valid, some held by other peers
    "100.64.0.1/32",  # this node's own tunnel address (refused)
    "100.64.0.8/31",  # wider than one address (refused)
    "10.9.0.1/32",  # outside the mesh (refused)
    "100.64.0.07/32",  # not canonical (refused)
]
HOSTILE = st.builds(
    lambda node, key_, endpoint, ips: PeerItem(
        node=node, public_key=key_, endpoint=endpoint, allowed_ips=tuple(ips)
    ),
    st.sampled_from(NODES[:6] * 3 + NODES[6:]),
    st.sampled_from(KEYS[:5] * 3 + KEYS[5:]),
    st.sampled_from(ENDPOINTS[:5] * 3 + ENDPOINTS[5:]),
    st.lists(st.sampled_from(ADDRESSES[:7] * 3 + ADDRESSES[7:]), min_size=0, max_size=3),
)
# a node joining, moving (another endpoint) or rotating its key, as the controller sends it
FAIR = st.builds(
    lambda n, rotated, endpoint: PeerItem(
        node=f"n{n}",
        public_key=key(n + 20 * rotated),
        endpoint=endpoint,
        allowed_ips=(f"100.64.0.{n}/32",),
    ),
    st.sampled_from([3, 4, 5, 6, 7, 8]),
    st.booleans(),
    st.sampled_from(ENDPOINTS[:5]),
)
PEER = st.one_of(FAIR, FAIR, HOSTILE)
FDB = st.builds(
    lambda nic, node, dst: FdbItem(nic=nic, node=node, mac=f"02:00:00:00:20:{nic[-2:]}", dst=dst),
    st.sampled_from(NICS),
    st.sampled_from(["n2", "n3", "n6"]),
    st.sampled_from([f"100.64.0.{i}" for i in (2, 3, 4, 5, 6, 7)]),
)
PEER_ITEM = PeerItem(node="n2", public_key=key(2), endpoint="198.18.0.2:51820", allowed_ips=())
FDB_ITEM = FdbItem(nic=NICS[0], node="n2", mac="02:00:00:00:20:01", dst="100.64.0.2")
# one step: peers upserted and removed (by node), FDB items upserted and removed (by NIC)
STEP = st.tuples(
    st.lists(PEER, max_size=2),
    st.lists(st.sampled_from(NODES[1:]), max_size=1),
    st.lists(FDB, max_size=1),
    st.lists(st.sampled_from(NICS), max_size=1),
)


class Section:
    """The controller's side of one section: items by key, deltas from one version on."""

    def __init__(self, name: str, items: list[Item], version: int):
        self.name, self.version = name, version
        self.items = {item_key(i): encode(i) for i in items}

    @property
    def digest(self) -> str:
        total = 0
        for blob in self.items.values():
            total = add_hash(total, item_hash(blob))
        return digest_of(total)

    def change(self, version: int, upserts: list[Item], removals: list[str]) -> SectionData:
        base, self.version = self.version, version
        ups = {item_key(i): encode(i) for i in upserts}
        gone = [k for k in removals if k not in ups]
        for k in gone:
            self.items.pop(k, None)
        self.items.update(ups)
        return SectionData(
            name=self.name,
            version=version,
            digest=self.digest,
            base=base,
            upserts=tuple(msgspec.Raw(b) for b in ups.values()),
            removals=tuple(gone),
        )


class Controller:
    """HEADs after ``BASE``'s: each step a delta of the mesh and/or the VNI section."""

    def __init__(self):
        self.head = head_for(BASE)
        self.sections = {
            s.name: Section(s.name, [decode(bytes(u), Item) for u in s.upserts], s.version)
            for s in self.head.sections
        }

    def step(self, peers, gone, fdb, fdb_gone) -> Head:
        version = self.head.version + 1
        deltas = []
        if peers or gone:
            removals = [item_key(replace(PEER_ITEM, node=n)) for n in gone]
            deltas.append(self.sections[MESH_SECTION].change(version, peers, removals))
        if fdb or fdb_gone:
            removals = [item_key(replace(FDB_ITEM, nic=n)) for n in fdb_gone]
            deltas.append(self.sections[VNI].change(version, fdb, removals))
        by_name = {d.name: d for d in deltas}
        refs = tuple(
            Ref(r.name, by_name[r.name].version, by_name[r.name].digest) if r.name in by_name else r
            for r in self.head.refs
        )
        self.head = replace(
            self.head, version=version, refs=refs, digest=head_digest(refs), sections=tuple(deltas)
        )
        return self.head


def started(head) -> tuple[Assembler, Snapshot, Checked]:
    """An assembler holding ``head``'s sections, the snapshot they make (the base of the first
    change, marked) and its whole check."""
    assembler = Assembler(BASE.node)
    for section in head.sections:
        assert assembler.offer(section)
    base = assembler.snapshot(head)
    checked = check_snapshot(base)
    assembler.mark()
    return assembler, base, checked


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=8))
def test_the_change_check_answers_as_the_whole_check(steps):
    """After any sequence of mesh and FDB deltas (each step's base: the last snapshot that
    passed, as in the runner), ``check_change`` says "passes" exactly when ``check_snapshot``
    passes, and then returns what ``check_snapshot`` returns; the peers it reports are the
    difference of the two snapshots' peers."""
    controller = Controller()
    assembler, base, checked = started(controller.head)
    for step in steps:
        head = controller.step(*step)
        for delta in head.sections:
            assert assembler.offer(delta)
        snap = assembler.snapshot(head)
        sections = {r.name: assembler.held[r.name].items.values() for r in head.refs}
        assert snap == build(BASE.node, head, sections)  # the peers kept are the whole build
        fdb = assembler.change()
        assert fdb is not None
        mesh = assembler.mesh_change()
        was, now = set(base.wireguard.peers), set(snap.wireguard.peers)
        assert (mesh.gained, mesh.lost) == (now - was, was - now)
        got = check_change(snap, base, checked, fdb, mesh)
        assert (got is not None) == passes(snap)
        event("passes" if got is not None else "refused")
        if mesh.gained or mesh.lost:
            event("the mesh changed")
        if got is not None:
            assert got == check_snapshot(snap)
            base, checked = snap, got
            assembler.mark()


def test_the_change_check_holds_the_peer_caps(monkeypatch):
    """Over the peer cap, or a peer over its allowed-IP cap: for the whole check to refuse."""
    controller = Controller()
    assembler = Assembler(BASE.node)
    for section in controller.head.sections:
        assembler.offer(section)
    base = assembler.snapshot(controller.head)
    checked = check_snapshot(base)
    assembler.mark()
    monkeypatch.setattr(limits, "MAX_PEERS", len(base.wireguard.peers))
    joined = PeerItem(node="n6", public_key=key(6), endpoint="198.18.0.6:51820",
                      allowed_ips=("100.64.0.6/32",))  # fmt: skip
    head = controller.step([joined], [], [], [])
    assembler.offer(head.sections[0])
    snap = assembler.snapshot(head)
    assert check_change(snap, base, checked, assembler.change(), assembler.mesh_change()) is None
    assert not passes(snap)
    monkeypatch.setattr(limits, "MAX_PEERS", 100)
    monkeypatch.setattr(limits, "MAX_ALLOWED_IPS_PER_PEER", 0)
    assert check_change(snap, base, checked, assembler.change(), assembler.mesh_change()) is None
    assert not passes(snap)


PLAN_PEERS = st.lists(
    st.builds(
        lambda k, ep, ips: WgPeer(public_key=key(k), endpoint=ep, allowed_ips=tuple(ips)),
        st.integers(1, 8),
        st.sampled_from(ENDPOINTS[:5]),
        st.lists(st.sampled_from(ADDRESSES[:7]), max_size=2),
    ),
    max_size=6,
    unique_by=lambda p: p.public_key,
)


def device_after(observed: dict[str, ObservedPeer], plan) -> dict[str, ObservedPeer]:
    """What a UAPI set of ``plan`` leaves on a device holding ``observed``."""
    now = dict(observed)
    for k in plan.remove:
        now.pop(k, None)
    for c in (*plan.update, *plan.add):
        old = now.get(c.public_key)
        now[c.public_key] = ObservedPeer(
            public_key=c.public_key,
            endpoint=c.endpoint if c.endpoint is not None else (old and old.endpoint),
            allowed_ips=frozenset(c.allowed_ips)
            if c.allowed_ips is not None
            else (old.allowed_ips if old else frozenset()),
        )
    return now


def observed(peers) -> dict[str, ObservedPeer]:
    return {
        p.public_key: ObservedPeer(
            public_key=p.public_key,
            endpoint=p.endpoint,
            allowed_ips=frozenset(normalize_allowed(p.allowed_ips)),
        )
        for p in peers
        if p.public_key != OWN_KEY
    }


@settings(max_examples=300, deadline=None)
@given(PLAN_PEERS, PLAN_PEERS)
def test_the_peer_change_plan_reaches_what_the_whole_plan_reaches(before, after):
    """From a device holding the peers before, the touched peers' writes reach the peers after,
    as the whole diff does; it names no peer that did not change, and never our own key."""
    was, now = set(before), set(after)
    plan = plan_peer_change(now - was, was - now, OWN_KEY)
    whole = plan_peers(after, tuple(observed(before).values()), OWN_KEY)
    assert device_after(observed(before), plan) == device_after(observed(before), whole)
    assert device_after(observed(before), plan) == observed(after)
    touched = {p.public_key for p in was ^ now}
    named = {c.public_key for c in (*plan.add, *plan.update)} | set(plan.remove)
    assert named <= touched - {OWN_KEY}


def agent(kind: type[Agent], state: Path) -> Agent:
    state.mkdir()
    config = AgentConfig(node=BASE.node, state_dir=state)
    return kind(Acks(), config, LinkApplier(IndexedKernel()), Counted(BASE.node),
                MemoryWireGuard(OWN_KEY), events=NoDrift())  # fmt: skip


def seen(a: Agent) -> tuple:
    published = a.nc.published  # type: ignore[attr-defined]
    ack = decode(published[-1][1], dict) if published else {}
    for moment in ("sent_at", "duration_ms", "changes"):
        ack.pop(moment, None)
    kernel = a.links.kernel.observe_now()  # type: ignore[attr-defined]
    peers = frozenset(a.wireguard.peers_now)  # type: ignore[union-attr]
    return ack, peers, kernel.fdb, kernel.port_fdb, a.applied, a.nft.tables


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=6))
def test_an_agent_answers_and_applies_every_mesh_change_as_the_whole_path(tmp_path_factory, steps):
    """The same HEADs to an agent with the change path and to one without: the same acks (ok,
    version, digest, the refusal's text), the same WireGuard peers, FDB and nftables, every
    time; a refused change leaves the data plane where it was; the heartbeat after a change
    finds nothing left to write."""

    async def run() -> None:
        tmp = tmp_path_factory.mktemp("agents")
        fast, full = agent(Agent, tmp / "fast"), agent(FullOnly, tmp / "full")
        controller = Controller()
        heads = [controller.head]
        heads += [controller.step(*step) for step in steps]
        await side_by_side(fast, full, heads, seen)
        event(f"mesh changes by the change path: {min(fast.counters['mesh_changes'], 3)}+")

    asyncio.run(run())


def test_a_node_joining_and_leaving_is_applied_by_the_change_path(tmp_path):
    """One peer joins, then leaves: each is checked by the change path, WireGuard sets that one
    peer (no diff over the others), and links and nftables are not planned at all. (On the code
    before the mesh change path, both went the whole way: checked whole, every subsystem
    planned.)"""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        controller = Controller()
        for section in controller.head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(controller.head, sections=())))).ok
        await a.handle(encode(replace(controller.head, sections=())))
        planned, full = a.nft.planned, a.counters["reconciled"]  # type: ignore[attr-defined]
        wg_plans: list = []
        whole_plan = a.wireguard.plan  # type: ignore[union-attr]
        a.wireguard.plan = lambda *args: wg_plans.append(1) or whole_plan(*args)  # type: ignore[union-attr,method-assign]
        links_plans: list = []
        links_plan = a.links.plan
        a.links.plan = lambda *args: links_plans.append(1) or links_plan(*args)  # type: ignore[method-assign]
        joined = PeerItem(node="n6", public_key=key(6), endpoint="198.18.0.6:51820",
                          allowed_ips=("100.64.0.6/32",))  # fmt: skip
        ack = await a.handle(encode(controller.step([joined], [], [], [])))
        assert ack.ok and ack.changes == 1  # one peer set
        assert (wg_plans, links_plans, a.nft.planned) == ([], [], planned)  # type: ignore[attr-defined]
        assert a.counters["mesh_changes"] == 1
        assert key(6) in {p.public_key for p in a.wireguard.peers_now}  # type: ignore[union-attr]
        # the heartbeat after verifies WireGuard whole (as after any write), and nothing else
        after = await a.handle(encode(replace(controller.head, sections=())))
        assert after.ok and after.changes == 0 and len(wg_plans) == 1 and not links_plans
        ack = await a.handle(encode(controller.step([], ["n6"], [], [])))
        assert ack.ok and ack.changes == 1 and a.counters["mesh_changes"] == 2
        assert key(6) not in {p.public_key for p in a.wireguard.peers_now}  # type: ignore[union-attr]
        assert not links_plans and a.nft.planned == planned  # type: ignore[attr-defined]
        assert a.counters["reconciled"] == full  # no full read of the kernel either

    asyncio.run(run())


def test_a_peer_the_fdb_still_sends_to_is_refused_with_the_whole_checks_text(tmp_path):
    """Removing the peer an FDB entry sends to is not for the change path to judge: the whole
    check refuses it, with its message, and nothing moves."""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        controller = Controller()
        for section in controller.head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(controller.head, sections=())))).ok
        before = seen(a)[1:]
        ack = await a.handle(encode(controller.step([], ["n2"], [], [])))
        assert not ack.ok and "is not a current peer's tunnel address" in ack.error
        assert seen(a)[1:] == before and a.counters["mesh_changes"] == 0

    asyncio.run(run())


@pytest.mark.parametrize("drifted", [False, True])
def test_wireguard_sets_only_the_touched_peers_when_it_knows_its_device(tmp_path, drifted):
    """The memory device stands for wireguard-go: with the device as last checked, the change
    sets one peer; after drift (a peer removed by hand), WireGuard plans whole and repairs."""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        controller = Controller()
        for section in controller.head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(controller.head, sections=())))).ok
        await a.handle(encode(replace(controller.head, sections=())))
        wg = a.wireguard
        if drifted:
            wg.peers_now = wg.peers_now[1:]  # type: ignore[union-attr]
            wg._checked = None  # type: ignore[union-attr]  # as wireguard-go's answer differs
        joined = PeerItem(node="n6", public_key=key(6), endpoint="198.18.0.6:51820",
                          allowed_ips=("100.64.0.6/32",))  # fmt: skip
        ack = await a.handle(encode(controller.step([joined], [], [], [])))
        assert ack.ok and ack.changes == (2 if drifted else 1)
        want = {p.public_key for p in BASE.wireguard.peers} | {key(6)}
        assert {p.public_key for p in wg.peers_now} == want  # type: ignore[union-attr]

    asyncio.run(run())


def uapi_answer(peers: dict[str, tuple[str, str]]) -> bytes:
    """A wireguard-go ``get=1`` answer (volatile lines included) for peers key -> (endpoint,
    allowed IP), in the order given (wireguard-go lists them in map order)."""
    lines = ["private_key=" + "11" * 32, "listen_port=51820"]
    for k, (endpoint, allowed) in peers.items():
        lines += [f"public_key={wgkeys.b64_to_hex(k)}", f"endpoint={endpoint}",
                  "last_handshake_time_sec=17", "rx_bytes=5", f"allowed_ip={allowed}",
                  "protocol_version=1"]  # fmt: skip
    return ("\n".join(lines) + "\nerrno=0\n\n").encode()


def test_wireguards_write_is_verified_from_the_touched_peers_alone():
    """After the change path's UAPI set, the answer read back is accepted as the device's new
    clean state only when the untouched peers' lines are byte for byte as before and the
    touched ones are as planned; a peer removed or changed by hand meanwhile is not."""
    before = {key(2): ("198.18.0.2:51820", "100.64.0.2/32"),
              key(3): ("198.18.0.3:51820", "100.64.0.3/32")}  # fmt: skip
    joined = WgPeer(public_key=key(6), endpoint="198.18.0.6:51820", allowed_ips=("100.64.0.6/32",))
    plan = plan_peer_change({joined}, set())
    clean = _steady_part(uapi_answer(before))
    after = {key(6): ("198.18.0.6:51820", "100.64.0.6/32"), **before}  # another order
    assert verified(clean, _steady_part(uapi_answer(after)), plan)
    assert not verified(clean, _steady_part(uapi_answer(before)), plan)  # the set did not take
    drifted = {k: v for k, v in after.items() if k != key(3)}  # a peer removed by hand
    assert not verified(clean, _steady_part(uapi_answer(drifted)), plan)
    moved = {**after, key(2): ("198.18.0.9:51820", "100.64.0.2/32")}
    assert not verified(clean, _steady_part(uapi_answer(moved)), plan)
    wrong = {**after, key(6): ("198.18.0.6:51820", "100.64.0.7/32")}
    assert not verified(clean, _steady_part(uapi_answer(wrong)), plan)
    left = plan_peer_change(set(), {joined})
    assert verified(_steady_part(uapi_answer(after)), clean, left)
    assert not verified(_steady_part(uapi_answer(after)), _steady_part(uapi_answer(after)), left)
