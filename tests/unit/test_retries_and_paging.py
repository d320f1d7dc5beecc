"""Retry safety of the API's writes (``controller.ops``) and the pager (``controller.paging``),
without a broker: the same request twice makes one object, a request that clashes with what a
retry would return is refused with the object named, and pages follow their cursors and budget."""

import pytest

from controller import ops, paging
from controller.compute import ClusterConfig
from schemas import api
from schemas.errors import BadRequest, Conflict
from schemas.intent import Egress, NetworkType
from tests.unit.factories import bridge_net, intent, node, overlay_net


def ids():
    counter = iter(range(1, 1000))
    return lambda: f"{next(counter):012x}" + "0" * 20


def cluster():
    return intent(networks=[bridge_net(), overlay_net()], nodes=[node("n1"), node("n2", index=2)])


def attach(it, req, new_id):
    """As controller.api does: a NIC returned that is not the stored one is new."""
    nic = ops.attach_nic(it, req, 1.0, new_id)
    existed = it.nics.get(nic.id) is nic
    it.nics[nic.id] = nic
    return nic, existed


def test_attaching_the_same_vm_twice_makes_one_nic():
    it, new_id = cluster(), ids()
    req = api.NicAttach(network="lan", node="n1", vm="vm1")
    first, existed = attach(it, req, new_id)
    assert not existed
    again, existed = attach(it, req, new_id)
    assert existed and again == first and len(it.nics) == 1
    # the same VM on another network is another NIC
    other, existed = attach(it, api.NicAttach(network="ov", node="n1", vm="vm1"), new_id)
    assert not existed and other.id != first.id and len(it.nics) == 2


def test_a_retry_that_repeats_the_chosen_address_and_mac_is_compatible():
    it, new_id = cluster(), ids()
    req = api.NicAttach(network="lan", node="n1", vm="vm1", ip="10.0.0.9", mac="02:AA:00:00:00:01")
    first, _ = attach(it, req, new_id)
    spelled = api.NicAttach(
        network="lan", node="n1", vm="vm1", ip="10.0.0.9", mac="02-aa-00-00-00-01"
    )
    assert attach(it, spelled, new_id) == (first, True)
    # a retry that leaves the address and MAC to the controller gets the same NIC
    assert attach(it, api.NicAttach(network="lan", node="n1", vm="vm1"), new_id) == (first, True)


@pytest.mark.parametrize(
    ("changes", "differs"),
    [
        ({"node": "n2"}, "node n1, not n2"),
        ({"ip": "10.0.0.50"}, "ip 10.0.0.2, not 10.0.0.50"),
        ({"mac": "02:00:00:00:99:99"}, "mac {mac}, not 02:00:00:00:99:99"),
        ({"port_security": False}, "port_security True, not False"),
        ({"node": "n2", "ip": "10.0.0.50"}, "node n1, not n2; ip 10.0.0.2, not 10.0.0.50"),
    ],
)
def test_a_conflicting_reattach_is_refused_naming_the_nic(changes, differs):
    it, new_id = cluster(), ids()
    first, _ = attach(it, api.NicAttach(network="lan", node="n1", vm="vm1"), new_id)
    before = dict(it.nics)
    req = api.NicAttach(network="lan", vm="vm1", **({"node": "n1"} | changes))
    with pytest.raises(Conflict) as e:
        ops.attach_nic(it, req, 1.0, new_id)
    assert e.value.message == (
        f"vm 'vm1' already has NIC {first.id} (tap ot{first.id[:12]}) on network 'lan' with"
        f" {differs.format(mac=first.mac)}: a VM has one NIC per network, detach that one first to change it"
    )
    assert it.nics == before


def test_a_bad_address_in_a_retry_is_a_bad_request():
    it, new_id = cluster(), ids()
    attach(it, api.NicAttach(network="lan", node="n1", vm="vm1"), new_id)
    with pytest.raises(BadRequest, match="ip '10.0.0.300' is not a valid IPv4 address"):
        ops.attach_nic(it, api.NicAttach(network="lan", node="n1", vm="vm1", ip="10.0.0.300"), 1.0)


