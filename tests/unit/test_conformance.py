"""lab.conformance: the parsers of the standard tools' JSON and the pure ``compare``.

A hand-written snapshot and the kernel view that matches it give no difference; each kind of
drift, applied to that view one at a time, gives its own readable line.
"""

import copy

import msgspec
import pytest

from agent.nft import rules as nft_rules
from lab.conformance import (
    ConformanceError,
    KernelView,
    LinkView,
    PeerView,
    WgView,
    compare,
    desired_snapshot,
    parse_fdb,
    parse_links,
    parse_nft,
    parse_wg_dump,
    wait_conformant,
)
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan, WgPeer, WireGuard

OWN_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
PEER_KEY = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
TAP_OV, TAP_LAN = "ot5b37a9a04715", "ot05651063c5ca"
LOCAL_MAC, REMOTE_MAC, LAN_MAC = "02:22:a8:2c:b5:a0", "02:10:7a:40:c9:ef", "02:7a:b7:73:57:5c"
FLOOD = "00:00:00:00:00:00"

SNAPSHOT = Snapshot(
    node="n1",
    version=7,
    bridges=(
        Bridge(name="otb1000", mtu=1390),
        Bridge(name="otn094a367b", mtu=1500, address="10.81.0.1/24"),
    ),
    taps=(
        Tap(name=TAP_OV, bridge="otb1000", mtu=1390, mac=LOCAL_MAC, ip="10.80.0.2"),
        Tap(name=TAP_LAN, bridge="otn094a367b", mtu=1500, mac=LAN_MAC, ip="10.81.0.2"),
    ),
    nat_subnets=("10.81.0.0/24",),
    vxlans=(
        Vxlan(
            name="otvx1000",
            vni=1000,
            bridge="otb1000",
            local="100.64.0.1",
            mtu=1390,
            fdb=(FdbEntry(mac=FLOOD, dst="100.64.0.2"), FdbEntry(mac=REMOTE_MAC, dst="100.64.0.2")),
        ),
    ),
    wireguard=WireGuard(
        name="otwg0",
        address="100.64.0.1/16",
        listen_port=51820,
        mtu=1440,
        peers=(
            WgPeer(
                public_key=PEER_KEY, endpoint="198.18.0.12:51820", allowed_ips=("100.64.0.2/32",)
            ),
        ),
    ),
    infrastructure=("100.64.0.0/16", "198.18.0.0/24"),
)


def _link(name, kind, mtu, **kw) -> dict:
    """One device as ``ip -d -j addr show`` prints it (only the fields the parser reads)."""
    item = {"ifname": name, "mtu": mtu, "flags": ["BROADCAST", "UP", "LOWER_UP"]}
    info: dict = {"info_kind": kind}
    if kw.get("master"):
        item["master"] = kw["master"]
        info |= {"info_slave_kind": "bridge", "info_slave_data": {"learning": False}}
    if kind == "vxlan":
        info["info_data"] = {"id": 1000, "local": "100.64.0.1", "port": 4789, "learning": False}
    item["linkinfo"] = info
    item["addr_info"] = [{"family": "inet6", "local": "fe80::1", "prefixlen": 64}] + [
        {"family": "inet", "local": a.split("/")[0], "prefixlen": int(a.split("/")[1])}
        for a in kw.get("addresses", ())
    ]
    return item


ADDR_JSON = [
    {"ifname": "lo", "mtu": 65536, "flags": ["LOOPBACK", "UP"]},
    _link("eth0", "veth", 1500, addresses=["198.18.0.11/24"]),
    _link("otwg0", "tun", 1440, addresses=["100.64.0.1/16"]),
    _link("otb1000", "bridge", 1390),
    _link("otvx1000", "vxlan", 1390, master="otb1000"),
    _link(TAP_OV, "tun", 1390, master="otb1000"),
    _link("otn094a367b", "bridge", 1500, addresses=["10.81.0.1/24"]),
    _link(TAP_LAN, "tun", 1500, master="otn094a367b"),
]

