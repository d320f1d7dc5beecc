"""nftables rules, pure: snapshot → spec (validated), the JSON batch, digest, parsing ``nft -j``
output, and the plan (kernel behaviour is tests/netns/test_nft_applier.py's)."""

import json

import msgspec
import pytest

from agent.nft.rules import (
    DROP,
    REASONS,
    Counter,
    NftObserved,
    NftSpec,
    desired,
    parse_observed,
    plan,
    render,
    spec,
)
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan, WgPeer, WireGuard

NAT_BR, OV_BR = "otn12345678", "otb1000"
TAP_A, TAP_B, TAP_OPEN = "ot0000000000aa", "ot0000000000bb", "ot0000000000cc"
SNAP = Snapshot(
    node="n1",
    version=1,
    bridges=(
        Bridge(name=NAT_BR, mtu=1500, address="10.10.0.1/24"),
        Bridge(name=OV_BR, mtu=1390),
    ),
    taps=(
        Tap(name=TAP_A, bridge=NAT_BR, mtu=1500, mac="02:00:00:00:00:AA", ip="10.10.0.2"),
        Tap(name=TAP_B, bridge=OV_BR, mtu=1390, mac="02:00:00:00:00:bb", ip="10.20.0.2"),
        Tap(
            name=TAP_OPEN,
            bridge=OV_BR,
            mtu=1390,
            mac="02:00:00:00:00:cc",
            ip="10.20.0.3",
            port_security=False,
        ),
    ),  # fmt: skip
    nat_subnets=("10.10.0.0/24",),
    vxlans=(
        Vxlan(
            name="otvx1000",
            vni=1000,
            bridge=OV_BR,
            local="100.64.0.1",
            mtu=1390,
            fdb=(
                FdbEntry(mac="00:00:00:00:00:00", dst="100.64.0.2"),
                FdbEntry(mac="02:00:00:00:00:dd", dst="100.64.0.2"),
            ),
        ),
        # a network no peer shares with us: nobody may send VXLAN into it
        Vxlan(name="otvx2000", vni=2000, bridge=OV_BR, local="100.64.0.1", mtu=1390),
    ),
    wireguard=WireGuard(
        name="otwg0",
        address="100.64.0.1/16",
        listen_port=51820,
        mtu=1440,
        peers=(
            WgPeer(public_key="k", endpoint="198.18.0.12:51820", allowed_ips=("100.64.0.2/32",)),
        ),
    ),
    infrastructure=("100.64.0.0/16", "198.18.0.0/25", "198.18.0.128/26", "198.18.0.192/27"),
)


def rules_of(batch: str) -> list[dict]:
    return [c["add"]["rule"] for c in json.loads(batch)["nftables"] if "rule" in c.get("add", {})]


def elements(batch: str, family: str, name: str) -> list:
    for c in json.loads(batch)["nftables"]:
        s = c.get("add", {}).get("set")
        if s and (s["family"], s["name"]) == (family, name):
            return s.get("elem", [])
    raise KeyError(name)


def test_spec_validates_and_normalises_the_snapshot():
    s = spec(SNAP)
    assert [t.name for t in s.secured_taps] == [TAP_A, TAP_B]  # port security off: not listed
    assert s.secured_taps[0].mac == "02:00:00:00:00:aa"  # lower case, as nft prints it
    assert [(b.name, b.gateway) for b in s.bridges] == [(OV_BR, None), (NAT_BR, "10.10.0.1")]
    assert s.vxlan_guard is not None
    assert s.vxlan_guard.local == "100.64.0.1"
    assert s.vxlan_guard.vnis == ((1000, ("100.64.0.2",)), (2000, ()))
    assert s.infrastructure == SNAP.infrastructure and s.mesh == "otwg0"
    assert spec(msgspec.structs.replace(SNAP, vxlans=())).vxlan_guard is None


