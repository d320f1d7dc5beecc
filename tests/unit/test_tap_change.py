"""A VM's NIC attached or detached on this node costs what it changes (issue 10 item 5), and
changes no answer.

A NIC attached here (or detached) is one tap gained (or lost) in the node's own section, with its
port-security entries. The change path (``agent.assemble`` follows the node section's taps item
by item and says which changed since the snapshot last applied; ``agent.validate.check_change``
checks only those; links plan only them, ``agent.links.plan.plan_tap_change``; nftables is
planned from the snapshot against the tables it last read) must refuse exactly what
``check_snapshot`` refuses, with the same ack text, and leave the data plane exactly where the
whole path leaves it. Random delta sequences of the taps (and of the FDB beside them), hostile
taps among them (a duplicate name, MAC or address, a MAC the FDB on its bridge sends away, a
gateway, broadcast, mesh or loopback address, a wrong MTU, bridge or NIC id, bad MACs), drive
an agent with the change path and one without, side by side.
"""

import asyncio
import contextlib

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent import runner, validate
from agent.assemble import build
from agent.links.model import AddPortFdb, DelPortFdb, FdbAction, Observed
from agent.links.plan import plan, plan_tap_change, settle, written_devices
from agent.runner import Agent
from agent.validate import check_change, check_snapshot
from schemas import limits
from schemas.codec import decode, encode
from schemas.wire import NODE_SECTION, TapItem, head_digest
from tests.unit.fake_kernel import FakeKernel
from tests.unit.test_fdb_change import BASE, NICS, VNI, FullOnly, passes, side_by_side
from tests.unit.test_mesh_change import FDB, FDB_ITEM, Controller, agent, started

replace = msgspec.structs.replace
OVERLAY, LAN = "otb1000", "otn094a367b"  # BASE's bridges: MTU 1390, and 1500 with 10.0.0.1/24
TAP_NICS = ["000000000001" + "f" * 20, *(f"00000000000{c}" + "e" * 20 for c in "abcd")]
MACS = [
    *(f"02:00:00:00:30:0{i}" for i in range(1, 5)),  # valid, shared by some taps
    "02:00:00:00:00:01",  # the kept overlay tap's MAC (refused unless it left)
    "02:00:00:00:00:02",  # a remote NIC's MAC in the overlay's FDB (refused on otb1000)
    "02:00:00:00:20:01",  # a MAC the FDB steps may send away
    "01:00:5e:00:00:01",  # multicast (refused)
    "02:00:00:00:30:0A",  # upper case (refused)
    "",
]
IPS = {
    OVERLAY: ["10.1.0.5", "10.1.0.6", "10.1.0.2", "100.64.0.9", "127.0.0.1", "10.1.0.07", ""],
    LAN: ["10.0.0.5", "10.0.0.6", "10.0.0.4", "10.0.0.1", "10.0.0.255", "10.0.1.5", ""],
}


def _tap(nic: str, bridge: str, good_mtu: bool, mac: str, ip_at: int, naming: int, sec: bool):
    name = "ot" + nic[:12]
    if naming == 1:
        name = "ot" + nic[:11] + "f"  # not the NIC it claims (refused)
    elif naming == 2:
        name = name.upper()[:2] + name[2:].upper()  # not an Otherix tap name (refused)
    mtu = {OVERLAY: 1390, LAN: 1500}.get(bridge, 1500)
    ips = IPS.get(bridge, ["10.0.0.7"])
    return TapItem(name=name, bridge=bridge, mtu=mtu if good_mtu else mtu + 1, nic=nic, mac=mac,
                   ip=ips[ip_at % len(ips)], port_security=sec)  # fmt: skip


TAP = st.builds(
    _tap,
    st.sampled_from(TAP_NICS),
    st.sampled_from([OVERLAY, LAN] * 4 + ["otn00000000"]),
    st.sampled_from([True] * 6 + [False]),
    st.sampled_from(MACS[:4] * 3 + MACS[4:]),
    st.integers(0, 20).map(lambda i: i % 2 if i < 14 else i),  # mostly valid addresses
    st.sampled_from([0] * 8 + [1, 2]),
    st.booleans(),
)
# one step: taps upserted and removed (by NIC), FDB items upserted and removed (by NIC)
STEP = st.tuples(
    st.lists(TAP, max_size=2),
    st.lists(st.sampled_from(TAP_NICS), max_size=1),
    st.lists(FDB, max_size=1),
    st.lists(st.sampled_from(NICS), max_size=1),
)
# a NIC attached here as the controller makes it: its own MAC and address on either network
FAIR = st.builds(
    lambda nic, bridge, sec: _tap(
        nic, bridge, True, f"02:00:00:00:40:0{nic[11]}", "abcd".index(nic[11]) % 2, 0, sec
    ),  # fmt: skip
    st.sampled_from(TAP_NICS[1:]),
    st.sampled_from([OVERLAY, LAN]),
    st.booleans(),
)
FAIR_STEP = st.tuples(
    st.lists(st.one_of(FAIR, FAIR, FAIR, TAP), max_size=2),
    st.lists(st.sampled_from(TAP_NICS), max_size=1),
    st.lists(FDB, max_size=1),
    st.lists(st.sampled_from(NICS), max_size=1),
)


