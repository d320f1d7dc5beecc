"""The agent's snapshot gate (``agent.validate``): what it accepts, and every refusal with its
reason. The snapshot under test is the controller's own (``controller.compute``), changed one
field at a time. API request validation is tested where the API answers
(tests/integration/test_api.py); the issue's hostile snapshots are in test_hostile_snapshots.py.
"""

import msgspec
import pytest

from agent.validate import Rejected, accept, check_snapshot
from controller.compute import ClusterConfig, compute_snapshots
from schemas import limits
from schemas.codec import decode, encode
from schemas.desired import SNAPSHOT_SCHEMA, Bridge, FdbEntry, Snapshot, Tap, WgPeer
from schemas.messages import Ack, Health
from tests.unit import factories as f

replace = msgspec.structs.replace


def good_snapshot(node: str = "n1", version: int = 5) -> Snapshot:
    """n1 and n2 on the mesh; an overlay with a NIC on each, a NAT network with a NIC on n1."""
    nics = [
        replace(f.nic(1, "ov", "n1"), ip="10.1.0.2"),
        replace(f.nic(2, "ov", "n2"), ip="10.1.0.3"),
        f.nic(3, "lan", "n1"),
    ]
    intent = f.intent(
        [f.overlay_net(), f.bridge_net("lan", nat=True)],
        nics,
        [f.node("n1", index=1), f.node("n2", index=2)],
    )
    config = ClusterConfig(underlay_cidrs=("198.18.0.0/24",))
    return replace(compute_snapshots(intent, config)[node], version=version)


GOOD = good_snapshot()
OVERLAY_BRIDGE, NAT_BRIDGE = GOOD.bridges  # otb1000, otn094a367b (10.0.0.1/24)
OVERLAY_TAP, NAT_TAP = GOOD.taps  # 02:..:01 10.1.0.2, 02:..:03 10.0.0.4
VXLAN = GOOD.vxlans[0]  # FDB: flood and 02:..:02 to 100.64.0.2
WG = GOOD.wireguard
assert WG is not None
PEER = WG.peers[0]  # n2, 100.64.0.2/32


def raw(**changes) -> bytes:
    return encode(replace(GOOD, **changes))


def bridges(**changes) -> bytes:
    """The NAT bridge changed."""
    return raw(bridges=(OVERLAY_BRIDGE, replace(NAT_BRIDGE, **changes)))


def taps(**changes) -> bytes:
    """The NAT network's tap changed."""
    return raw(taps=(OVERLAY_TAP, replace(NAT_TAP, **changes)))


def vxlan(**changes) -> bytes:
    return raw(vxlans=(replace(VXLAN, **changes),))


def fdb(*entries: tuple[str, str]) -> bytes:
    return vxlan(fdb=tuple(FdbEntry(mac=mac, dst=dst) for mac, dst in entries))


def wireguard(**changes) -> bytes:
    return raw(wireguard=replace(WG, **changes))


def peer(**changes) -> bytes:
    return wireguard(peers=(replace(PEER, **changes),))


def test_the_controllers_snapshots_are_accepted_at_the_same_or_a_newer_version():
    assert accept(encode(GOOD), "n1", applied_version=5) == GOOD
    assert accept(encode(GOOD), "n1", applied_version=0) == GOOD
    n2 = good_snapshot("n2")
    assert accept(encode(n2), "n2", applied_version=0) == n2


@pytest.mark.parametrize(
    ("data", "node", "applied", "message"),
    [
        (b"{not json", "n1", 0, "malformed snapshot: JSON is malformed: object keys must be strings (byte 1)"),
        (b'{"node": "n1"}', "n1", 0, "malformed snapshot: Object missing required field `version`"),
        (b'{"node": "n1", "version": "7"}', "n1", 0, "malformed snapshot: Expected `int`, got `str` - at `$.version`"),
        (raw(schema=2), "n1", 0, "snapshot schema 2 is not supported (this agent speaks 3)"),  # an older controller's
        (raw(schema=4), "n1", 0, "snapshot schema 4 is not supported (this agent speaks 3)"),
        (raw(), "n2", 0, "snapshot is for node 'n1', this is 'n2'"),
        (raw(), "n1", 6, "stale snapshot: version 5 is older than applied version 6"),
    ],
)  # fmt: skip
def test_refused_before_the_content_is_read(data, node, applied, message):
    with pytest.raises(Rejected) as e:
        accept(data, node, applied)
    assert str(e.value) == message


