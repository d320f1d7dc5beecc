import itertools
import random

import msgspec

from agent.links import model as m
from agent.links.applier import LinkApplier
from agent.links.plan import plan
from controller.compute import ClusterConfig, compute_snapshots
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan
from tests.unit.factories import bridge_net, intent, nic, node, overlay_net
from tests.unit.fake_kernel import FakeKernel


def converge(kernel: FakeKernel, desired: Snapshot) -> list[m.Action]:
    actions = plan(desired, kernel.observe_now())
    kernel.apply(actions)
    return actions


def snapshots():
    """A table of desired states covering bridge, NAT, overlay with FDB, and empty."""
    nodes = [node("n1", index=1), node("n2", index=2), node("n3", index=3)]
    nets = [bridge_net(nat=True), bridge_net("lan2", subnet="10.9.0.0/24"), overlay_net()]
    cases = [
        intent(nets, [], nodes),
        intent(nets, [nic(1, "lan", "n1")], nodes),
        intent(nets, [nic(1, "lan", "n1"), nic(2, "lan", "n1"), nic(3, "lan2", "n1")], nodes),
        intent(nets, [nic(1, "ov", "n1"), nic(2, "ov", "n2")], nodes),
        intent(
            nets,
            [nic(1, "ov", "n1"), nic(2, "ov", "n2"), nic(4, "ov", "n3"), nic(5, "lan", "n1")],
            nodes,
        ),
        intent(nets, [nic(1, "ov", "n1"), nic(4, "ov", "n3")], nodes),
    ]
    out = [compute_snapshots(c, ClusterConfig())["n1"] for c in cases]
    out.append(compute_snapshots(cases[4], ClusterConfig(underlay_mtu=9000))["n1"])
    return out


def test_from_scratch_then_noop():
    for desired in snapshots():
        kernel = FakeKernel()
        converge(kernel, desired)
        assert plan(desired, kernel.observe_now()) == [], desired


def test_every_transition_converges_in_one_pass():
    states = snapshots()
    for a, b in itertools.permutations(states, 2):
        kernel = FakeKernel()
        converge(kernel, a)
        converge(kernel, b)
        assert plan(b, kernel.observe_now()) == [], (a, b)


def test_random_walk_converges():
    rng = random.Random(7)
    states = snapshots()
    kernel = FakeKernel()
    for _ in range(50):
        desired = rng.choice(states)
        converge(kernel, desired)
        assert plan(desired, kernel.observe_now()) == []


def test_wrong_stale_learned_and_foreign_state_repaired():
    desired = snapshots()[4]
    vx = desired.vxlans[0]
    kernel = FakeKernel()
    converge(kernel, desired)
    tap = desired.taps[0].name
    kernel.links[tap] = msgspec.structs.replace(kernel.links[tap], mtu=9000, master=None, up=False)
    kernel.fdb[vx.name].add(FdbEntry(mac="02:de:ad:00:00:01", dst="100.64.0.99"))  # stale
    kernel.fdb[vx.name].discard(vx.fdb[0])  # missing
    kernel.learned[vx.name].add("02:aa:bb:cc:dd:ee")  # learned from the wire
    kernel.links["otb4242"] = m.Link(
        name="otb4242", kind="bridge", mtu=1500, up=True
    )  # ours, undesired
    actions = converge(kernel, desired)
    assert m.SetMtu(name=tap, mtu=desired.taps[0].mtu) in actions
    assert m.DelFdb(device=vx.name, mac="02:de:ad:00:00:01", dst="100.64.0.99") in actions
    assert m.DelFdb(device=vx.name, mac="02:aa:bb:cc:dd:ee", dst=None) in actions
    assert m.DeleteLink(name="otb4242") in actions
    assert plan(desired, kernel.observe_now()) == []
    assert kernel.fdb[vx.name] == set(vx.fdb) and kernel.learned[vx.name] == set()


def test_fdb_adds_come_before_deletes():
    desired = snapshots()[4]
    vx = desired.vxlans[0]
    kernel = FakeKernel()
    converge(kernel, desired)
    kernel.fdb[vx.name] = {FdbEntry(mac="02:de:ad:00:00:01", dst="100.64.0.99")}
    actions = plan(desired, kernel.observe_now())
    kinds = [type(a) for a in actions]
    assert kinds.index(m.AddFdb) < kinds.index(m.DelFdb)