@pytest.mark.parametrize(
    "change",
    [
        {"taps": (Tap(name="eth0", bridge=NAT_BR, mtu=1500),)},  # not ours
        {"taps": (Tap(name="otéé", bridge=NAT_BR, mtu=1500),)},  # not ASCII
        {"taps": (Tap(name=TAP_A, bridge=NAT_BR, mtu=1500, mac="01:00:5e:00:00:01"),)},
        {"taps": (Tap(name=TAP_A, bridge=NAT_BR, mtu=1500, mac="02:00:00:00:00"),)},
        {"taps": (Tap(name=TAP_A, bridge=NAT_BR, mtu=1500, ip='10.0.0.1" drop'),)},
        {"nat_subnets": ("10.1.0.0/24; flush ruleset",)},
        {"nat_subnets": ("fd00::/64",)},
        {"bridges": (Bridge(name='otb1" accept', mtu=1500),)},
        {"infrastructure": ("100.64.0.0/400",)},
    ],
)
def test_spec_refuses_values_that_are_not_what_they_claim(change):
    with pytest.raises(ValueError):
        spec(msgspec.structs.replace(SNAP, **change))


def test_a_secured_tap_without_mac_or_ip_lets_nothing_out():
    bare = msgspec.structs.replace(SNAP, taps=(Tap(name=TAP_A, bridge=NAT_BR, mtu=1500),))
    batch = render(desired(spec(bare)))
    assert elements(batch, "bridge", "secured") == [TAP_A]
    assert elements(batch, "bridge", "nic_mac") == [] and elements(batch, "bridge", "nic_ip") == []


def test_port_security_rules_do_not_grow_per_nic():
    one = desired(spec(msgspec.structs.replace(SNAP, taps=SNAP.taps[:1])))
    many_taps = tuple(
        Tap(name=f"ot{i:012x}", bridge=NAT_BR, mtu=1500, mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
            ip=f"10.10.{i >> 8}.{i & 255}")
        for i in range(1, 300)
    )  # fmt: skip
    many = desired(spec(msgspec.structs.replace(SNAP, taps=many_taps)))
    assert one.rule_count == many.rule_count
    assert len(many.sets["bridge nic_mac"]) == 299 and one.digest != many.digest


def test_the_batch_replaces_both_tables_in_one_transaction_and_counts_every_drop():
    want = desired(spec(SNAP))
    batch = json.loads(render(want))["nftables"]
    assert batch[0] == {"metainfo": {"json_schema_version": 1}}
    head = [next(iter(c)) + " " + c[next(iter(c))]["table"]["family"] for c in batch[1:5]]
    assert head == ["add inet", "add bridge", "delete inet", "delete bridge"]
    families = {c["add"][k]["family"] for c in batch[5:] for k in c["add"]}
    assert families == {"inet", "bridge"}  # nothing else is ever named
    assert all(
        c["add"][k].get("table", "otherix") == "otherix" for c in batch[5:] for k in c["add"]
    )
    rules = rules_of(render(want))
    assert len(rules) == want.rule_count == 29
    assert {r["comment"] for r in rules} == {want.digest}
    drops = [r for r in rules if {"drop": None} in r["expr"]]
    assert all(any("counter" in e for e in r["expr"]) for r in drops)  # every drop is counted
    counted = {e["counter"] for r in rules for e in r["expr"] if "counter" in e}
    assert counted == set(REASONS)


def test_vxlan_guard_accepts_only_peers_through_the_mesh_to_our_tunnel_address():
    """Per VNI: only the peers that host that network (its FDB's destinations) may send into it,
    through the mesh, to our tunnel address; a peer could inject into any VNI before (review)."""
    rules = rules_of(render(desired(spec(SNAP))))
    guard = [r["expr"] for r in rules if r["chain"] == "vxlan_guard"]
    assert guard == [
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "otwg0"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "100.64.0.1"}},
            {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": 96, "len": 24}}, "right": 1000}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": ["100.64.0.2"]}}},
            {"return": None},
        ],
        [{"counter": "vxlan_guard"}, {"drop": None}],
    ]  # fmt: skip
    # without the mesh there is nobody to accept VXLAN from
    alone = msgspec.structs.replace(SNAP, wireguard=None)
    guard = [
        r["expr"] for r in rules_of(render(desired(spec(alone)))) if r["chain"] == "vxlan_guard"
    ]
    assert guard == [[{"counter": "vxlan_guard"}, {"drop": None}]]