# One row per rule: the snapshot with one field changed, and the whole reason after
# "invalid snapshot version 5: ". Each names where, the field and its value.
# fmt: off
CONTENT = [
    # device names: ASCII, in their family, once
    (raw(bridges=(Bridge(name="eth0", mtu=1500),), taps=(), vxlans=(), nat_subnets=()), "bridges[0]: name 'eth0' is not an Otherix bridge name (otn + 8 hex digits, or otb + a VNI)"),
    (raw(bridges=(OVERLAY_BRIDGE, replace(NAT_BRIDGE, name="ot;rm -rf"))), "bridges[1]: name 'ot;rm -rf' is not an Otherix bridge name (otn + 8 hex digits, or otb + a VNI)"),
    (raw(bridges=(OVERLAY_BRIDGE, replace(NAT_BRIDGE, name="otb0"))), "bridges[1]: name 'otb0' is not an Otherix bridge name (otn + 8 hex digits, or otb + a VNI)"),
    (raw(bridges=(OVERLAY_BRIDGE, replace(NAT_BRIDGE, name="otb16777216"))), "bridges[1]: name 'otb16777216' is not an Otherix bridge name (otn + 8 hex digits, or otb + a VNI)"),
    (raw(bridges=(OVERLAY_BRIDGE, OVERLAY_BRIDGE)), "bridges[1]: name 'otb1000' appears twice"),
    (taps(name="otn094a367b"), "taps[1]: name 'otn094a367b' is not an Otherix tap name (ot + 12 hex digits)"),
    (taps(name="ot000000000001"), "taps[1]: name 'ot000000000001' appears twice"),
    (taps(name="OT000000000003"), "taps[1]: name 'OT000000000003' is not an Otherix tap name (ot + 12 hex digits)"),
    (vxlan(name="otvx1000\n"), "vxlans[0]: name 'otvx1000\\n' is not an Otherix VXLAN name (otvx + a VNI)"),
    (wireguard(name="wg0"), "wireguard: name 'wg0' is not an Otherix WireGuard name (otwg0)"),
    # MTUs: derived from the underlay MTU, a tap's from its bridge
    (raw(underlay_mtu=576), "snapshot: underlay_mtu 576 is outside 1280..9216"),
    (bridges(mtu=10), "bridge otn094a367b: mtu 10 is not 1500, its MTU on an underlay MTU of 1500"),
    (raw(bridges=(replace(OVERLAY_BRIDGE, mtu=1500), NAT_BRIDGE)), "bridge otb1000: mtu 1500 is not 1390, its MTU on an underlay MTU of 1500"),
    (vxlan(mtu=1440), "vxlan otvx1000: mtu 1440 is not 1390, its MTU on an underlay MTU of 1500"),
    (wireguard(mtu=1500), "wireguard otwg0: mtu 1500 is not 1440, its MTU on an underlay MTU of 1500"),
    (taps(mtu=1390), "tap ot000000000003: mtu 1390 is not 1500, the MTU of its bridge"),
    # taps: on a bridge of the snapshot, a unicast MAC and an address of their network
    (taps(bridge="otn00000000"), "tap ot000000000003: bridge 'otn00000000' is not a bridge of this snapshot"),
    (taps(nic="000000000004ffff"), "tap ot000000000003: nic '000000000004ffff' is not the NIC id the tap is named after"),
    (taps(mac="01:00:5e:00:00:01"), "tap ot000000000003: mac '01:00:5e:00:00:01' is a broadcast or multicast MAC; it must be unicast"),
    (taps(mac="00:00:00:00:00:00"), "tap ot000000000003: mac '00:00:00:00:00:00' is an all-zero MAC; it must be unicast"),
    (taps(mac="02:00:00:00:00:01"), "tap ot000000000003: mac '02:00:00:00:00:01' is the MAC of tap ot000000000001 too"),
    (taps(mac="02:00:00:00:00:0G"), "tap ot000000000003: mac '02:00:00:00:00:0G' is not a lowercase MAC like 02:00:00:00:00:01"),
    (taps(ip="10.0.1.4"), "tap ot000000000003: ip '10.0.1.4' is outside its network's subnet 10.0.0.0/24"),
    (taps(ip="10.0.0.1"), "tap ot000000000003: ip '10.0.0.1' is the gateway, network or broadcast address of 10.0.0.0/24"),
    (taps(ip="10.0.0.255"), "tap ot000000000003: ip '10.0.0.255' is the gateway, network or broadcast address of 10.0.0.0/24"),
    (taps(ip="10.0.0.04"), "tap ot000000000003: ip '10.0.0.04' is not an IPv4 address (Leading zeros are not permitted in '04' in '10.0.0.04')"),
    (raw(taps=(replace(OVERLAY_TAP, ip="100.64.0.9"), NAT_TAP)), "tap ot000000000001: ip '100.64.0.9' overlaps the mesh prefix 100.64.0.0/16"),
    (raw(taps=(replace(OVERLAY_TAP, ip="198.18.0.12"), NAT_TAP)), "tap ot000000000001: ip '198.18.0.12' overlaps the infrastructure prefix 198.18.0.0/24"),
    (raw(taps=(replace(OVERLAY_TAP, ip="127.0.0.1"), NAT_TAP)), "tap ot000000000001: ip '127.0.0.1' overlaps the loopback range 127.0.0.0/8"),
    (raw(taps=(OVERLAY_TAP, NAT_TAP, Tap(name="ot000000000009", bridge=NAT_BRIDGE.name, mtu=1500, ip="10.0.0.4"))), "tap ot000000000009: ip '10.0.0.4' is the address of tap ot000000000003 too"),
    # gateways: a /8../30 subnet that is not infrastructure nor special, not overlapping another
    (bridges(address="10.0.0.1"), "bridge otn094a367b: address '10.0.0.1' is not written canonically as 10.0.0.1/32"),
    (bridges(address="10.0.0.1/255.255.255.0"), "bridge otn094a367b: address '10.0.0.1/255.255.255.0' is not written canonically as 10.0.0.1/24"),
    (bridges(address="10.0.0.300/24"), "bridge otn094a367b: address '10.0.0.300/24' is not an IPv4 address/prefix (Octet 300 (> 255) not permitted in '10.0.0.300')"),
    (bridges(address="10.0.0.0/24"), "bridge otn094a367b: address '10.0.0.0/24' is its subnet's network or broadcast address"),
    (bridges(address="10.0.0.1/31"), "bridge otn094a367b: address '10.0.0.1/31' has a prefix outside /8../30 (a gateway with room for NICs)"),
    (bridges(address="198.18.0.1/24"), "bridge otn094a367b: address '198.18.0.1/24' overlaps the infrastructure prefix 198.18.0.0/24"),
    (bridges(address="169.254.0.1/24"), "bridge otn094a367b: address '169.254.0.1/24' overlaps the link-local range 169.254.0.0/16"),
    (raw(bridges=(replace(NAT_BRIDGE, name="otn00000001", address="10.0.0.129/25"), NAT_BRIDGE)), "bridge otn00000001: address '10.0.0.129/25' overlaps 10.0.0.0/24 of bridge otn094a367b"),
    # an overlay has no way into the node, so no gateway (found by review)
    (raw(bridges=(replace(OVERLAY_BRIDGE, address="10.9.0.1/24"), NAT_BRIDGE)), "bridge otb1000: address '10.9.0.1/24' is set on an overlay bridge"),
    (bridges(network="LAN!"), "bridge otn094a367b: network 'LAN!' is not a network name"),
    # NAT: only the subnet of a gateway this snapshot has
    (raw(nat_subnets=("10.0.0.1/24",)), "snapshot: nat_subnets '10.0.0.1/24' is not an IPv4 network (10.0.0.1/24 has host bits set)"),
    (raw(nat_subnets=("10.9.0.0/24",)), "snapshot: nat_subnets '10.9.0.0/24' is not the subnet of a bridge's gateway address"),
    (raw(nat_subnets=("10.0.0.0/24", "10.0.0.0/24")), "snapshot: nat_subnets '10.0.0.0/24' appears twice"),
    (raw(nat_subnets=("100.64.0.0/24",)), "snapshot: nat_subnets '100.64.0.0/24' overlaps the mesh prefix 100.64.0.0/16"),
    (raw(infrastructure=("0.0.0.0/0",)), "snapshot: infrastructure '0.0.0.0/0' is the whole IPv4 space"),
    # the overlay: its VNI's devices, this node's tunnel address, FDB to current peers only
    (vxlan(vni=1001), "vxlan otvx1000: vni 1001 does not match the device name (otvx1001 would)"),
    (vxlan(vni=0), "vxlan otvx1000: vni 0 is outside 1..16777215"),
    (vxlan(bridge="otn094a367b"), "vxlan otvx1000: bridge 'otn094a367b' is not otb1000, a bridge of this snapshot"),
    (raw(bridges=(NAT_BRIDGE,), taps=(NAT_TAP,)), "vxlan otvx1000: bridge 'otb1000' is not otb1000, a bridge of this snapshot"),
    (vxlan(port=0), "vxlan otvx1000: port 0 is not a UDP port (1-65535)"),
    (vxlan(local="100.64.0.2"), "vxlan otvx1000: local '100.64.0.2' is not this node's tunnel address 100.64.0.1"),
    (fdb(("02:zz:00:00:00:01", "100.64.0.2")), "vxlan otvx1000: fdb mac '02:zz:00:00:00:01' is not a lowercase MAC like 02:00:00:00:00:01"),
    (fdb(("02:00:00:00:00:01", "100.64.0.2")), "vxlan otvx1000: fdb mac '02:00:00:00:00:01' is the MAC of local tap ot000000000001"),
    (fdb(("02:00:00:00:00:02", "100.64.0.2"), ("02:00:00:00:00:02", "100.64.0.3")), "vxlan otvx1000: fdb dst '100.64.0.3' is not a current peer's tunnel address (a /32 of its allowed_ips)"),
    (fdb(("02:00:00:00:00:02", "100.64.0.1")), "vxlan otvx1000: fdb dst '100.64.0.1' is not a current peer's tunnel address (a /32 of its allowed_ips)"),
    (fdb(("02:00:00:00:00:02", "10.1.0.3")), "vxlan otvx1000: fdb dst '10.1.0.3' is outside the mesh prefix 100.64.0.0/16"),
    (raw(wireguard=None), "vxlan otvx1000: fdb has 2 entries but the snapshot has no WireGuard mesh"),
    # the mesh: peers inside it, with keys and endpoints that are what they say
    (wireguard(address="100.64.0.1"), "wireguard otwg0: address '100.64.0.1' is not written canonically as 100.64.0.1/32"),
    (wireguard(address="100.64.0.0/16"), "wireguard otwg0: address '100.64.0.0/16' is the mesh prefix's network or broadcast address"),
    (wireguard(address="127.0.0.1/8"), "wireguard otwg0: address '127.0.0.1/8' puts the mesh prefix 127.0.0.0/8 on the loopback range 127.0.0.0/8"),
    (wireguard(address="100.64.0.1/31"), "wireguard otwg0: address '100.64.0.1/31' has a mesh prefix outside /8../30"),
    (wireguard(listen_port=0), "wireguard otwg0: listen_port 0 is not a UDP port (1-65535)"),
    (peer(public_key="nope"), "wireguard otwg0 peers[0]: public_key 'nope' is not a base64 WireGuard key"),
    (wireguard(peers=(PEER, replace(PEER, allowed_ips=("100.64.0.3/32",)))), f"wireguard otwg0 peers[1]: public_key '{PEER.public_key}' belongs to another peer too"),
    (peer(node="N 2"), "wireguard otwg0 peers[0]: node 'N 2' is not a node name"),
    (peer(endpoint="198.18.0.12"), "wireguard otwg0 peers[0]: endpoint '198.18.0.12' is not ip:port"),
    (peer(endpoint="198.18.0.12:+80"), "wireguard otwg0 peers[0]: endpoint '198.18.0.12:+80' is not ip:port"),
    (peer(endpoint="198.18.0.12:0"), "wireguard otwg0 peers[0]: endpoint port 0 is not a UDP port (1-65535)"),
    (peer(endpoint="224.0.0.1:51820"), "wireguard otwg0 peers[0]: endpoint '224.0.0.1:51820' is in the multicast range 224.0.0.0/4"),
    (peer(endpoint="100.64.0.2:51820"), "wireguard otwg0 peers[0]: endpoint '100.64.0.2:51820' is inside the mesh prefix 100.64.0.0/16 it would carry"),
    (peer(allowed_ips=("100.64.0.0/16",)), "wireguard otwg0 peers[0]: allowed_ips '100.64.0.0/16' holds this node's own tunnel address 100.64.0.1"),
    (peer(allowed_ips=("10.1.0.0/24",)), "wireguard otwg0 peers[0]: allowed_ips '10.1.0.0/24' is outside the mesh prefix 100.64.0.0/16"),
    (wireguard(peers=(PEER, WgPeer(public_key=f.KEYS["n3"], endpoint="198.18.0.13:51820", allowed_ips=("100.64.0.2/31",)))), "wireguard otwg0 peers[1]: allowed_ips '100.64.0.2/31' is not a single tunnel address (/32)"),
    # a wider allowed_ips would widen the VXLAN guard's idea of a peer (found by review)
    (peer(allowed_ips=("100.64.128.0/17",)), "wireguard otwg0 peers[0]: allowed_ips '100.64.128.0/17' is not a single tunnel address (/32)"),
]
# fmt: on