FDB_JSON = [
    {"mac": "33:33:00:00:00:01", "ifname": "eth0", "flags": ["self"], "state": "permanent"},
    {"mac": "33:33:00:00:00:01", "ifname": "otb1000", "flags": ["self"], "state": "permanent"},
    {"mac": REMOTE_MAC, "ifname": "otvx1000", "flags": [], "master": "otb1000", "state": "static"},
    {"mac": "2e:32:b6:80:58:c9", "ifname": "otvx1000", "master": "otb1000", "state": "permanent"},
    {"mac": REMOTE_MAC, "ifname": "otvx1000", "dst": "100.64.0.2", "flags": ["self"], "state": "permanent"},
    {"mac": FLOOD, "ifname": "otvx1000", "dst": "100.64.0.2", "flags": ["self"], "state": "permanent"},
    {"mac": LOCAL_MAC, "ifname": TAP_OV, "flags": [], "master": "otb1000", "state": "static"},
    {"mac": LAN_MAC, "ifname": TAP_LAN, "flags": [], "master": "otn094a367b", "state": "static"},
]  # fmt: skip

WG_DUMP = (
    f"cHJpdmF0ZQ==\t{OWN_KEY}\t51820\toff\n"
    f"{PEER_KEY}\t(none)\t198.18.0.12:51820\t100.64.0.2/32\t1795866689\t2708\t2172\toff\n"
)


def _one_element_as_nft_prints_it(value):
    """nft lists a one-element anonymous set or list as the bare element."""
    if isinstance(value, dict):
        if set(value) == {"set"} and len(value["set"]) == 1:
            return value["set"][0]
        return {k: _one_element_as_nft_prints_it(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) == 1:
            return _one_element_as_nft_prints_it(value[0])
        return [_one_element_as_nft_prints_it(v) for v in value]
    return value


def ruleset_json(snapshot: Snapshot) -> dict:
    """``nft -j list ruleset`` of a kernel holding the snapshot's tables, chain by chain (the
    kernel's order), plus a foreign table that must be ignored."""
    items: list[dict] = [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "filter"}},
        {"rule": {"family": "inet", "table": "filter", "chain": "x", "expr": [{"accept": None}]}},
    ]
    for t in nft_rules.desired(nft_rules.spec(snapshot)).tables:
        where = {"family": t["family"], "table": "otherix"}
        items.append({"table": {"family": t["family"], "name": "otherix"}})
        items += [{"counter": {**where, "name": c, "packets": 3}} for c in t["counters"]]
        items += [{"set": {**where, **s, "elem": s.get("elem", [])[::-1]}} for s in t["sets"]]
        for chain in t["chains"]:
            items.append({"chain": {**where, **chain}})
            items += [
                {"rule": {**where, "chain": chain["name"], "handle": 9, "comment": "x",
                          "expr": _one_element_as_nft_prints_it(r["expr"])}}
                for r in t["rules"] if r["chain"] == chain["name"]
            ]  # fmt: skip
    return {"nftables": items}


def kernel(addr=ADDR_JSON, fdb=FDB_JSON, wg=WG_DUMP, ruleset=None) -> KernelView:
    links = parse_links(addr)
    return KernelView(
        links=links,
        **parse_fdb(fdb, links),
        wireguard=parse_wg_dump(wg),
        nft=parse_nft(ruleset if ruleset is not None else ruleset_json(SNAPSHOT)),
    )


def test_the_tools_output_of_a_conformant_node_gives_no_difference():
    assert compare(SNAPSHOT, kernel()) == []


def test_parsers_read_only_ot_devices_and_our_entries():
    view = kernel()
    assert set(view.links) == {"otwg0", "otb1000", "otvx1000", TAP_OV, "otn094a367b", TAP_LAN}
    assert view.links["otvx1000"] == LinkView(
        name="otvx1000", kind="vxlan", mtu=1390, up=True, master="otb1000", vni=1000,
        local="100.64.0.1", port=4789, learning=False, port_learning=False,
    )  # fmt: skip
    assert view.vxlan_fdb == {"otvx1000": {(FLOOD, "100.64.0.2"), (REMOTE_MAC, "100.64.0.2")}}
    assert view.port_fdb == {
        "otb1000": {REMOTE_MAC: "otvx1000", LOCAL_MAC: TAP_OV},
        "otn094a367b": {LAN_MAC: TAP_LAN},
    }
    assert view.wireguard == WgView(
        public_key=OWN_KEY,
        listen_port=51820,
        peers={
            PEER_KEY: PeerView(
                endpoint="198.18.0.12:51820", allowed_ips=frozenset({"100.64.0.2/32"})
            )
        },
    )
    assert set(view.nft) == {"inet", "bridge"}  # the foreign inet filter table is not ours