def test_creating_the_same_network_twice_returns_it():
    it, config = cluster(), ClusterConfig()
    req = api.NetworkCreate(name="web", type=NetworkType.BRIDGE, subnet="10.5.0.0/24")
    net = ops.create_network(it, req, 1.0, config)
    it.networks[net.name] = net
    assert ops.create_network(it, req, 2.0, config) is net
    # an overlay retried without its VNI gets the one it was given
    ov = ops.create_network(
        it,
        api.NetworkCreate(name="ov", type=NetworkType.OVERLAY, subnet="10.1.0.0/24"),
        1.0,
        config,
    )
    assert ov is it.networks["ov"]


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (
            api.NetworkCreate(name="lan", type=NetworkType.BRIDGE, subnet="10.9.0.0/24"),
            "network 'lan' already exists with subnet 10.0.0.0/24, not 10.9.0.0/24",
        ),
        (
            api.NetworkCreate(name="lan", type=NetworkType.OVERLAY, subnet="10.0.0.0/24"),
            "network 'lan' already exists with type bridge, not overlay",
        ),
        (
            api.NetworkCreate(
                name="lan", type=NetworkType.BRIDGE, subnet="10.0.0.0/24", egress=Egress.NAT
            ),
            "network 'lan' already exists with egress none, not nat",
        ),
        (
            api.NetworkCreate(name="ov", type=NetworkType.OVERLAY, subnet="10.1.0.0/24", vni=7),
            "network 'ov' already exists with vni 1000, not 7",
        ),
    ],
)
def test_a_create_that_differs_from_the_existing_network_is_refused(req, message):
    with pytest.raises(Conflict) as e:
        ops.create_network(cluster(), req, 1.0, ClusterConfig())
    assert e.value.message == message


def test_a_detached_nic_is_found_by_id_prefix_or_tap():
    it, new_id = cluster(), ids()
    nic, _ = attach(it, api.NicAttach(network="lan", node="n1", vm="vm1"), new_id)
    for key in (nic.id, nic.id[:12], "ot" + nic.id[:12]):
        assert ops.find_detached([nic], key) == nic
    assert ops.find_detached([nic], "f" * 12) is None


# --- the pager ----------------------------------------------------------------------------------

NAMES = [f"n{i:02d}" for i in range(20)]


def render(name: str) -> bytes:
    return b'"' + name.encode() + b'"'  # 5 bytes, 6 with its separator


def pages(items, limit=None, budget=10_000, key=lambda n: (n,)):
    """Every page, following the cursors as a client does."""
    out, cursor = [], None
    while True:
        got, cursor = paging.page(
            items, key, paging.decode_cursor(cursor, 1), limit, budget, render
        )
        out.append([bytes(r).decode().strip('"') for r in got])
        if cursor is None:
            return out


def test_pages_follow_the_limit_and_the_byte_budget():
    assert pages(NAMES) == [NAMES]
    assert pages(NAMES, limit=8) == [NAMES[:8], NAMES[8:16], NAMES[16:]]
    assert pages(NAMES, budget=6 * 5) == [NAMES[i : i + 5] for i in range(0, 20, 5)]
    assert pages(NAMES, limit=3, budget=6 * 5)[0] == NAMES[:3]  # whichever is smaller
    assert pages(NAMES, limit=100, budget=6 * 5)[0] == NAMES[:5]
    assert pages([]) == [[]]


def test_an_item_larger_than_the_budget_still_moves_the_listing_on():
    assert pages(NAMES[:3], budget=1) == [[n] for n in NAMES[:3]]


def test_a_cursor_survives_changes_between_pages():
    got, cursor = paging.page(NAMES, lambda n: (n,), None, 5, 10_000, render)
    after = paging.decode_cursor(cursor, 1)
    changed = [n for n in NAMES if n != "n02" and n != "n05"] + ["n05a"]  # n05a sorts after n05
    changed.sort()
    nxt, _ = paging.page(changed, lambda n: (n,), after, 3, 10_000, render)
    assert [bytes(r).decode().strip('"') for r in nxt] == ["n05a", "n06", "n07"]


@pytest.mark.parametrize("cursor", ["", "!!", "bm9wZQ", paging.encode_cursor(("a", "b"))])
def test_a_cursor_this_api_did_not_hand_out_is_refused(cursor):
    with pytest.raises(BadRequest, match="is not one this API handed out"):
        paging.decode_cursor(cursor, 1)


def test_a_limit_below_one_is_refused():
    with pytest.raises(BadRequest, match="limit 0 must be at least 1"):
        paging.page(NAMES, lambda n: (n,), None, 0, 10_000, render)