def test_wrong_kind_or_vni_recreated():
    desired = snapshots()[3]
    vx = desired.vxlans[0]
    kernel = FakeKernel()
    converge(kernel, desired)
    kernel.links[vx.name] = msgspec.structs.replace(
        kernel.links[vx.name], vxlan=m.VxlanInfo(vni=7, local=vx.local, port=vx.port, learning=True)
    )
    kernel.links[vx.bridge] = m.Link(name=vx.bridge, kind="tun", mtu=1500, up=True)
    actions = converge(kernel, desired)
    assert set(actions[:2]) == {m.DeleteLink(name=vx.bridge), m.DeleteLink(name=vx.name)}
    assert plan(desired, kernel.observe_now()) == []
    assert set(kernel.fdb[vx.name]) == set(vx.fdb)


def test_foreign_addresses_removed_from_managed_bridge_only():
    desired = Snapshot(
        node="n1", version=1, bridges=(Bridge(name="otnaaaa0000", mtu=1500, address="10.0.0.1/24"),)
    )
    kernel = FakeKernel()
    converge(kernel, desired)
    kernel.links["otnaaaa0000"] = msgspec.structs.replace(
        kernel.links["otnaaaa0000"], addresses=frozenset({"10.0.0.1/24", "192.0.2.1/24"})
    )
    assert plan(desired, kernel.observe_now()) == [
        m.DelAddress(name="otnaaaa0000", address="192.0.2.1/24")
    ]


def test_wireguard_device_is_left_to_its_applier():
    kernel = FakeKernel(
        m.Observed(links={"otwg0": m.Link(name="otwg0", kind="tun", mtu=1440, up=True)})
    )
    assert plan(Snapshot(node="n1", version=1), kernel.observe_now()) == []


def test_hypervisor_made_tap_is_adopted_not_recreated():
    desired = Snapshot(
        node="n1",
        version=1,
        bridges=(Bridge(name="otnaaaa0000", mtu=1500),),
        taps=(Tap(name="ot0123456789ab", bridge="otnaaaa0000", mtu=1500),),
    )
    kernel = FakeKernel(
        m.Observed(
            links={"ot0123456789ab": m.Link(name="ot0123456789ab", kind="tun", mtu=1500, up=False)}
        )
    )
    actions = converge(kernel, desired)
    assert m.CreateTap(name="ot0123456789ab", mtu=1500) not in actions
    assert m.SetMaster(name="ot0123456789ab", master="otnaaaa0000") in actions


def test_ports_deleted_before_their_bridge():
    desired = snapshots()[2]
    kernel = FakeKernel()
    converge(kernel, desired)
    actions = plan(Snapshot(node="n1", version=2), kernel.observe_now())
    deletes = [a.name for a in actions if isinstance(a, m.DeleteLink)]
    bridges = {b.name for b in desired.bridges}
    assert deletes and all(name not in bridges for name in deletes[: len(desired.taps)])


# --- bridge ports: learning off, static entries for local and remote NICs, atomic moves -------

BR, VX, FLOOD = "otb1000", "otvx1000", "00:00:00:00:00:00"
TAP_A, TAP_B, TAP_C = "ot00000000000a", "ot00000000000b", "ot00000000000c"
MAC_A, MAC_B, REMOTE = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:99"


def overlay(
    taps=((TAP_A, MAC_A), (TAP_B, MAC_B)), fdb=((FLOOD, "100.64.0.2"), (REMOTE, "100.64.0.2"))
):
    return Snapshot(
        node="n1",
        version=1,
        bridges=(Bridge(name=BR, mtu=1390),),
        taps=tuple(Tap(name=t, bridge=BR, mtu=1390, mac=mac) for t, mac in taps),
        vxlans=(
            Vxlan(name=VX, vni=1000, bridge=BR, local="100.64.0.1", mtu=1390,
                  fdb=tuple(FdbEntry(mac=mac, dst=dst) for mac, dst in fdb)),
        ),
    )  # fmt: skip


def step_by_step(kernel: FakeKernel, actions: list[m.Action], check) -> None:
    """Apply one action at a time and check the kernel in between (what a reader could see)."""
    for action in actions:
        kernel.apply([action])
        check(kernel)


