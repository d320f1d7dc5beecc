"""controller.sections: the incremental section model equals the full computation, and a change
touches only what it affects (counted)."""

import base64

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.assemble import build
from controller.compute import ClusterConfig, compute_snapshots
from controller.sections import Model
from schemas.codec import decode, encode
from schemas.intent import Intent, Nic, Node
from schemas.wire import Head, Item, vni_section
from tests.unit.factories import bridge_net, nic, overlay_net

CFG = ClusterConfig(underlay_cidrs=("198.18.0.0/24",))
SETTINGS = settings(
    deadline=None, database=None, max_examples=60, suppress_health_check=list(HealthCheck)
)


def content(snap):
    return msgspec.structs.replace(snap, version=0, digest="", published_at=0.0)


def assembled(model: Model, name: str):
    """What an agent holding every section of ``name`` at its HEAD assembles."""
    head = model.heads[name]
    sections = {
        s_ref.name: [decode(data, Item) for data in model.section(name, s_ref.name).items.values()]
        for s_ref in head.refs
    }
    return build(name, Head(node=name, version=head.version, digest=head.digest), sections)


def assert_equal_to_full(model: Model, intent: Intent) -> None:
    full = compute_snapshots(intent, CFG)
    assert set(model.heads) == set(full)
    for name, snap in full.items():
        assert content(assembled(model, name)) == content(snap), name


def mesh_node(i: int, name: str | None = None) -> Node:
    return Node(
        name=name or f"n{i}",
        underlay_ip=f"198.18.0.{10 + i}",
        wg_public_key=base64.b64encode(bytes([i]) * 32).decode(),
        wg_listen_port=51820 + i,
        tunnel_ip=f"100.64.0.{i + 1}",
    )


NETWORKS = [
    bridge_net("lan"),
    bridge_net("nat", nat=True, subnet="10.2.0.0/24"),
    overlay_net("ov1", vni=1001, subnet="10.1.0.0/24"),
    overlay_net("ov2", vni=1002, subnet="10.3.0.0/24"),
    bridge_net("bad", subnet="100.64.5.0/24"),  # in the mesh prefix: screened out
]

records = st.one_of(
    st.builds(lambda n: ("network", NETWORKS[n].name, NETWORKS[n]), st.integers(0, 4)),
    st.builds(
        lambda i, mesh: ("node", f"n{i}", mesh_node(i) if mesh else Node(name=f"n{i}")),
        st.integers(0, 5),
        st.booleans(),
    ),
    st.builds(
        lambda i, net, host, mac: ("nic", nic(i, net, host).id, nic(i, net, host, mac=mac)),
        st.integers(1, 40),
        st.sampled_from([n.name for n in NETWORKS]),
        st.sampled_from([f"n{i}" for i in range(7)]),  # n6 never registers
        st.sampled_from(["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:aa"]),
    ),
)
ops = st.lists(st.tuples(records, st.booleans()), min_size=1, max_size=40)


def apply_op(intent: Intent, op) -> tuple[str, str]:
    (kind, name, value), delete = op
    table = {"network": intent.networks, "node": intent.nodes, "nic": intent.nics}[kind]
    if delete:
        table.pop(name, None)
    else:
        table[name] = value
    return kind, name


@SETTINGS
@given(ops)
def test_incremental_sections_equal_the_full_computation(steps):
    """After every change, synced by its key alone, each node's assembled state is what
    compute_snapshots gives for the whole intent; a changed state always gets a new version."""
    intent, model = Intent(), Model(CFG)
    before = {}
    for op in steps:
        model.sync(intent, [apply_op(intent, op)])
        done = model.commit()
        assert_equal_to_full(model, intent)
        now = {n: content(assembled(model, n)) for n in model.heads}
        for name, snap in now.items():
            if before.get(name) != snap:
                assert name in done.nodes and model.heads[name].version == done.generation
        before = now


@SETTINGS
@given(ops)
def test_a_fresh_model_from_the_whole_intent_equals_the_full_computation(steps):
    intent = Intent()
    for op in steps:
        apply_op(intent, op)
    model = Model(CFG)
    model.sync(intent)
    model.commit()
    assert_equal_to_full(model, intent)


def cluster(nodes: int, nics_per_node: int) -> tuple[Intent, Model]:
    intent = Intent(
        networks={"ov1": NETWORKS[2], "ov2": NETWORKS[3], "lan": NETWORKS[0]},
        nodes={f"n{i}": mesh_node(i) for i in range(nodes)},
    )
    for i in range(nodes):
        for j in range(nics_per_node):
            k = i * nics_per_node + j + 1
            n = Nic(
                id=f"{k:012x}" + "0" * 20,
                network="ov1" if i < nodes // 2 else "ov2",
                node=f"n{i}",
                vm=f"vm{k}",
                mac=f"02:00:00:00:{k >> 8:02x}:{k & 255:02x}",
                ip=f"10.1.{k >> 8}.{k & 255}",
            )
            intent.nics[n.id] = n
    model = Model(CFG)
    model.sync(intent)
    model.commit()
    return intent, model


