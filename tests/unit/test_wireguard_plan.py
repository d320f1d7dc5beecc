"""Pure WireGuard logic: peer diff, device/link plans, key maths, UAPI text."""

import base64
import os
import shutil
import stat
import subprocess

import pytest

from agent.links.model import AddAddress, DelAddress, Link, SetMtu, SetUp
from agent.wireguard import keys as wgkeys
from agent.wireguard.plan import (
    DevicePlan,
    ObservedDevice,
    ObservedPeer,
    PeerChange,
    PeerPlan,
    normalize_endpoint,
    parse_get,
    plan_device,
    plan_link,
    plan_peers,
    render_set,
    validate,
)
from schemas.desired import WgPeer, WireGuard


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def wp(n: int, endpoint: str = "", ips: tuple[str, ...] = ()) -> WgPeer:
    return WgPeer(
        public_key=key(n),
        endpoint=endpoint or f"198.18.0.{n}:51820",
        allowed_ips=ips or (f"100.64.0.{n}/32",),
        node=f"n{n}",
    )


def op(n: int, endpoint: str = "", ips: tuple[str, ...] = (), **kw) -> ObservedPeer:
    return ObservedPeer(
        public_key=key(n),
        endpoint=endpoint or f"198.18.0.{n}:51820",
        allowed_ips=frozenset(ips or (f"100.64.0.{n}/32",)),
        **kw,
    )


def test_plan_peers_add_update_remove_and_leave_unchanged_alone():
    desired = [
        wp(1),
        wp(2, endpoint="198.18.0.22:51820"),
        wp(3, ips=("100.64.0.3/32", "10.9.0.0/16")),
        wp(5),
    ]
    observed = [op(1, latest_handshake=5.0), op(2), op(3), op(4)]
    plan = plan_peers(desired, observed)
    assert plan.add == (
        PeerChange(public_key=key(5), endpoint="198.18.0.5:51820", allowed_ips=("100.64.0.5/32",)),
    )
    assert plan.update == (
        PeerChange(public_key=key(2), endpoint="198.18.0.22:51820"),
        PeerChange(public_key=key(3), allowed_ips=("10.9.0.0/16", "100.64.0.3/32")),
    )
    assert plan.remove == (key(4),)
    assert plan.writes == 4


def test_plan_peers_in_sync_is_empty_whatever_the_spelling():
    # host bits, order, duplicates and an IPv6 endpoint spelled differently are all equal
    desired = [
        wp(
            1,
            endpoint="[2001:db8::0001]:51820",
            ips=("100.64.0.1/32", "10.1.2.3/24", "10.1.2.0/24"),
        )
    ]
    observed = [op(1, endpoint="[2001:db8::1]:51820", ips=("10.1.2.0/24", "100.64.0.1/32"))]
    assert plan_peers(desired, observed) == PeerPlan()
    assert plan_peers([], []).writes == 0


def test_plan_peers_drops_our_own_key_and_duplicates():
    plan = plan_peers([wp(1), wp(1, endpoint="1.1.1.1:1"), wp(9)], [], self_public=key(9))
    assert [c.public_key for c in plan.add] == [key(1)]
    assert plan.add[0].endpoint == "198.18.0.1:51820"


@pytest.mark.parametrize(
    "peer",
    [
        WgPeer(public_key="nope", endpoint="1.2.3.4:1", allowed_ips=()),
        WgPeer(public_key=key(1), endpoint="1.2.3.4", allowed_ips=()),
        WgPeer(public_key=key(1), endpoint="1.2.3.4:70000", allowed_ips=()),
        WgPeer(public_key=key(1), endpoint="1.2.3.4:1", allowed_ips=("300.0.0.0/8",)),
    ],
)
def test_bad_input_is_rejected_before_any_write(peer):
    with pytest.raises(ValueError):
        validate(
            WireGuard(
                name="otwg0", address="100.64.0.1/24", listen_port=51820, mtu=1440, peers=(peer,)
            )
        )


def test_plan_device_key_and_port_only_when_different():
    priv = wgkeys.generate_private_key()
    desired = WireGuard(
        name="otwg0", address="100.64.0.1/24", listen_port=51820, mtu=1440, peers=(wp(2),)
    )
    fresh = plan_device(desired, priv, ObservedDevice(listen_port=41234))
    assert fresh.private_key == priv and fresh.listen_port == 51820 and fresh.writes == 3
    synced = ObservedDevice(private_key=priv, listen_port=51820, peers=(op(2),))
    assert plan_device(desired, priv, synced).writes == 0


def test_plan_device_compares_the_clamped_key():
    raw = key(0xFF)  # not clamped: the device reports the clamped form
    desired = WireGuard(name="otwg0", address="100.64.0.1/24", listen_port=1, mtu=1440)
    observed = ObservedDevice(private_key=wgkeys.clamp(raw), listen_port=1)
    assert wgkeys.clamp(raw) != raw
    assert plan_device(desired, raw, observed).writes == 0


def test_plan_link():
    desired = WireGuard(name="otwg0", address="100.64.0.1/24", listen_port=1, mtu=1440)
    fresh = Link(name="otwg0", kind="tun", mtu=1420, up=False)
    assert plan_link(desired, fresh) == [
        SetMtu("otwg0", 1440),
        AddAddress("otwg0", "100.64.0.1/24"),
        SetUp("otwg0"),
    ]
    stale = Link(
        name="otwg0", kind="tun", mtu=1440, up=True, addresses=frozenset({"100.64.0.9/24"})
    )
    assert plan_link(desired, stale) == [
        DelAddress("otwg0", "100.64.0.9/24"),
        AddAddress("otwg0", "100.64.0.1/24"),
    ]
    synced = Link(
        name="otwg0", kind="tun", mtu=1440, up=True, addresses=frozenset({"100.64.0.1/24"})
    )
    assert plan_link(desired, synced) == []