@pytest.mark.parametrize(("data", "message"), CONTENT)
def test_content_refused_with_field_and_value(data, message):
    with pytest.raises(Rejected) as e:
        accept(data, "n1", 0)
    assert str(e.value) == f"invalid snapshot version 5: {message}"
    assert e.value.version == 5  # acked against the version it came with


def many(n: int, item):
    return (item,) * n


# Every list has a cap, checked before any item is looked at (so the items may be anything).
# fmt: off
CAPS = [
    ("bridges", {"bridges": many(limits.MAX_BRIDGES + 1, NAT_BRIDGE)}, limits.MAX_BRIDGES),
    ("taps", {"taps": many(limits.MAX_TAPS + 1, NAT_TAP)}, limits.MAX_TAPS),
    ("vxlans", {"vxlans": many(limits.MAX_VXLANS + 1, VXLAN)}, limits.MAX_VXLANS),
    ("nat_subnets", {"nat_subnets": many(limits.MAX_NAT_SUBNETS + 1, "0.0.0.0/0")}, limits.MAX_NAT_SUBNETS),
    ("infrastructure", {"infrastructure": many(limits.MAX_INFRASTRUCTURE + 1, "x")}, limits.MAX_INFRASTRUCTURE),
    ("vxlans[0].fdb", {"vxlans": (replace(VXLAN, fdb=many(limits.MAX_FDB_PER_VXLAN + 1, VXLAN.fdb[0])),)}, limits.MAX_FDB_PER_VXLAN),
    ("fdb (all vxlans)", {"vxlans": many(3, replace(VXLAN, fdb=many(limits.MAX_FDB_TOTAL // 3 + 1, VXLAN.fdb[0])))}, limits.MAX_FDB_TOTAL),
    ("wireguard.peers", {"wireguard": replace(WG, peers=many(limits.MAX_PEERS + 1, PEER))}, limits.MAX_PEERS),
    ("wireguard.peers[0].allowed_ips", {"wireguard": replace(WG, peers=(replace(PEER, allowed_ips=many(limits.MAX_ALLOWED_IPS_PER_PEER + 1, "x")),))}, limits.MAX_ALLOWED_IPS_PER_PEER),
]
# fmt: on


@pytest.mark.parametrize(("field", "changes", "cap"), CAPS, ids=[c[0] for c in CAPS])
def test_every_list_has_a_cap(field, changes, cap):
    # an assembled snapshot (never one message since schema 3, so it may exceed a message's size)
    snap = decode(raw(**changes), Snapshot)
    with pytest.raises(Rejected) as e:
        check_snapshot(snap)
    count = f"{cap + 1}" if field != "fdb (all vxlans)" else f"{3 * (cap // 3 + 1)}"
    assert str(e.value) == (
        f"invalid snapshot version 5: {field} has {count} entries, more than the limit of {cap}"
    )


def test_a_list_at_its_cap_is_not_refused_for_its_length():
    data = raw(infrastructure=many(limits.MAX_INFRASTRUCTURE, "100.64.0.0/16"))
    assert accept(data, "n1", 0).infrastructure[-1] == "100.64.0.0/16"


def test_size_is_checked_before_decoding():
    data = b" " * limits.MAX_SNAPSHOT_BYTES + b"{"  # one byte over, and not even JSON
    with pytest.raises(Rejected) as e:
        accept(data, "n1", 0)
    assert str(e.value) == "snapshot of 1048577 bytes refused unread: the limit is 1048576 bytes"
    padded = raw()[:-1] + b" " * (limits.MAX_SNAPSHOT_BYTES - len(raw())) + b"}"
    assert len(padded) == limits.MAX_SNAPSHOT_BYTES and accept(padded, "n1", 0) == GOOD


def test_unknown_fields_are_tolerated_for_rolling_upgrades():
    data = encode(GOOD)[:-1] + b',"future_field":{"x":1}}'
    assert accept(data, "n1", 0) == GOOD


def test_a_tap_without_address_or_mac_is_not_refused_for_it():
    """Both are optional in the schema; port security decides what such a tap may send."""
    assert accept(taps(mac="", ip="", nic=""), "n1", 0).taps[1].ip == ""


def test_message_round_trips():
    ack = Ack(node="n1", version=3, applied_version=3, digest="ab", changes=2)
    health = Health(node="n1", applied_version=3, ok=True, started_at=1.0, sent_at=2.0)
    assert decode(encode(ack), Ack) == ack
    assert decode(encode(health), Health) == health
    assert decode(encode(GOOD), Snapshot) == GOOD
    assert ack.schema == health.schema == 1 and GOOD.schema == SNAPSHOT_SCHEMA == 3