def test_vm_bridges_reach_only_their_gateway_and_never_the_mesh():
    batch = render(desired(spec(SNAP)))
    assert elements(batch, "inet", "gateways") == [{"concat": [NAT_BR, "10.10.0.1"]}]
    assert elements(batch, "inet", "routed") == [NAT_BR]  # an overlay bridge routes nothing
    assert sorted(elements(batch, "inet", "vm_bridges")) == [OV_BR, NAT_BR]
    assert elements(batch, "inet", "infrastructure") == [
        {"prefix": {"addr": "100.64.0.0", "len": 16}},
        {"prefix": {"addr": "198.18.0.0", "len": 25}},
        {"prefix": {"addr": "198.18.0.128", "len": 26}},
        {"prefix": {"addr": "198.18.0.192", "len": 27}},
    ]
    chains = {r["chain"] for r in rules_of(batch)}
    assert chains == {"postrouting", "input", "vxlan_guard", "vm_to_host", "forward",
                      "vm_forward", "prerouting", "port_security"}  # fmt: skip
    last = [r for r in rules_of(batch) if r["chain"] == "vm_to_host"][-1]
    assert last["expr"] == [{"counter": "host_isolation"}, {"drop": None}]


def test_deterministic_and_nothing_wanted():
    shuffled = msgspec.structs.replace(SNAP, taps=SNAP.taps[::-1], bridges=SNAP.bridges[::-1])
    assert render(desired(spec(shuffled))) == render(desired(spec(SNAP)))
    nothing = desired(NftSpec())
    assert nothing.digest is None and nothing.rule_count == 0 and render(nothing) == DROP
    assert {json.dumps(c) for c in json.loads(DROP)["nftables"]} == {
        json.dumps({op: {"table": {"family": f, "name": "otherix"}}})
        for op in ("add", "delete")
        for f in ("inet", "bridge")
    }


def test_render_carries_the_drop_counters_over():
    want = desired(spec(SNAP))
    batch = json.loads(render(want, {"port_security_mac": Counter(7, 420), "gone": Counter(1)}))
    counters = {c["add"]["counter"]["name"]: c["add"]["counter"] for c in batch["nftables"]
                if "counter" in c.get("add", {})}  # fmt: skip
    assert (counters["port_security_mac"]["packets"], counters["port_security_mac"]["bytes"]) == (
        7,
        420,
    )
    assert counters["vxlan_guard"]["packets"] == 0 and "gone" not in counters


def listing(want, family: str, comment: str | None = "same", extra_elem=None) -> dict:
    """What ``nft -j list table`` prints for one rendered table."""
    items: list[dict] = [{"metainfo": {}}, {"table": {"family": family, "name": "otherix"}}]
    for c in json.loads(render(want))["nftables"]:
        add = c.get("add", {})
        kind = next(iter(add), None)
        if kind and add[kind]["family"] == family and kind != "table":
            obj = dict(add[kind])
            if kind == "rule" and comment != "same":
                obj["comment"] = comment
            if kind == "set" and extra_elem and obj["name"] == extra_elem[0]:
                obj["elem"] = [*obj.get("elem", []), extra_elem[1]]
            items.append({kind: obj})
    return {"nftables": items}