def test_an_attach_touches_one_node_section_one_vni_and_only_that_vnis_hosts():
    intent, model = cluster(nodes=40, nics_per_node=3)
    model.stats.clear()
    new = Nic(id="f" * 32, network="ov1", node="n3", vm="x", mac="02:aa:00:00:00:01", ip="10.1.9.9")
    intent.nics[new.id] = new
    model.sync(intent, [("nic", new.id)])
    done = model.commit()
    assert model.stats["node sections computed"] == 1
    assert {s.name for s in done.sections} == {"node", vni_section(1001)}
    assert model.stats["sections changed"] == 2
    hosts_of_ov1 = {f"n{i}" for i in range(20)}
    assert done.nodes == hosts_of_ov1  # the other VNI's 20 nodes see nothing
    assert model.stats["heads computed"] == 20
    assert_equal_to_full(model, intent)
    # the change log gives every other host a one-item delta
    vni = model.section("n0", vni_section(1001))
    base, keys = vni.last_change()
    assert keys == {new.id} and bytes(vni.delta(base, keys).upserts[0]) == vni.items[new.id]
    assert len(vni.delta(base, keys).upserts) == 1


def test_a_registration_touches_the_mesh_once_and_no_vni():
    intent, model = cluster(nodes=40, nics_per_node=3)
    model.stats.clear()
    intent.nodes["n99"] = mesh_node(99)
    model.sync(intent, [("node", "n99")])
    done = model.commit()
    assert model.stats["node sections computed"] == 1  # the new node's own
    assert {s.name for s in done.sections} == {"node", "mesh"}
    assert len(done.nodes) == 41  # every mesh node's HEAD names the new mesh version
    mesh = model.section("n0", "mesh")
    base, keys = mesh.last_change()
    assert keys == {"n99"}
    assert_equal_to_full(model, intent)


def test_a_detach_that_empties_a_vni_drops_the_section_and_the_ref():
    intent, model = cluster(nodes=2, nics_per_node=1)  # n0 on ov1, n1 on ov2
    gone = next(n for n in intent.nics.values() if n.node == "n0")
    del intent.nics[gone.id]
    model.sync(intent, [("nic", gone.id)])
    done = model.commit()
    assert done.nodes == {"n0"} and 1001 not in model.vnis
    assert [r.name for r in model.heads["n0"].refs] == ["node", "mesh"]
    assert model.section("n1", vni_section(1001)) is None  # not a section n1 may read
    assert_equal_to_full(model, intent)


def test_nothing_changed_commits_nothing_and_keeps_versions():
    intent, model = cluster(nodes=4, nics_per_node=2)
    versions = {n: h.version for n, h in model.heads.items()}
    model.stats.clear()
    model.sync(intent)  # the same intent again
    done = model.commit()
    assert not done.nodes and not done.sections and not model.stats
    assert {n: h.version for n, h in model.heads.items()} == versions


def test_force_continues_above_a_version_the_node_reports():
    intent, model = cluster(nodes=2, nics_per_node=1)
    model.force("n1", 500)
    done = model.commit()
    assert done.nodes == {"n1"} and model.heads["n1"].version == 501
    assert model.heads["n0"].version < 501


def test_a_node_sees_only_its_own_sections():
    intent, model = cluster(nodes=4, nics_per_node=1)
    assert model.section("n0", vni_section(1002)) is None  # n0 hosts only ov1
    assert model.section("n0", vni_section(1001)) is not None
    assert model.section("n0", "node") is model.node_sections["n0"]
    assert model.section("ghost", "mesh") is None


def test_paging_splits_items_below_the_budget():
    intent, model = cluster(nodes=2, nics_per_node=300)
    vni = model.section("n0", vni_section(1001))
    pages = vni.pages(budget=4096)
    assert len(pages) > 3
    for p in pages:
        assert sum(len(bytes(r)) + 1 for r in p.upserts) <= 4096
    assert sum(len(p.upserts) for p in pages) == len(vni.items) == 300


def test_an_unchanged_heartbeat_is_a_few_hundred_bytes_whatever_the_state():
    """The HEAD names sections by version and digest: its size depends on how many sections the
    node needs, never on their content (here 150 peers and 450 FDB entries)."""
    intent, model = cluster(nodes=150, nics_per_node=3)
    head = encode(model.head("n0", budget=1 << 20))
    assert len(head) < 400, head  # node, mesh, one VNI
    everything = sum(len(b) for s in model.sections_of("n0") for b in s.items.values())
    assert everything > 50 * len(head)