class Taps(Controller):
    """HEADs after ``BASE``'s: each step a delta of the node section's taps and/or the VNI's."""

    def step(self, taps, gone, fdb, fdb_gone):  # type: ignore[override]
        version = self.head.version + 1
        deltas = []
        if taps or gone:
            removals = [f"tap/ot{n[:12]}" for n in gone]
            deltas.append(self.sections[NODE_SECTION].change(version, taps, removals))
        if fdb or fdb_gone:
            removals = [replace(FDB_ITEM, nic=n).nic for n in fdb_gone]
            deltas.append(self.sections[VNI].change(version, fdb, removals))
        by_name = {d.name: d for d in deltas}
        refs = tuple(
            replace(r, version=by_name[r.name].version, digest=by_name[r.name].digest)
            if r.name in by_name
            else r
            for r in self.head.refs
        )
        self.head = replace(
            self.head, version=version, refs=refs, digest=head_digest(refs), sections=tuple(deltas)
        )
        return self.head


def kernel_with(snap) -> Observed:
    kernel = FakeKernel()
    kernel.apply(plan(snap, kernel.observe_now()))
    return kernel.observe_now()


def same_plan(got: list, whole: list) -> bool:
    """The same actions in the whole plan's order (creates, enslave, learning, up, FDB adds
    before deletes, devices deleted last), but bridge entries (of several bridges: the whole
    plan goes bridge by bridge) in any order among themselves."""
    if sorted(map(repr, got)) != sorted(map(repr, whole)):
        return False
    at = [whole.index(a) for a in got]
    return all(
        p < q or (type(x) is type(y) and isinstance(x, AddPortFdb | DelPortFdb))
        for x, y, p, q in zip(got, got[1:], at, at[1:], strict=False)
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=8))
def test_the_change_check_answers_as_the_whole_check(steps):
    """After any sequence of tap and FDB deltas (each step's base: the last snapshot that
    passed, as in the runner), ``check_change`` says "passes" exactly when ``check_snapshot``
    passes, and then returns what ``check_snapshot`` returns; the taps it reports are the
    difference of the two snapshots' taps, and the links plan of them is the whole plan's."""
    controller = Taps()
    assembler, base, checked = started(controller.head)
    observed = kernel_with(base)
    for step in steps:
        head = controller.step(*step)
        for delta in head.sections:
            assert assembler.offer(delta)
        snap = assembler.snapshot(head)
        sections = {r.name: assembler.held[r.name].items.values() for r in head.refs}
        assert snap == build(BASE.node, head, sections)
        fdb = assembler.change()
        assert fdb is not None  # only taps and FDB entries changed
        taps = assembler.tap_change()
        was, now = set(base.taps), set(snap.taps)
        assert (taps.gained, taps.lost) == (now - was, was - now)
        got = check_change(snap, base, checked, fdb, None, taps)
        assert (got is not None) == passes(snap)
        event("passes" if got is not None else "refused")
        if taps.gained or taps.lost:
            event("the taps changed")
        if got is not None:
            assert got == check_snapshot(snap)
            actions = plan_tap_change(snap, observed, fdb, taps)
            if actions is not None:
                assert same_plan(actions, plan(snap, observed))
                event("planned by the change")
            base, checked, observed = snap, got, kernel_with(snap)
            assembler.mark()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FAIR_STEP, min_size=1, max_size=6), st.data())
def test_settle_is_the_kernel_after_the_writes_or_not_sure(steps, data):
    """Each passing step's whole plan written to a kernel, or all of it but one write of a tap
    the kernel did not keep: ``settle`` on the devices read back (``written_devices``) is the
    kernel as a full read gives it, or None ("read it all"), and None whenever a write was lost."""
    controller = Taps()
    assembler, base, _ = started(controller.head)
    kernel = FakeKernel()
    kernel.apply(plan(base, kernel.observe_now()))
    for step in steps:
        head = controller.step(*step)
        for delta in head.sections:
            assembler.offer(delta)
        snap = assembler.snapshot(head)
        if not passes(snap):
            continue
        assembler.mark()
        observed = kernel.observe_now()
        actions = plan(snap, observed)
        devices = written_devices(observed, actions, snap)
        if devices is None:
            event("not taps alone")
            kernel.apply(actions)
            continue
        taps = [a for a in actions if not isinstance(a, FdbAction)]
        lost = data.draw(st.sampled_from([None, *taps])) if taps else None
        for a in actions:
            if a is not lost:
                with contextlib.suppress(AssertionError, KeyError):  # as netlink: ENODEV
                    kernel.apply([a])
        read = asyncio.run(kernel.observe_devices(devices))
        after = settle(observed, actions, snap, read)
        event(f"{'a write lost' if lost else 'written'}: {'known' if after else 'not sure'}")
        if lost is not None:
            assert after is None
        elif after is not None:
            assert normal(after) == normal(kernel.observe_now())
        if after is None:  # the full read's repair
            kernel.apply(plan(snap, kernel.observe_now()))