def test_parse_observed_and_plan_noop_replace_drop():
    want = desired(spec(SNAP))
    tables = [listing(want, "inet"), listing(want, "bridge")]
    observed = msgspec.structs.replace(parse_observed(*tables), forwarding=True)
    assert observed.digest == want.digest and observed.rule_count == want.rule_count
    assert observed.drops == dict.fromkeys(sorted(REASONS), 0)
    assert plan(want, observed).writes == 0  # the second resync: nothing
    # a missing table, a hand-added rule, a hand-added set element: all reloaded
    assert plan(want, parse_observed(tables[0])).load is not None
    hand = [listing(want, "inet"), listing(want, "bridge", comment=None)]
    assert parse_observed(*hand).digest is None and plan(want, parse_observed(*hand)).load
    sneaky = [
        tables[0],
        listing(want, "bridge", extra_elem=("nic_mac", {"concat": [TAP_A, "02:00:00:00:00:bb"]})),
    ]
    assert plan(want, parse_observed(*sneaky)).load == render(want)
    # forwarding
    off = msgspec.structs.replace(observed, forwarding=False)
    assert plan(want, off).enable_forwarding and plan(want, off).load is None
    # nothing wanted: our tables go, and only when they exist
    nothing = desired(NftSpec())
    assert plan(nothing, observed).load == DROP and plan(nothing, observed).digest is None
    assert plan(nothing, NftObserved(exists=False, digest=None, rule_count=0)).writes == 0
    assert parse_observed() == NftObserved(exists=False, digest=None, rule_count=0)
    # the guard alone needs no forwarding
    guard_only = desired(spec(Snapshot(node="n1", version=1, vxlans=SNAP.vxlans)))
    assert not guard_only.forwarding and not plan(guard_only, off).enable_forwarding


def test_a_reload_keeps_the_counters_it_observed():
    want = desired(spec(SNAP))
    seen = NftObserved(exists=True, digest="otherix:old", rule_count=3,
                       counters={"vxlan_guard": Counter(5, 500)})  # fmt: skip
    batch = json.loads(plan(want, seen).load)
    kept = [c["add"]["counter"] for c in batch["nftables"] if "counter" in c.get("add", {})]
    assert {
        "family": "inet",
        "table": "otherix",
        "name": "vxlan_guard",
        "packets": 5,
        "bytes": 500,
    } in kept


def test_nothing_entering_through_a_tap_reaches_the_node_or_is_routed():
    """Frames to link-local group MACs skip the bridge hooks and reach the host stack with the
    tap as input device (found by review): input and forward drop every tap, open ones too,
    before anything else."""
    batch = render(desired(spec(SNAP)))
    assert sorted(elements(batch, "inet", "taps")) == sorted([TAP_A, TAP_B, TAP_OPEN])
    for chain, reason in (("input", "host_isolation"), ("forward", "forward_isolation")):
        first = next(r for r in rules_of(batch) if r["chain"] == chain)
        assert first["expr"] == [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@taps"}},
            {"counter": reason},
            {"drop": None},
        ]


def test_adjacent_nat_subnets_stay_separate_networks():
    """10.50.0.0/24 and 10.50.1.0/24 were collapsed into one /23: the two NAT networks reached
    each other unmasqueraded and unisolated (found by review)."""
    two = msgspec.structs.replace(SNAP, nat_subnets=("10.50.1.0/24", "10.50.0.0/24"))
    s = spec(two)
    assert s.nat_subnets == ("10.50.0.0/24", "10.50.1.0/24")
    text = json.dumps(rules_of(render(desired(s))))
    assert "10.50.0.0" in text and "10.50.1.0" in text and '"len": 23' not in text


def test_related_icmp_reaches_the_node_only_towards_the_vms_gateway():
    """An ICMP error quoting the node's WireGuard flow lowered its path MTU (found by review):
    "related" is accepted only with the bridge's own gateway as destination."""
    rules = [r for r in rules_of(render(desired(spec(SNAP)))) if r["chain"] == "vm_to_host"]
    related = [r for r in rules if '"related"' in json.dumps(r["expr"])]
    assert len(related) == 1 and "@gateways" in json.dumps(related[0]["expr"])
    assert not any('"established", "related"' in json.dumps(r["expr"]) for r in rules)