def test_learning_off_and_a_static_entry_per_local_and_remote_nic():
    kernel = FakeKernel()
    actions = converge(kernel, overlay())
    learning = [a for a in actions if isinstance(a, m.SetPortLearning)]
    assert set(learning) == {m.SetPortLearning(name=n, learning=False) for n in (VX, TAP_A, TAP_B)}
    assert all(kernel.links[n].port_learning is False for n in (VX, TAP_A, TAP_B))
    assert kernel.bridge_entries(BR) == {MAC_A: TAP_A, MAC_B: TAP_B, REMOTE: VX}
    # the flood MAC is no bridge entry: broadcast and unknown unicast still flood
    assert plan(overlay(), kernel.observe_now()) == []


def test_learning_turned_back_on_is_turned_off_alone():
    kernel = FakeKernel()
    converge(kernel, overlay())
    kernel.links[TAP_A] = msgspec.structs.replace(kernel.links[TAP_A], port_learning=True)
    assert plan(overlay(), kernel.observe_now()) == [m.SetPortLearning(name=TAP_A, learning=False)]


def test_released_port_is_enslaved_with_learning_off_and_its_entry_again():
    kernel = FakeKernel()
    converge(kernel, overlay())
    kernel.apply([m.SetMaster(name=TAP_A, master=None)])  # by hand: the bridge forgets MAC_A
    assert kernel.bridge_entries(BR) == {MAC_B: TAP_B, REMOTE: VX}
    actions = converge(kernel, overlay())
    assert actions == [
        m.SetMaster(name=TAP_A, master=BR),
        m.SetPortLearning(name=TAP_A, learning=False),
        m.AddPortFdb(port=TAP_A, mac=MAC_A),
    ]
    assert kernel.bridge_entries(BR)[MAC_A] == TAP_A


def test_stale_and_learned_bridge_entries_removed_kernel_own_left_alone():
    kernel = FakeKernel()
    converge(kernel, overlay())
    kernel.port_fdb[TAP_A].add("02:de:ad:00:00:01")  # ours (static on our port), not wanted
    kernel.port_learned[VX] = {"02:de:ad:00:00:02"}  # learned from the wire
    kernel.port_learned[TAP_B] = set()
    actions = converge(kernel, overlay())
    assert actions == [
        m.DelPortFdb(port=TAP_A, mac="02:de:ad:00:00:01"),
        m.DelPortFdb(port=VX, mac="02:de:ad:00:00:02"),
    ]
    assert kernel.bridge_entries(BR) == {MAC_A: TAP_A, MAC_B: TAP_B, REMOTE: VX}


def test_learned_entry_for_a_known_nic_is_converted_in_place_not_deleted():
    kernel = FakeKernel()
    converge(kernel, overlay())
    # the bridge had learned MAC_A on the VXLAN port (the attack): one replace takes it back
    kernel.port_fdb[TAP_A].discard(MAC_A)
    kernel.port_learned[VX] = {MAC_A}
    assert converge(kernel, overlay()) == [m.AddPortFdb(port=TAP_A, mac=MAC_A)]
    assert kernel.bridge_entries(BR)[MAC_A] == TAP_A


def test_local_tap_wins_a_mac_also_listed_as_remote():
    kernel = FakeKernel()
    converge(kernel, overlay(fdb=((FLOOD, "100.64.0.2"), (MAC_A, "100.64.0.2"))))
    assert kernel.bridge_entries(BR) == {MAC_A: TAP_A, MAC_B: TAP_B}


def test_tap_without_a_mac_gets_no_entry():
    kernel = FakeKernel()
    converge(kernel, overlay(taps=((TAP_A, ""),), fdb=()))
    assert kernel.bridge_entries(BR) == {} and kernel.links[TAP_A].port_learning is False


def test_vxlan_move_is_one_replace_and_the_mac_never_lacks_an_entry():
    before = overlay(fdb=((FLOOD, "100.64.0.2"), (REMOTE, "100.64.0.2")))
    after = overlay(fdb=((FLOOD, "100.64.0.2"), (REMOTE, "100.64.0.3")))
    kernel = FakeKernel()
    converge(kernel, before)
    actions = plan(after, kernel.observe_now())
    assert actions == [m.AddFdb(device=VX, mac=REMOTE, dst="100.64.0.3")]

    def one_dst(k: FakeKernel) -> None:
        assert len([e for e in k.fdb[VX] if e.mac == REMOTE]) == 1

    step_by_step(kernel, actions, one_dst)
    assert FdbEntry(mac=REMOTE, dst="100.64.0.3") in kernel.fdb[VX]
    assert plan(after, kernel.observe_now()) == []


