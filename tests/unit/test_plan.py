import itertools
import random

import msgspec

from agent.links import model as m
from agent.links.plan import plan
from controller.compute import ClusterConfig, compute_snapshots
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap
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