def _without(items, **match):
    return [i for i in items if not all(i.get(k) == v for k, v in match.items())]


def _drop_table(family):
    def ours(body):
        return body.get("family") == family and "otherix" in (body.get("table"), body.get("name"))

    items = ruleset_json(SNAPSHOT)["nftables"]
    return {"nftables": [i for i in items if not ours(next(iter(i.values())))]}


def _edit(ifname, **changes):
    items = copy.deepcopy(ADDR_JSON)
    for item in items:
        if item["ifname"] == ifname:
            item.update(changes)
    return items


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (kernel(addr=_without(ADDR_JSON, ifname="otvx1000")), "otvx1000: vxlan missing"),
        (kernel(addr=_edit("otvx1000", mtu=1400)), "otvx1000: mtu 1400, desired 1390"),
        (kernel(addr=_edit(TAP_OV, master="otn094a367b")),
         f"{TAP_OV}: master otn094a367b, desired otb1000"),
        (kernel(addr=_edit("otb1000", flags=["BROADCAST"])), "otb1000: down, desired up"),
        (kernel(addr=_edit("otn094a367b", addr_info=[])),
         "otn094a367b: addresses [], desired ['10.81.0.1/24']"),
        (kernel(addr=ADDR_JSON + [_link("ot0000deadbeef", "tun", 1500)]),
         "ot0000deadbeef: stray tap, not desired"),
        (kernel(fdb=_without(FDB_JSON, mac=REMOTE_MAC, dst="100.64.0.2")),
         f"otvx1000: fdb {REMOTE_MAC} → 100.64.0.2 missing"),
        (kernel(fdb=_without(FDB_JSON, mac=FLOOD)), f"otvx1000: flood entry {FLOOD} → 100.64.0.2 missing"),
        (kernel(fdb=FDB_JSON + [{"mac": "02:00:00:00:00:01", "ifname": "otvx1000", "dst": "10.99.0.3",
                                 "state": "permanent"}]),
         "otvx1000: fdb 02:00:00:00:00:01 → 10.99.0.3 not desired"),
        (kernel(fdb=FDB_JSON + [{"mac": "02:00:00:00:00:01", "ifname": TAP_OV, "master": "otb1000"}]),
         f"{TAP_OV}: learned fdb 02:00:00:00:00:01, learning is off"),
        (kernel(fdb=_without(FDB_JSON, mac=LOCAL_MAC)), f"otb1000: fdb {LOCAL_MAC} → port {TAP_OV} missing"),
        (kernel(wg=WG_DUMP.splitlines()[0]), f"otwg0: peer {PEER_KEY} missing"),
        (kernel(wg=WG_DUMP.replace("198.18.0.12:51820", "198.18.0.99:51820")),
         f"otwg0: peer {PEER_KEY} endpoint 198.18.0.99:51820, desired 198.18.0.12:51820"),
        (kernel(wg=WG_DUMP.replace("100.64.0.2/32", "100.64.0.2/32,10.0.0.0/8")),
         f"otwg0: peer {PEER_KEY} allowed ips ['10.0.0.0/8', '100.64.0.2/32'], desired ['100.64.0.2/32']"),
        (kernel(ruleset=_drop_table("inet")), "nft: table inet otherix missing"),
        (kernel(ruleset=_drop_table("bridge")), "nft: table bridge otherix missing"),
    ],
)  # fmt: skip
def test_each_kind_of_drift_is_one_readable_line(view, expected):
    diffs = compare(SNAPSHOT, view)
    assert expected in diffs, diffs


def test_a_flushed_table_names_its_missing_rules():
    flushed = {"nftables": [i for i in ruleset_json(SNAPSHOT)["nftables"] if "rule" not in i]}
    diffs = compare(SNAPSHOT, kernel(ruleset=flushed))
    assert "nft: table inet otherix: chain forward has 0 rules, desired 4" in diffs
    assert any("chain port_security rule 0" in d and d.endswith("missing") for d in diffs), diffs


