import pytest

from schemas import naming


def test_spec_device_names():
    assert naming.overlay_bridge(1000) == "otb1000"
    assert naming.vxlan_device(1000) == "otvx1000"
    assert naming.tap_name("0123456789abcdef0123456789abcdef") == "ot0123456789ab"
    assert naming.WIREGUARD_IFNAME == "otwg0"


def test_largest_vni_fits_ifnamsiz():
    assert len(naming.vxlan_device(naming.VNI_MAX)) <= naming.IFNAMSIZ
    assert len(naming.overlay_bridge(naming.VNI_MAX)) <= naming.IFNAMSIZ


@pytest.mark.parametrize("name", ["lan", "a" * 63, "x-1"])
def test_bridge_network_bridge_never_collides_with_other_families(name):
    bridge = naming.bridge_network_bridge(name)
    assert bridge.startswith("otn") and len(bridge) == 11
    assert naming.is_managed(bridge)
    assert bridge == naming.bridge_network_bridge(name)  # deterministic
    # taps are ot + 12 hex (14 chars), 'n' is not hex; overlay names are otb/otvx + digits
    assert len(bridge) != 14 and not bridge.startswith(("otb", "otvx", "otwg"))


def test_bad_nic_id_refused():
    with pytest.raises(ValueError, match="hex"):
        naming.tap_name("XYZ")


@pytest.mark.parametrize(
    ("underlay", "wg", "inner"), [(1500, 1440, 1390), (9000, 8940, 8890), (1400, 1340, 1290)]
)
def test_mtu_derivation(underlay, wg, inner):
    assert naming.wireguard_mtu(underlay) == wg
    assert naming.overlay_mtu(underlay) == inner


def test_subjects_end_with_node():
    assert naming.desired_subject("n1") == "otherix.v1.desired.n1"
    assert naming.ack_subject("n1") == "otherix.v1.ack.n1"
    assert naming.health_subject("*") == "otherix.v1.health.*"
    assert naming.api_subject("network", "create") == "otherix.v1.api.network.create"


@pytest.mark.parametrize("value", ["", "A", "a.b", "-a", "a-", "a" * 64, "a b", "ä"])
def test_invalid_ids(value):
    assert not naming.valid_id(value)
