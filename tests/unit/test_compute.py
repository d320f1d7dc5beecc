import msgspec

from controller.compute import FLOOD_MAC, ClusterConfig, compute_snapshots, snapshot_digest
from schemas import naming
from schemas.desired import FdbEntry
from tests.unit.factories import bridge_net, intent, nic, node, overlay_net

CFG = ClusterConfig()


def test_bridge_network_only_on_nodes_with_nics():
    it = intent(
        [bridge_net(nat=True)],
        [nic(1, "lan", "n1"), nic(2, "lan", "n1")],
        [node("n1", False), node("n2", False)],
    )
    snaps = compute_snapshots(it, CFG)
    n1, n2 = snaps["n1"], snaps["n2"]
    assert [b.name for b in n1.bridges] == [naming.bridge_network_bridge("lan")]
    assert n1.bridges[0].address == "10.0.0.1/24" and n1.bridges[0].mtu == 1500
    assert [t.name for t in n1.taps] == ["ot000000000001", "ot000000000002"]
    assert {t.bridge for t in n1.taps} == {n1.bridges[0].name}
    assert n1.nat_subnets == ("10.0.0.0/24",)
    assert n2.bridges == () and n2.taps == () and n2.nat_subnets == ()
    assert n1.wireguard is None and n1.infrastructure == ("100.64.0.0/16",)
    tap = n1.taps[0]
    assert (tap.mac, tap.ip, tap.port_security) == ("02:00:00:00:00:01", "10.0.0.2", True)


def test_bridge_without_nat_has_no_address_and_no_rule():
    it = intent([bridge_net()], [nic(1, "lan", "n1")], [node("n1", False)])
    snap = compute_snapshots(it, CFG)["n1"]
    assert snap.bridges[0].address is None and snap.nat_subnets == ()


def test_overlay_fdb_and_flood_list_only_towards_hosting_nodes():
    nodes = [node("n1", index=1), node("n2", index=2), node("n3", index=3)]
    nics = [nic(1, "ov", "n1"), nic(2, "ov", "n2"), nic(3, "ov", "n2")]
    snaps = compute_snapshots(intent([overlay_net()], nics, nodes), CFG)
    vx = snaps["n1"].vxlans[0]
    assert (vx.name, vx.bridge, vx.vni, vx.local, vx.mtu) == (
        "otvx1000",
        "otb1000",
        1000,
        "100.64.0.1",
        1390,
    )
    assert set(vx.fdb) == {
        FdbEntry(mac=FLOOD_MAC, dst="100.64.0.2"),
        FdbEntry(mac="02:00:00:00:00:02", dst="100.64.0.2"),
        FdbEntry(mac="02:00:00:00:00:03", dst="100.64.0.2"),
    }
    assert snaps["n3"].vxlans == ()  # n3 hosts no NIC of the VNI: no devices there
    assert {e.dst for e in snaps["n2"].vxlans[0].fdb} == {"100.64.0.1"}


def test_wireguard_full_mesh_and_mtus():
    nodes = [
        node("n1", index=1),
        node("n2", index=2),
        node("n3", index=3),
        node("nokey", mesh=False),
    ]
    snaps = compute_snapshots(intent(nodes=nodes), ClusterConfig(underlay_mtu=9000))
    wg = snaps["n1"].wireguard
    assert wg.mtu == 8940 and wg.address == "100.64.0.1/16" and wg.listen_port == 51820
    assert [
        (p.node, p.endpoint, p.allowed_ips) for p in sorted(wg.peers, key=lambda p: p.node)
    ] == [
        ("n2", "198.18.0.12:51820", ("100.64.0.2/32",)),
        ("n3", "198.18.0.13:51820", ("100.64.0.3/32",)),
    ]
    assert snaps["nokey"].wireguard is None


def test_overlay_mtu_follows_underlay():
    it = intent([overlay_net()], [nic(1, "ov", "n1")], [node("n1")])
    snap = compute_snapshots(it, ClusterConfig(underlay_mtu=9000))["n1"]
    assert snap.bridges[0].mtu == snap.vxlans[0].mtu == snap.taps[0].mtu == 8890


def test_moved_nic_follows_in_fdb():
    nodes = [node("n1", index=1), node("n2", index=2), node("n3", index=3)]
    before = intent([overlay_net()], [nic(1, "ov", "n1"), nic(2, "ov", "n2")], nodes)
    after = intent(
        [overlay_net()], [nic(1, "ov", "n1"), nic(9, "ov", "n3", mac="02:00:00:00:00:02")], nodes
    )
    fdb = set(compute_snapshots(after, CFG)["n1"].vxlans[0].fdb)
    assert FdbEntry(mac="02:00:00:00:00:02", dst="100.64.0.3") in fdb
    assert all(e.dst != "100.64.0.2" for e in fdb)
    assert compute_snapshots(before, CFG)["n1"] != compute_snapshots(after, CFG)["n1"]


def test_removed_node_leaves_every_peer_set():
    nodes = [node("n1", index=1), node("n2", index=2)]
    assert len(compute_snapshots(intent(nodes=nodes), CFG)["n1"].wireguard.peers) == 1
    assert compute_snapshots(intent(nodes=nodes[:1]), CFG)["n1"].wireguard.peers == ()


def test_digest_is_content_only():
    it = intent([bridge_net()], [nic(1, "lan", "n1")], [node("n1", False)])
    a = compute_snapshots(it, CFG)["n1"]
    b = compute_snapshots(it, CFG)["n1"]
    assert a == b and a.digest
    stamped = msgspec.structs.replace(b, version=7, published_at=5.0)
    assert snapshot_digest(stamped) == a.digest  # version and time are not content
    changed = compute_snapshots(intent([bridge_net()], [], [node("n1", False)]), CFG)["n1"]
    assert changed.digest != a.digest


def test_dangling_nic_is_ignored():
    it = intent([], [nic(1, "gone", "n1")], [node("n1", False)])
    assert compute_snapshots(it, CFG)["n1"].taps == ()


def test_records_an_agent_would_refuse_are_left_out_and_named():
    """An older store may hold a network on the mesh prefix or a node whose endpoint is
    loopback: agents would refuse the whole snapshot (and a bad peer sits in every node's), so
    compute leaves exactly those records out and says why; everything else is published."""
    bad_net = msgspec.structs.replace(bridge_net("bad", subnet="100.64.9.0/24"))
    bad_node = msgspec.structs.replace(node("n2", index=2), underlay_ip="127.0.0.1")
    it = intent(
        [bridge_net(), bad_net],
        [nic(1, "lan", "n1"), nic(2, "bad", "n1")],
        [node("n1"), bad_node, node("n3", index=3)],
    )
    skipped: list[str] = []
    snaps = compute_snapshots(it, CFG, on_skip=skipped.append)
    assert skipped == [
        "network bad: subnet 100.64.9.0/24 overlaps the mesh prefix 100.64.0.0/16 (the nodes'"
        " tunnel addresses), which no VM network may use",
        "node n2 left out of the mesh: underlay_ip 127.0.0.1 is in the loopback range 127.0.0.0/8",
    ]
    assert [t.name for t in snaps["n1"].taps] == ["ot000000000001"]  # lan's NIC is still there
    assert {p.node for p in snaps["n1"].wireguard.peers} == {"n3"}
    assert snaps["n2"].wireguard is None and set(snaps) == {"n1", "n2", "n3"}
    assert compute_snapshots(intent([bridge_net()], [], [node("n1")]), CFG, on_skip=skipped.append)
    assert len(skipped) == 2  # a clean intent reports nothing