def test_the_old_append_then_delete_leaves_the_moved_mac_without_an_entry():
    # what the planner used to emit, on a kernel that ignores appends to a unicast MAC
    kernel = FakeKernel()
    converge(kernel, overlay())
    kernel.legacy_append = True
    kernel.apply([m.AddFdb(device=VX, mac=REMOTE, dst="100.64.0.3")])
    kernel.apply([m.DelFdb(device=VX, mac=REMOTE, dst="100.64.0.2")])
    assert not [e for e in kernel.fdb[VX] if e.mac == REMOTE]


def test_flood_list_change_appends_and_deletes_only_that_dst():
    before = overlay(fdb=((FLOOD, "100.64.0.2"), (FLOOD, "100.64.0.3")))
    after = overlay(fdb=((FLOOD, "100.64.0.3"), (FLOOD, "100.64.0.4")))
    kernel = FakeKernel()
    converge(kernel, before)
    assert converge(kernel, after) == [
        m.AddFdb(device=VX, mac=FLOOD, dst="100.64.0.4"),
        m.DelFdb(device=VX, mac=FLOOD, dst="100.64.0.2"),
    ]


def test_nic_moving_between_nodes_moves_its_bridge_entry_in_one_replace():
    remote = overlay(taps=((TAP_B, MAC_B),), fdb=((FLOOD, "100.64.0.2"), (MAC_A, "100.64.0.2")))
    local = overlay(fdb=((FLOOD, "100.64.0.2"),))
    for start, end, port in ((remote, local, TAP_A), (local, remote, VX)):
        kernel = FakeKernel()
        converge(kernel, start)
        actions = plan(end, kernel.observe_now())
        assert m.AddPortFdb(port=port, mac=MAC_A) in actions
        assert not [a for a in actions if isinstance(a, m.DelPortFdb) and a.mac == MAC_A]
        # the tap is created and enslaved first; from then on MAC_A always has its one entry
        steps = [a for a in actions if not isinstance(a, m.DeleteLink)]
        step_by_step(kernel, steps, lambda k: k.bridge_entries(BR)[MAC_A])
        kernel.apply([a for a in actions if isinstance(a, m.DeleteLink)])
        assert kernel.bridge_entries(BR)[MAC_A] == port
        assert plan(end, kernel.observe_now()) == []


def test_port_moving_to_another_bridge_gets_no_deletes_for_the_entries_it_lost():
    kernel = FakeKernel()
    converge(kernel, overlay())
    moved = msgspec.structs.replace(
        overlay(),
        bridges=(Bridge(name=BR, mtu=1390), Bridge(name="otb2000", mtu=1390)),
        taps=(Tap(name=TAP_A, bridge="otb2000", mtu=1390, mac=MAC_A), overlay().taps[1]),
    )
    actions = converge(kernel, moved)
    assert m.AddPortFdb(port=TAP_A, mac=MAC_A) in actions
    assert not [a for a in actions if isinstance(a, m.DelPortFdb)]
    assert kernel.bridge_entries("otb2000") == {MAC_A: TAP_A}
    assert plan(moved, kernel.observe_now()) == []


async def test_links_subsystem_second_reconcile_plans_nothing_with_bridge_entries():
    kernel = FakeKernel()
    links = LinkApplier(kernel)
    result = await links.reconcile(overlay())
    assert result.errors == () and result.writes > 0
    again = links.plan(overlay(), await links.observe())
    assert again.actions == () and (await links.apply(again)).writes == 0
    kernel.port_learned[TAP_B] = {"02:de:ad:00:00:09"}
    kernel.links[VX] = msgspec.structs.replace(kernel.links[VX], port_learning=True)
    repair = await links.reconcile(overlay())
    assert repair.errors == () and repair.writes == 2
    assert links.plan(overlay(), await links.observe()).actions == ()
