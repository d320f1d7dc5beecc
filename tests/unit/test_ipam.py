import ipaddress

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import ipam, ops
from schemas import api
from schemas.codec import decode, encode
from schemas.errors import ApiError, BadRequest, Conflict
from schemas.intent import Network
from tests.unit import factories as f


def net(cidr):
    return ipam.parse_subnet(cidr)


def test_first_host_is_gateway_and_never_handed_out():
    n = net("10.0.0.0/29")
    assert ipam.gateway_of(n) == ipaddress.ip_address("10.0.0.1")
    assert ipam.allocate_ip(n, set(), None) == "10.0.0.2"


def test_allocation_fills_gaps_then_exhausts():
    n = net("10.0.0.0/29")  # hosts .1-.6, .1 is the gateway
    used = {"10.0.0.2", "10.0.0.4"}
    assert ipam.allocate_ip(n, used, None) == "10.0.0.3"
    used = {f"10.0.0.{i}" for i in range(2, 7)}
    with pytest.raises(Conflict, match="exhausted") as e:
        ipam.allocate_ip(n, used, None)
    assert e.value.code == 409 and isinstance(e.value, ApiError)


@pytest.mark.parametrize(
    ("wanted", "error", "message"),
    [
        ("10.0.1.5", BadRequest, "outside the network's subnet"),
        ("10.0.0.0", BadRequest, "network or broadcast"),
        ("10.0.0.255", BadRequest, "network or broadcast"),
        ("10.0.0.1", BadRequest, "gateway"),
        ("10.0.0.7", Conflict, "already in use"),
        ("banana", BadRequest, "not a valid IPv4"),
    ],
)
def test_chosen_ip_rules(wanted, error, message):
    with pytest.raises(error, match=message):
        ipam.allocate_ip(net("10.0.0.0/24"), {"10.0.0.7"}, wanted)


def test_chosen_ip_accepted_when_free():
    assert ipam.allocate_ip(net("10.0.0.0/24"), {"10.0.0.7"}, "10.0.0.8") == "10.0.0.8"


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.1/24", "not a valid network"),
        ("10.0.0.0/31", "between /8 and /30"),
        ("fd00::/64", "only IPv4"),
        ("x", "not a valid"),
    ],
)
def test_bad_subnets(cidr, message):
    with pytest.raises(BadRequest, match=message):
        ipam.parse_subnet(cidr)


def test_overlapping_subnet_refused():
    with pytest.raises(Conflict, match="overlaps 10.0.0.0/16 of network 'big'"):
        ipam.check_subnet_free(net("10.0.3.0/24"), {"big": "10.0.0.0/16"})


@pytest.mark.parametrize(
    ("cidr", "named"),
    [
        ("100.64.7.0/24", "the mesh prefix 100.64.0.0/16"),
        ("100.0.0.0/8", "the mesh prefix 100.64.0.0/16"),  # containing it counts too
        ("198.18.0.128/25", "the underlay 198.18.0.0/24"),
        ("198.19.0.0/16", "the underlay 198.19.0.0/16"),  # the second --underlay-cidr
        ("0.0.0.0/8", "the 'this network' range 0.0.0.0/8"),
        ("127.0.0.0/8", "the loopback range 127.0.0.0/8"),
        ("169.254.1.0/24", "the link-local range 169.254.0.0/16"),
        ("224.0.0.0/8", "the multicast range 224.0.0.0/4"),
        ("239.255.255.0/30", "the multicast range 224.0.0.0/4"),
        ("240.0.0.0/8", "the reserved range 240.0.0.0/4"),
        ("255.255.255.252/30", "the reserved range 240.0.0.0/4 (with the broadcast address)"),
    ],
)
def test_infrastructure_and_special_subnets_refused(cidr, named):
    with pytest.raises(BadRequest) as e:
        ipam.check_subnet_allowed(net(cidr), "100.64.0.0/16", ("198.18.0.0/24", "198.19.0.0/16"))
    assert e.value.message.startswith(f"subnet {cidr} overlaps {named}")
    assert e.value.message.endswith("which no VM network may use")


@pytest.mark.parametrize(
    "cidr",
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.65.0.0/16",
        "1.0.0.0/8",
        "223.255.255.0/24",
    ],
)
def test_ordinary_subnets_allowed(cidr):
    ipam.check_subnet_allowed(net(cidr), "100.64.0.0/16", ("198.18.0.0/24",))


def test_macs_are_locally_administered_unicast_and_unique():
    seq = iter([0xAA, 0, 0, 0, 1, 0xAA, 0, 0, 0, 1, 0xAA, 0, 0, 0, 2])
    used = {"02:aa:00:00:00:01"}
    mac = ipam.allocate_mac(used, None, rand=lambda bits: next(seq))
    assert mac == "02:aa:00:00:00:02"  # the first candidate was taken
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b1


@pytest.mark.parametrize(
    ("wanted", "error", "message"),
    [
        ("01:00:00:00:00:01", BadRequest, "multicast"),
        ("zz:00:00:00:00:01", BadRequest, "not a MAC"),
        ("00:00:00:00:00:00", BadRequest, "not a usable"),
        ("02:00:00:00:00:01", Conflict, "already used"),
    ],
)
def test_chosen_mac_rules(wanted, error, message):
    with pytest.raises(error, match=message):
        ipam.allocate_mac({"02:00:00:00:00:01"}, wanted)