def test_the_change_check_holds_the_tap_cap(monkeypatch):
    """Over the tap cap: for the whole check to refuse."""
    controller = Taps()
    assembler, base, checked = started(controller.head)
    monkeypatch.setattr(limits, "MAX_TAPS", len(base.taps))
    head = controller.step([_tap(TAP_NICS[1], LAN, True, MACS[0], 0, 0, True)], [], [], [])
    assembler.offer(head.sections[0])
    snap = assembler.snapshot(head)
    taps = assembler.tap_change()
    assert len(taps.gained) == 1
    assert check_change(snap, base, checked, assembler.change(), None, taps) is None
    assert not passes(snap)


def test_the_change_check_reads_only_the_bridges_the_taps_join(monkeypatch):
    """A tap gained on LAN: the overlay bridge (unchanged, checked with the base) is not checked
    again, so the check costs the change, not the node's bridges (``_tap_change`` timed alone
    at 1,022 bridges with addresses: 11.8 ms a call when every bridge was checked, 0.09 ms)."""
    controller = Taps()
    assembler, base, checked = started(controller.head)
    head = controller.step([_tap(TAP_NICS[1], LAN, True, MACS[0], 0, 0, True)], [], [], [])
    assembler.offer(head.sections[0])
    snap = assembler.snapshot(head)
    seen_bridges: list[str] = []
    check_bridges = validate._check_bridges

    def counted(bridges, blocked):
        bridges = list(bridges)
        seen_bridges.extend(b.name for b in bridges)
        return check_bridges(bridges, blocked)

    monkeypatch.setattr(validate, "_check_bridges", counted)
    taps = assembler.tap_change()
    assert check_change(snap, base, checked, assembler.change(), None, taps) is not None
    assert seen_bridges == [LAN] and len(snap.bridges) == 2


def seen(a: Agent) -> tuple:
    published = a.nc.published  # type: ignore[attr-defined]
    ack = decode(published[-1][1], dict) if published else {}
    for moment in ("sent_at", "duration_ms", "changes"):
        ack.pop(moment, None)
    kernel = a.links.kernel.observe_now()  # type: ignore[attr-defined]
    links = {n: replace(link, index=0) for n, link in kernel.links.items()}
    return ack, links, kernel.fdb, kernel.port_fdb, a.applied, a.nft.tables


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FAIR_STEP, min_size=1, max_size=6))
def test_an_agent_answers_and_applies_every_tap_change_as_the_whole_path(tmp_path_factory, steps):
    """The same HEADs to an agent with the change path and to one without: the same acks (ok,
    version, digest, the refusal's text), the same links, FDB and nftables, every time; a
    refused change leaves the data plane where it was; the heartbeat after a change finds
    nothing left to write."""

    async def run() -> None:
        tmp = tmp_path_factory.mktemp("agents")
        fast, full = agent(Agent, tmp / "fast"), agent(FullOnly, tmp / "full")
        controller = Taps()
        heads = [controller.head]
        heads += [controller.step(*step) for step in steps]
        await side_by_side(fast, full, heads, seen)
        event(f"tap changes by the change path: {min(fast.counters['tap_changes'], 3)}+")

    asyncio.run(run())


def normal(o: Observed | None) -> tuple:
    """``o`` with its empty entry sets dropped (a read names a port with none, a dump not)."""
    assert o is not None
    sets = (o.fdb, o.learned, o.port_fdb, o.port_learned)
    return o.links, *({k: v for k, v in d.items() if v} for d in sets)


