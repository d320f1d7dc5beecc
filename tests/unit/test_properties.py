"""Property-based tests (hypothesis) of everything that decodes input from the wire: the agent's
snapshot gate (``agent.validate.accept``) and the API's request decoder plus its validators
(``controller.ops``) against an in-memory intent.

The properties: no exception but ``Rejected`` / ``ApiError``; every refusal has a message; a
refused request leaves the intent exactly as it was; every snapshot the controller computes from
an intent the API built is accepted (so the gate does not refuse everything); and whatever the
gate accepts, however mutated, still has the safety properties issue 8 asked for.

The number of inputs each decoder saw is printed at the end of the module (the closing note of
issue 8 quotes it).
"""

import base64
import ipaddress
import itertools
import re
from collections import Counter

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.validate import FLOOD_MAC, Rejected, accept
from controller import ops
from controller.compute import ClusterConfig, compute_snapshots
from schemas import api
from schemas.codec import encode
from schemas.desired import Snapshot
from schemas.errors import ApiError
from schemas.intent import Egress, Intent, NetworkType
from schemas.limits import SPECIAL_RANGES
from tests.unit import factories as f

replace = msgspec.structs.replace
CONFIG = ClusterConfig(underlay_cidrs=("198.18.0.0/24",))
SETTINGS = settings(
    deadline=None,
    database=None,  # no examples saved between runs: each run is its own
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INPUTS: Counter[str] = Counter()  # decoder → inputs fed to it


@pytest.fixture(scope="module", autouse=True)
def report_inputs(request):
    yield
    if INPUTS["agent.validate.accept: the controller's snapshots"]:  # so none is trivial
        assert INPUTS["agent.validate.accept: the controller's snapshots, with FDB"] > 0
        assert INPUTS["agent.validate.accept: the controller's snapshots, with NAT"] > 0
    lines = [f"  {name}: {count}" for name, count in sorted(INPUTS.items())]
    text = "\ngenerated inputs per decoder (this run):\n" + "\n".join(lines)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown without -s too
        print(text)


# --- values: mostly valid, sometimes hostile ----------------------------------------------------

KEYS = [base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 6)]
# Bad values by the kind of field they replace (a MAC by a MAC, a CIDR by a CIDR, ...): random
# text alone would almost never hit, say, an FDB entry for the broadcast MAC.
HOSTILE = {
    "mac": ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01", "00:00:00:00:00:00",
            "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:0G", "02:00:00:00:00"],
    "cidr": ["0.0.0.0/0", "10.0.0.1/24", "10.0.0.0/24", "10.1.0.0/24", "100.64.0.2/32",
             "100.64.0.0/16", "100.64.0.2/31", "198.18.0.12/32", "127.0.0.1/8", "169.254.0.1/16",
             "224.0.0.0/4", "240.0.0.1/24", "10.0.0.1/255.255.255.0", "10.0.0.1/31", "fd00::/64"],
    "ip": ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1", "100.64.0.1", "100.64.0.2",
           "100.64.0.3", "198.18.0.12", "10.0.0.1", "10.0.0.255", "10.1.0.3", "10.0.0.01", "::1"],
    "endpoint": ["198.18.0.12:70000", "198.18.0.12:0", "1.2.3.4:+1", "127.0.0.1:51820",
                 "100.64.0.2:51820", "224.0.0.1:51820", "198.18.0.12", ":51820"],
    "name": ["otéé", "ot;rm -rf", "otb1000", "otvx1000", "otb0", "otvx0", "otwg0", "eth0",
             "ot000000000001", "otn094a367b", "otn00000000", "OTB1000", "x" * 300, "\x00", ""],
    "other": ["", "nope", "\ud7ff", *KEYS, "n2", "LAN!"],
}  # fmt: skip
KINDS = [
    ("mac", re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")),
    ("cidr", re.compile(r"[0-9.]+/[0-9]+")),
    ("ip", re.compile(r"[0-9.]+")),
    ("endpoint", re.compile(r"[0-9.]+:[0-9]+")),
    ("name", re.compile(r"ot.*|wg.*")),
]
HOSTILE_STRINGS = [value for values in HOSTILE.values() for value in values]


def hostile_text(like: str, pick: int) -> str:
    kind = next((kind for kind, pattern in KINDS if pattern.fullmatch(like)), "other")
    return HOSTILE[kind][pick % len(HOSTILE[kind])]


HOSTILE_INTS = [0, 1, -1, 575, 576, 1279, 1280, 1390, 1440, 1500, 9216, 9217, 4789, 65535, 65536, 70000, 2**24 - 1, 2**24, 2**63 - 1, 2**63, -(2**63)]  # fmt: skip

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HOSTILE_INTS),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def mostly(valid: list, other: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value about four times in five: random requests would almost never succeed."""
    return st.integers(0, 9).flatmap(lambda n: st.sampled_from(valid) if n < 8 else other)


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
cidr = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: str(ipaddress.IPv4Network(t, strict=False))
)
text = st.text(max_size=24) | st.sampled_from(HOSTILE_STRINGS)
node_names = mostly(["n1", "n2", "n3"], text)
net_names = mostly(["lan", "nat", "ov", "ov2"], text)
SUBNETS = ["10.0.0.0/24", "10.1.0.0/24", "10.2.0.0/29", "192.168.9.0/24", "172.16.0.0/16"]
NIC_IDS = [f"{i:012x}" + "0" * 20 for i in range(1, 12)]  # as ids() hands them out

registrations = st.builds(
    api.NodeRegister,
    name=node_names,
    underlay_ip=mostly([f"198.18.0.{i}" for i in range(11, 15)], st.none() | ipv4 | text),
    wg_public_key=mostly(KEYS, st.none() | text),
    wg_listen_port=mostly([51820], st.none() | st.sampled_from(HOSTILE_INTS)),
)
creations = st.builds(
    api.NetworkCreate,
    name=net_names,
    type=mostly([NetworkType.BRIDGE, NetworkType.OVERLAY], st.sampled_from(NetworkType)),
    subnet=mostly(SUBNETS, cidr | text),
    egress=st.sampled_from(Egress),
    vni=st.none() | st.none() | st.sampled_from([1000, 1001, 0, 2**24, 42]),
)
attachments = st.builds(
    api.NicAttach,
    network=net_names,
    node=node_names,
    vm=mostly(["vm", "vm2", "vm3", "vm4"], text),  # one NIC per VM and network
    mac=mostly([None], mostly(["02:00:00:00:00:aa", "02-00-00-00-00-BB"], text)),
    ip=mostly([None], mostly(["10.0.0.7", "10.1.0.7"], ipv4 | text)),
    port_security=st.booleans(),
)
requests = st.one_of(
    registrations,
    creations,
    attachments,
    attachments,  # NICs are what makes snapshots rich
    st.builds(api.NetworkDelete, name=net_names, force=st.booleans()),
    st.builds(api.NicDetach, id=mostly([i[:12] for i in NIC_IDS] + NIC_IDS, text)),
    st.builds(api.NodeRemove, name=node_names, force=st.booleans()),
    st.builds(api.ByName, name=node_names),  # node.rekey
)
NETWORKS = [
    api.NetworkCreate(name="lan", type=NetworkType.BRIDGE, subnet="10.0.0.0/24"),
    api.NetworkCreate(name="nat", type=NetworkType.BRIDGE, subnet="10.2.0.0/24", egress=Egress.NAT),
    api.NetworkCreate(name="ov", type=NetworkType.OVERLAY, subnet="10.1.0.0/24"),
    api.NetworkCreate(name="ov2", type=NetworkType.OVERLAY, subnet="10.3.0.0/24", vni=4242),
    api.NetworkCreate(
        name="web", type=NetworkType.BRIDGE, subnet="192.168.9.0/24", egress=Egress.NAT
    ),
]


@st.composite
def sequences(draw) -> list[api.Request]:
    """A cluster first (nodes, networks, NICs: mostly valid, sometimes not), then anything."""
    nodes = draw(st.lists(st.sampled_from(["n1", "n2", "n3", "n4"]), min_size=1, max_size=4, unique=True))  # fmt: skip
    valid_nodes = [
        api.NodeRegister(
            name=n, underlay_ip=f"198.18.0.{11 + i}", wg_public_key=KEYS[i], wg_listen_port=51820
        )
        for i, n in enumerate(nodes)
    ]
    nets = draw(st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=4, unique=True))
    nic = st.builds(
        api.NicAttach,
        network=mostly([n.name for n in nets], text),
        node=mostly(nodes, text),
        vm=mostly(["vm", "vm2", "vm3", "vm4"], text),  # one NIC per VM and network
        mac=mostly([None], mostly(["02:00:00:00:00:aa", "02-00-00-00-00-BB"], text)),
        ip=mostly([None], mostly(["10.0.0.7", "10.1.0.7"], ipv4 | text)),
        port_security=st.booleans(),
    )
    return [
        *(draw(mostly([req], registrations)) for req in valid_nodes),
        *(draw(mostly([req], creations)) for req in nets),
        *draw(st.lists(nic, min_size=1, max_size=10)),
        *draw(st.lists(requests, max_size=15)),
    ]


# --- the API's writes, as controller.api makes them (validate first, write only after) -----------


def apply(intent: Intent, req: api.Request, new_id) -> None:
    ops.check_schema(req)
    match req:
        case api.NetworkCreate():
            net = ops.create_network(intent, req, 1.0, CONFIG)
            intent.networks[net.name] = net
        case api.NetworkDelete():
            net, nics = ops.delete_network(intent, req)
            for nic in nics:
                del intent.nics[nic.id]
            del intent.networks[net.name]
        case api.NicAttach():
            nic = ops.attach_nic(intent, req, 1.0, new_id)
            intent.nics[nic.id] = nic
        case api.NicDetach():
            del intent.nics[ops.find_nic(intent, req.id).id]
        case api.NodeRegister():
            node = ops.register_node(intent, req, 1.0, CONFIG.mesh_prefix)
            intent.nodes[node.name] = node
        case api.NodeRemove():
            node, nics = ops.remove_node(intent, req)
            for nic in nics:
                del intent.nics[nic.id]
            del intent.nodes[node.name]
        case api.ByName():
            node = ops.rekey_node(intent, req)
            intent.nodes[node.name] = node


def copy(intent: Intent) -> Intent:
    return msgspec.json.decode(msgspec.json.encode(intent), type=Intent)


def refused_cleanly(intent: Intent, req: api.Request, new_id) -> bool:
    """Apply ``req``; if refused, the error has a message and the intent is unchanged."""
    before = copy(intent)
    try:
        apply(intent, req, new_id)
    except ApiError as e:
        assert e.message.strip() and e.code in (400, 404, 409, 501)
        assert intent == before
        return True
    return False


def ids():
    """Deterministic NIC ids (hypothesis replays examples), unique in their first 12 digits."""
    counter = itertools.count(1)
    return lambda: f"{next(counter):012x}" + "0" * 20


# --- 1. request sequences: refusals are clean, and every computed snapshot is accepted -----------


@settings(SETTINGS, max_examples=400)
@given(sequences())
def test_api_sequences_refuse_cleanly_and_every_computed_snapshot_is_accepted(reqs):
    intent, new_id = Intent(networks={}, nics={}, nodes={}), ids()
    for req in reqs:
        INPUTS["controller.ops validators (request sequences)"] += 1
        refused_cleanly(intent, req, new_id)
    for name, snap in compute_snapshots(intent, CONFIG).items():
        snap = replace(snap, version=7)
        INPUTS["agent.validate.accept: the controller's snapshots"] += 1
        assert accept(encode(snap), name, 0) == snap
        INPUTS["agent.validate.accept: the controller's snapshots, with FDB"] += any(v.fdb for v in snap.vxlans)  # fmt: skip
        INPUTS["agent.validate.accept: the controller's snapshots, with NAT"] += bool(snap.nat_subnets)  # fmt: skip


# --- 2. mutated snapshots: refused with a message, or accepted and still safe ---------------------


def rich_snapshots() -> list[Snapshot]:
    """Three nodes (n3 off the mesh), an overlay, a NAT and a plain bridge network."""
    nodes = [f.node("n1", index=1), f.node("n2", index=2), f.node("n3", mesh=False)]
    nets = [f.overlay_net(), f.bridge_net("nat", nat=True), f.bridge_net("lan", subnet="10.9.0.0/24")]  # fmt: skip
    nics = [
        replace(f.nic(1, "ov", "n1"), ip="10.1.0.2"),
        replace(f.nic(2, "ov", "n2"), ip="10.1.0.3"),
        replace(f.nic(3, "ov", "n2"), ip="10.1.0.4"),
        f.nic(4, "nat", "n1"),
        replace(f.nic(5, "lan", "n1"), ip="10.9.0.2", port_security=False),
        replace(f.nic(6, "lan", "n3"), ip="10.9.0.3"),
    ]
    snaps = compute_snapshots(f.intent(nets, nics, nodes), CONFIG)
    return [replace(s, version=9) for s in snaps.values()]


BASES = rich_snapshots()


def paths(value, here=()):
    """Every place in a decoded JSON document: dict keys and list indexes."""
    yield here
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*here, i))


def mutate(doc, path, action: str, value):
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(last, parent[last])
    else:
        parent[last] = value
    return doc


def leaf(doc, path):
    for step in path:
        doc = doc[step]
    return doc


# "hostile" puts a known-bad value of the field's kind (HOSTILE) in a string or number field
ACTIONS = ["replace", "delete", "duplicate", "hostile", "hostile", "hostile"]
mutations = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.sampled_from(ACTIONS),
        json_value,
        st.integers(0, 99),  # which hostile value of the field's kind
        st.sampled_from(HOSTILE_INTS),
    ),
    min_size=1,
    max_size=3,
)


def mutated(doc, changes):
    for index, action, value, pick, bad_int in changes:
        where = list(paths(doc))
        path = where[index % len(where)]
        if action == "hostile":
            leaves = [p for p in where if isinstance(leaf(doc, p), (str, int))]
            if leaves:
                path = leaves[index % len(leaves)]
                old = leaf(doc, path)
                value = hostile_text(old, pick) if isinstance(old, str) else bad_int
        doc = mutate(doc, path, action, value)
    return doc


def check_accepted_is_safe(snap: Snapshot) -> None:
    """What issue 8 says a programmed snapshot never has, checked without agent.validate."""
    names = [d.name for d in (*snap.bridges, *snap.taps, *snap.vxlans)]
    names += [snap.wireguard.name] if snap.wireguard else []
    assert all(n.isascii() and n.startswith("ot") and len(n) <= 15 for n in names)
    assert all(1 <= v.port <= 65535 for v in snap.vxlans)
    assert all(not int(t.mac[:2], 16) & 1 and t.mac != FLOOD_MAC for t in snap.taps if t.mac)
    addresses = [ipaddress.IPv4Interface(b.address).network for b in snap.bridges if b.address]
    addresses += [ipaddress.IPv4Network(n) for n in snap.nat_subnets]
    addresses += [ipaddress.IPv4Network(t.ip) for t in snap.taps if t.ip]
    off_limits = [ipaddress.IPv4Network(p) for p in snap.infrastructure] + [n for n, _ in SPECIAL_RANGES]  # fmt: skip
    assert not any(a.overlaps(o) for a in addresses for o in off_limits)
    if snap.wireguard is None:
        assert not any(v.fdb for v in snap.vxlans)
        return
    mesh = ipaddress.IPv4Interface(snap.wireguard.address).network
    peers = set()
    for p in snap.wireguard.peers:
        nets = [ipaddress.IPv4Network(a) for a in p.allowed_ips]
        assert all(n.subnet_of(mesh) for n in nets)
        peers |= {str(n.network_address) for n in nets if n.prefixlen == 32}
    for v in snap.vxlans:
        for e in v.fdb:
            assert e.mac == FLOOD_MAC or not int(e.mac[:2], 16) & 1
            assert e.dst in peers


def gate(data: bytes, node: str, decoder: str) -> Snapshot | None:
    INPUTS[decoder] += 1
    try:
        snap = accept(data, node, 0)
    except Rejected as e:
        assert str(e).strip()
        return None
    check_accepted_is_safe(snap)
    INPUTS[f"{decoder} (accepted)"] += 1
    return snap


@settings(SETTINGS, max_examples=1000)
@given(st.sampled_from(BASES), mutations)
def test_structurally_mutated_snapshots_are_refused_or_safe(base, changes):
    doc = mutated(msgspec.json.decode(encode(base)), changes)
    gate(msgspec.json.encode(doc), base.node, "agent.validate.accept: mutated JSON")


@settings(SETTINGS, max_examples=600)
@given(
    st.sampled_from(BASES),
    st.lists(
        st.tuples(st.integers(0, 10**6), st.binary(max_size=4), st.integers(0, 4)),
        min_size=1,
        max_size=4,
    ),
)
def test_byte_mutated_snapshots_are_refused_or_safe(base, edits):
    data = bytearray(encode(base))
    for at, insert, cut in edits:
        at %= len(data) + 1
        data[at : at + cut] = insert
    gate(bytes(data), base.node, "agent.validate.accept: mutated bytes")


@settings(SETTINGS, max_examples=300)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_are_refused_with_a_message(data):
    gate(data, "n1", "agent.validate.accept: arbitrary bytes")


# --- 3. the API decoder + validators: mutated and arbitrary request bodies ------------------------

ENDPOINTS = {
    "network.create": api.NetworkCreate,
    "network.delete": api.NetworkDelete,
    "nic.attach": api.NicAttach,
    "nic.detach": api.NicDetach,
    "node.register": api.NodeRegister,
    "node.remove": api.NodeRemove,
    "node.rekey": api.ByName,
}


def populated() -> tuple[Intent, object]:
    """A small cluster built through the API's own validators."""
    intent, new_id = Intent(networks={}, nics={}, nodes={}), ids()
    for req in [
        api.NodeRegister(
            name="n1", underlay_ip="198.18.0.11", wg_public_key=KEYS[0], wg_listen_port=51820
        ),
        api.NodeRegister(
            name="n2", underlay_ip="198.18.0.12", wg_public_key=KEYS[1], wg_listen_port=51820
        ),
        api.NetworkCreate(
            name="lan", type=NetworkType.BRIDGE, subnet="10.0.0.0/24", egress=Egress.NAT
        ),
        api.NetworkCreate(name="ov", type=NetworkType.OVERLAY, subnet="10.1.0.0/24"),
        api.NicAttach(network="lan", node="n1", vm="vm1"),
        api.NicAttach(network="ov", node="n2", vm="vm2"),
    ]:
        apply(intent, req, new_id)
    return intent, new_id


REQUESTS = {
    "network.create": creations,
    "network.delete": st.builds(api.NetworkDelete, name=net_names, force=st.booleans()),
    "nic.attach": attachments,
    "nic.detach": st.builds(api.NicDetach, id=mostly([i[:12] for i in NIC_IDS], text)),
    "node.register": registrations,
    "node.remove": st.builds(api.NodeRemove, name=node_names, force=st.booleans()),
    "node.rekey": st.builds(api.ByName, name=node_names),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@settings(SETTINGS, max_examples=300)
@given(
    data=st.data(),
    changes=mutations,
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.binary(max_size=3), st.integers(0, 3)), max_size=2
    ),
)
def test_mutated_api_requests_are_refused_cleanly(endpoint, data, changes, edits):
    req = data.draw(REQUESTS[endpoint])
    doc = mutated(msgspec.json.decode(encode(req)), changes[: data.draw(st.integers(0, 2))])
    body = bytearray(msgspec.json.encode(doc))
    for at, insert, cut in edits:
        at %= len(body) + 1
        body[at : at + cut] = insert
    intent, new_id = populated()
    before = copy(intent)
    INPUTS[f"API decoder + ops: {endpoint}"] += 1
    try:
        parsed = ops.decode_request(endpoint, bytes(body), ENDPOINTS[endpoint])
    except ApiError as e:
        assert e.code == 400 and e.message.startswith(f"invalid {endpoint} request: ")
        assert intent == before
        return
    refused_cleanly(intent, parsed, new_id)


@settings(SETTINGS, max_examples=300)
@given(st.sampled_from(sorted(ENDPOINTS)), st.binary(max_size=200) | st.text(max_size=200).map(str.encode))  # fmt: skip
def test_arbitrary_api_bodies_are_refused_cleanly(endpoint, data):
    intent, new_id = populated()
    INPUTS[f"API decoder + ops: {endpoint}"] += 1
    try:
        parsed = ops.decode_request(endpoint, data, ENDPOINTS[endpoint])
    except ApiError as e:
        assert e.code == 400 and e.message.strip()
        return
    refused_cleanly(intent, parsed, new_id)