def test_chosen_mac_normalised():
    assert ipam.allocate_mac(set(), "02-AB-00-00-00-01") == "02:ab:00:00:00:01"


def test_vni_allocation():
    assert ipam.allocate_vni([], None) == 1000
    assert ipam.allocate_vni([1000, 1001], None) == 1002
    assert ipam.allocate_vni([1000], 42) == 42
    with pytest.raises(Conflict, match="already used"):
        ipam.allocate_vni([42], 42)
    with pytest.raises(BadRequest, match="out of range"):
        ipam.allocate_vni([], 2**24)


def test_tunnel_ips():
    assert ipam.allocate_tunnel_ip("100.64.0.0/16", set()) == "100.64.0.1"
    assert ipam.allocate_tunnel_ip("100.64.0.0/16", {"100.64.0.1"}) == "100.64.0.2"
    with pytest.raises(Conflict, match="exhausted"):
        ipam.allocate_tunnel_ip("100.64.0.0/30", {"100.64.0.1", "100.64.0.2"})


# --- least recently released first (issue 9: a detached NIC's address went straight to the next
# NIC, with a new MAC that VMs on other nodes did not know for seconds) -------------------------


def test_a_released_address_is_not_handed_out_while_others_are_free():
    n = net("10.0.0.0/24")
    released = ipam.release_ips((), ["10.0.0.2"])
    assert ipam.allocate_ip(n, {"10.0.0.3"}, None, released) == "10.0.0.4"


def test_an_exhausted_subnet_hands_out_the_least_recently_released_first():
    n = net("10.0.0.0/29")  # .2-.6 for NICs
    released = ipam.release_ips((), ["10.0.0.5", "10.0.0.3", "10.0.0.4"])
    used = {"10.0.0.2", "10.0.0.6"}
    assert ipam.allocate_ip(n, used, None, released) == "10.0.0.5"
    assert ipam.allocate_ip(n, used | {"10.0.0.5"}, None, released) == "10.0.0.3"
    # released again: now the most recent, so the others come first
    released = ipam.release_ips(released, ["10.0.0.5"])
    assert released == ("10.0.0.3", "10.0.0.4", "10.0.0.5")
    assert ipam.allocate_ip(n, used, None, released) == "10.0.0.3"


def test_an_explicitly_requested_released_address_is_given():
    n = net("10.0.0.0/24")
    released = ipam.release_ips((), ["10.0.0.2"])
    assert ipam.allocate_ip(n, set(), "10.0.0.2", released) == "10.0.0.2"


def test_release_order_is_bounded_keeping_the_newest():
    released = ipam.release_ips((), [f"10.0.0.{i}" for i in range(2, 12)], limit=4)
    assert released == ("10.0.0.8", "10.0.0.9", "10.0.0.10", "10.0.0.11")


def test_detach_then_attach_through_ops_gets_a_different_address_and_the_order_persists():
    network = f.bridge_net()
    intent = f.intent(networks=[network], nodes=[f.node("n1")])
    first = ops.attach_nic(intent, api.NicAttach(network="lan", node="n1", vm="a"), 0)
    intent.nics[first.id] = first
    (changed,) = ops.released_networks(intent, [first])
    del intent.nics[first.id]
    intent.networks["lan"] = changed
    again = ops.attach_nic(intent, api.NicAttach(network="lan", node="n1", vm="b"), 0)
    assert (first.ip, again.ip) == ("10.0.0.2", "10.0.0.3")
    wanted = api.NicAttach(network="lan", node="n1", vm="c", ip=first.ip)
    assert ops.attach_nic(intent, wanted, 0).ip == first.ip  # asked for: still given
    # the Network record carries the order; a store written before the field existed still loads
    assert decode(encode(changed), Network).released == (first.ip,)
    old = msgspec.structs.asdict(network)
    old.pop("released")
    assert decode(encode(old), Network).released == ()


# --- properties -----------------------------------------------------------------------------

HOSTS = [f"10.0.0.{i}" for i in range(2, 15)]  # a /28 without its gateway


@settings(deadline=None, database=None, max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(HOSTS)), max_size=60))
def test_allocation_prefers_never_used_then_least_recently_released(steps):
    """Random attach (True) / detach (False of the given address) sequences: every default
    allocation is free, never-used if any is, else the oldest released free address."""
    n = net("10.0.0.0/28")
    used: list[str] = []
    released: tuple[str, ...] = ()
    ever: set[str] = set()
    for attach, ip in steps:
        if attach:
            try:
                got = ipam.allocate_ip(n, set(used), None, released)
            except Conflict:
                assert len(used) == len(HOSTS)
                continue
            assert got not in used
            fresh = [h for h in HOSTS if h not in ever]
            if fresh:
                assert got == fresh[0]
            else:
                assert got == next(r for r in released if r not in used)
            used.append(got)
            ever.add(got)
        elif ip in used:
            used.remove(ip)
            released = ipam.release_ips(released, [ip])