def test_an_edited_rule_a_changed_set_and_a_table_not_desired_are_seen():
    items = ruleset_json(SNAPSHOT)["nftables"]
    edited = copy.deepcopy(items)
    rule = next(i["rule"] for i in edited if "rule" in i and i["rule"]["chain"] == "vxlan_guard")
    rule["expr"][-1] = {"accept": None}
    s = next(i["set"] for i in edited if "set" in i and i["set"]["name"] == "taps")
    s["elem"] = s["elem"][:1]
    diffs = compare(SNAPSHOT, kernel(ruleset={"nftables": edited}))
    assert any("chain vxlan_guard rule 0" in d and "missing" in d for d in diffs), diffs
    assert any("chain vxlan_guard rule" in d and "not desired" in d for d in diffs), diffs
    assert any(d.startswith("nft: table inet otherix: set taps is") for d in diffs), diffs
    # no NAT, no taps, no VXLAN: no table is wanted, so the kernel's are both "not desired"
    bare = msgspec.structs.replace(
        SNAPSHOT, bridges=(), taps=(), vxlans=(), nat_subnets=(), wireguard=None
    )
    diffs = compare(bare, kernel(addr=[], fdb=[]))
    assert "nft: table inet otherix not desired" in diffs
    assert "nft: table bridge otherix not desired" in diffs


def test_devices_without_the_ot_prefix_are_never_reported():
    foreign = [_link("keepme0", "bridge", 1000), _link("veth9", "veth", 9000, master="keepme0")]
    fdb = [{"mac": "02:00:00:00:00:09", "ifname": "veth9", "master": "keepme0", "state": "static"}]
    view = kernel(addr=ADDR_JSON + foreign, fdb=FDB_JSON + fdb)
    assert compare(SNAPSHOT, view) == []


def test_a_missing_wireguard_dump_is_a_difference_not_a_crash():
    view = msgspec.structs.replace(kernel(), wireguard=None, wireguard_error="agent not running")
    assert compare(SNAPSHOT, view) == ["otwg0: peers unreadable (agent not running)"]


def test_forwarding_off_on_a_node_with_nat_networks_is_seen():
    view = msgspec.structs.replace(kernel(), forwarding=False)
    assert compare(SNAPSHOT, view) == ["sysctl: net.ipv4.ip_forward 0, desired 1 (NAT networks)"]
    assert compare(SNAPSHOT, msgspec.structs.replace(kernel(), forwarding=True)) == []


def test_a_vxlan_with_learning_on_and_a_wrong_vni_is_seen():
    addr = copy.deepcopy(ADDR_JSON)
    vx = next(i for i in addr if i["ifname"] == "otvx1000")
    vx["linkinfo"]["info_data"] |= {"learning": True, "id": 1001}
    diffs = compare(SNAPSHOT, kernel(addr=addr))
    assert "otvx1000: learning True, desired False" in diffs
    assert "otvx1000: vni 1001, desired 1000" in diffs


class UnreachableLab:
    """A lab whose nats-server is down (as during a broker restart)."""

    async def nats_client(self, identity, **kw):
        raise ConnectionRefusedError("nats-server is down")


async def test_an_unreachable_bus_is_a_clear_error_and_wait_conformant_keeps_trying():
    with pytest.raises(ConformanceError, match="cannot reach the bus as n1: .*nats-server is down"):
        await desired_snapshot(UnreachableLab(), "n1")
    with pytest.raises(AssertionError, match="not conformant within 0.3s: n1: n1: check failed"):
        await wait_conformant(UnreachableLab(), ["n1"], timeout=0.3, interval=0.1)


class SilentLab:
    """A bus on which the controller publishes nothing (controller down)."""

    class Client:
        async def subscribe(self, subject, cb):
            self.subject = subject

        async def close(self):
            pass

    async def nats_client(self, identity, **kw):
        return self.Client()


async def test_no_snapshot_within_the_timeout_is_a_clear_error():
    with pytest.raises(
        ConformanceError,
        match=r"no desired snapshot for n1 on otherix\.v1\.desired\.n1 within 0\.1s",
    ):
        await desired_snapshot(SilentLab(), "n1", timeout=0.1)