# --- keys -------------------------------------------------------------------------------------


def test_x25519_rfc7748_vector():
    """RFC 7748 section 6.1: Alice's public key from her private key."""
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    want = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert wgkeys.public_key(base64.b64encode(alice).decode()) == base64.b64encode(want).decode()


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey():
    priv = wgkeys.generate_private_key()
    out = subprocess.run(
        ["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True, timeout=10
    )
    assert wgkeys.public_key(priv) == out.stdout.strip()


def test_key_b64_hex_round_trip_and_validation():
    k = key(0xAB)
    assert wgkeys.b64_to_hex(k) == "ab" * 32
    assert wgkeys.hex_to_b64("ab" * 32) == k
    for bad in ("", "x" * 44, base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            wgkeys.decode_key(bad)
    with pytest.raises(ValueError):
        wgkeys.hex_to_b64("ab" * 31)


def test_private_key_file_is_created_once_0600_and_reused(tmp_path):
    state = tmp_path / "state"
    k1 = wgkeys.load_or_create_private_key(state)
    path = state / wgkeys.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert wgkeys.load_or_create_private_key(state) == k1
    assert wgkeys.clamp(k1) == k1
    os.chmod(path, 0o644)
    assert wgkeys.load_or_create_private_key(state) == k1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("garbage\n")
    with pytest.raises(ValueError, match="wireguard.key"):
        wgkeys.load_or_create_private_key(state)


# --- UAPI text --------------------------------------------------------------------------------


def test_render_set_orders_removes_updates_adds():
    plan = DevicePlan(
        private_key=key(0x10),
        listen_port=51820,
        peers=PeerPlan(
            add=(
                PeerChange(
                    public_key=key(3),
                    endpoint="[2001:db8::1]:51820",
                    allowed_ips=("100.64.0.3/32",),
                ),
            ),
            update=(PeerChange(public_key=key(2), endpoint="198.18.0.2:51820"),),
            remove=(key(4),),
        ),
    )
    assert render_set(plan) == "\n".join(
        [
            "set=1",
            "private_key=" + "10" * 32,
            "listen_port=51820",
            "public_key=" + "04" * 32,
            "remove=true",
            "public_key=" + "02" * 32,
            "update_only=true",
            "endpoint=198.18.0.2:51820",
            "public_key=" + "03" * 32,
            "endpoint=[2001:db8::1]:51820",
            "replace_allowed_ips=true",
            "allowed_ip=100.64.0.3/32",
            "",
            "",
        ]
    )


def test_render_update_of_allowed_ips_replaces_them():
    plan = DevicePlan(peers=PeerPlan(update=(PeerChange(public_key=key(2), allowed_ips=()),)))
    assert (
        render_set(plan)
        == f"set=1\npublic_key={'02' * 32}\nupdate_only=true\nreplace_allowed_ips=true\n\n"
    )


def test_parse_get():
    text = "\n".join(
        [
            "private_key=" + "10" * 32,
            "listen_port=51820",
            "public_key=" + "02" * 32,
            "preshared_key=" + "00" * 32,
            "protocol_version=1",
            "endpoint=198.18.0.2:51820",
            "last_handshake_time_sec=1700000000",
            "last_handshake_time_nsec=500000000",
            "tx_bytes=10",
            "rx_bytes=20",
            "persistent_keepalive_interval=0",
            "allowed_ip=100.64.0.2/32",
            "allowed_ip=10.1.0.0/16",
            "public_key=" + "03" * 32,
            "last_handshake_time_sec=0",
            "last_handshake_time_nsec=0",
            "errno=0",
        ]
    )
    dev = parse_get(text)
    assert dev.private_key == key(0x10) and dev.listen_port == 51820
    assert dev.peers == (
        ObservedPeer(
            public_key=key(2),
            endpoint="198.18.0.2:51820",
            allowed_ips=frozenset({"100.64.0.2/32", "10.1.0.0/16"}),
            latest_handshake=1700000000.5,
            rx_bytes=20,
            tx_bytes=10,
        ),
        ObservedPeer(public_key=key(3)),
    )
    assert parse_get("listen_port=0\nerrno=0") == ObservedDevice()
    with pytest.raises(Exception, match="errno=1"):
        parse_get("errno=1")


def test_normalize_endpoint():
    assert normalize_endpoint("198.18.0.1:51820") == "198.18.0.1:51820"
    assert normalize_endpoint("[2001:DB8::1]:1") == "[2001:db8::1]:1"
    assert normalize_endpoint("") is None


def test_rotation_replaces_the_key_file_atomically(tmp_path):
    first = wgkeys.load_or_create_private_key(tmp_path)
    rotated = wgkeys.load_or_create_private_key(tmp_path, rotate=True)
    assert rotated != first
    assert wgkeys.load_or_create_private_key(tmp_path) == rotated  # the new key is the one kept
    assert (tmp_path / "wireguard.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["wireguard.key"]  # no temp file left


def test_a_non_canonical_alias_of_a_key_is_refused():
    """Two spellings of one key would compare unequal as strings: one peer configured twice,
    a write on every heartbeat (found by review). Only the canonical spelling is a key."""
    canonical = wgkeys.public_key(wgkeys.generate_private_key())
    raw = wgkeys.decode_key(canonical)
    alias = (
        canonical[:42]
        + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".index(canonical[42])
            ^ 1
        ]
        + "="
    )
    assert alias != canonical and base64.b64decode(alias) == raw
    with pytest.raises(wgkeys.InvalidKey, match="canonical base64"):
        wgkeys.decode_key(alias)