def test_a_nic_attached_and_detached_is_applied_by_the_change_path(tmp_path, monkeypatch):
    """A NIC attached here, then detached: each is checked by the change path (no whole check),
    links plan only that tap (no whole plan, no FDB compared), nftables is replanned from the
    snapshot, and the tap with its bridge entry is there, then gone; the heartbeat after is not
    a full read. (On the code before the tap change path, both went the whole way: checked
    whole, every entry planned; before the taps were read back, the heartbeat after was full.)"""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        controller = Taps()
        for section in controller.head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(controller.head, sections=())))).ok
        await a.handle(encode(replace(controller.head, sections=())))
        whole_checks: list = []
        whole_check = runner.check_snapshot
        monkeypatch.setattr(
            runner, "check_snapshot", lambda *a, **k: whole_checks.append(1) or whole_check(*a, **k)
        )
        links_plans: list = []
        links_plan = a.links.plan
        a.links.plan = lambda *args: links_plans.append(1) or links_plan(*args)  # type: ignore[method-assign]
        planned = a.nft.planned  # type: ignore[attr-defined]
        nic = TapItem(name="ot00000000000a", bridge=LAN, mtu=1500, nic=TAP_NICS[1],
                      mac="02:00:00:00:30:01", ip="10.0.0.5")  # fmt: skip
        ack = await a.handle(encode(controller.step([nic], [], [], [])))
        assert ack.ok and a.counters["tap_changes"] == 1
        assert (whole_checks, links_plans) == ([], [])
        assert a.nft.planned == planned + 1  # type: ignore[attr-defined]
        kernel = a.links.kernel.observe_now()  # type: ignore[attr-defined]
        tap = kernel.links[nic.name]
        assert (tap.kind, tap.master, tap.up, tap.port_learning) == ("tun", LAN, True, False)
        assert kernel.port_fdb[nic.name] == {nic.mac}
        assert nic.ip in str(a.nft.tables.sets)  # type: ignore[attr-defined]
        # the heartbeat after needs no whole read: the tap was read back after the writes
        reconciled = a.counters["reconciled"]
        after = await a.handle(encode(replace(controller.head, sections=())))
        assert after.ok and after.changes == 0 and links_plans == []
        assert a.counters["reconciled"] == reconciled
        assert normal(a._seen) == normal(a.links.kernel.observe_now())  # type: ignore[attr-defined]
        ack = await a.handle(encode(controller.step([], [TAP_NICS[1]], [], [])))
        assert ack.ok and a.counters["tap_changes"] == 2
        assert (whole_checks, links_plans) == ([], [])
        kernel = a.links.kernel.observe_now()  # type: ignore[attr-defined]
        assert nic.name not in kernel.links and nic.ip not in str(a.nft.tables.sets)  # type: ignore[attr-defined]
        after = await a.handle(encode(replace(controller.head, sections=())))
        assert after.ok and after.changes == 0 and a.counters["reconciled"] == reconciled
        assert normal(a._seen) == normal(kernel)

    asyncio.run(run())


def test_a_tap_with_a_remote_nics_mac_is_refused_with_the_whole_checks_text(tmp_path):
    """A tap whose MAC the FDB on its bridge sends to another node is not for the change path
    to judge: the whole check refuses it, with its message, and nothing moves."""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        controller = Taps()
        for section in controller.head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(controller.head, sections=())))).ok
        before = seen(a)[1:]
        nic = TapItem(name="ot00000000000a", bridge=OVERLAY, mtu=1390, nic=TAP_NICS[1],
                      mac="02:00:00:00:00:02", ip="10.1.0.5")  # fmt: skip
        ack = await a.handle(encode(controller.step([nic], [], [], [])))
        assert not ack.ok and "is the MAC of local tap" in ack.error
        assert seen(a)[1:] == before and a.counters["tap_changes"] == 0

    asyncio.run(run())


def test_a_head_with_a_tap_and_an_fdb_entry_counts_and_logs_both(tmp_path, caplog):
    """One HEAD may carry several kinds of change (a VM attached here while another attaches
    elsewhere on the overlay): each is counted, and the log names each. (Before, such a HEAD
    was counted and logged as a tap change alone.)"""

    async def run() -> None:
        a = agent(Agent, tmp_path / "a")
        controller = Taps()
        for section in controller.head.sections:
            a.assembler.offer(section)
        assert (await a.handle(encode(replace(controller.head, sections=())))).ok
        await a.handle(encode(replace(controller.head, sections=())))
        nic = TapItem(name="ot00000000000a", bridge=LAN, mtu=1500, nic=TAP_NICS[1],
                      mac="02:00:00:00:30:01", ip="10.0.0.5")  # fmt: skip
        remote = replace(FDB_ITEM, nic=NICS[5], mac="02:00:00:00:20:06")
        with caplog.at_level("INFO", logger="agent.runner"):
            ack = await a.handle(encode(controller.step([nic], [], [remote], [])))
        assert ack.ok and ack.changes >= 2
        counts = {k: a.counters[f"{k}_changes"] for k in ("tap", "mesh", "fdb")}
        assert counts == {"tap": 1, "mesh": 0, "fdb": 1}
        assert "by the change path (taps: +1 -0, FDB)" in caplog.text

    asyncio.run(run())
