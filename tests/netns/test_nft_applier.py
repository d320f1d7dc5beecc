"""The nftables subsystem (``NftApplier``) against real nft in a throwaway namespace: load,
observe, a no-op heartbeat that writes nothing, repair of hand edits, drop counters read back
and carried over a reload (the pure rules are tests/unit/test_nft_rules.py's; what the rules do
to VM traffic is tests/e2e/test_vm_isolation.py's)."""

import json
import secrets
import subprocess

import msgspec
import pytest

from agent.errors import NftError
from agent.nft.applier import NftApplier
from agent.nft.rules import NftSpec, desired, spec
from schemas.desired import Tap
from tests.unit.test_nft_rules import SNAP, TAP_A

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True, timeout=10
    )


@pytest.fixture
def ns():
    name = "otnl-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        sh(name, "ip", "link", "set", "lo", "up")
        # a new namespace copies the host's forwarding setting on some kernels (podman turns it
        # on for the host): start from what a fresh node has, forwarding off
        sh(name, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.fixture
def nft(ns):
    return NftApplier(prefix=("ip", "netns", "exec", ns))


async def apply(nft: NftApplier, want) -> int:
    """One heartbeat's nft step (observe → plan → apply); its writes."""
    result = await nft.reconcile(want)
    assert result.errors == (), result.errors
    return result.writes


def ruleset(ns: str) -> str:
    return sh(ns, "nft", "list", "ruleset").stdout


def send_vxlan(ns: str, count: int) -> None:
    """UDP to the VXLAN port on loopback: not through the mesh, so the guard drops it."""
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({count}): s.sendto(b'x', ('127.0.0.1', 4789))"
    )
    sh(ns, "python3", "-c", code)


async def test_apply_observe_noop_replace_remove(ns, nft):
    sh(ns, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
    assert (await nft.observe()).exists is False
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"

    want = desired(spec(SNAP))
    assert await apply(nft, want) == 2  # forwarding + both tables, one transaction
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    observed = await nft.observe()
    assert observed.exists and observed.rule_count == want.rule_count == 29
    assert observed.digest == want.digest and observed.sets == want.sets
    text = ruleset(ns)
    assert "ip saddr 10.10.0.0/24 ip daddr != 10.10.0.0/24 masquerade" in text
    assert "iifname . ether saddr != @nic_mac" in text and '"ot0000000000aa" . 10.10.0.2' in text
    assert (
        'iifname "otwg0" ip daddr 100.64.0.1 @th,96,24 0x3e8 ip saddr 100.64.0.2 return' in text
    ), text

    assert await apply(nft, want) == 0  # no-op heartbeat: reads only

    # a hand-deleted rule and a hand-added set element are noticed and repaired
    listing = json.loads(sh(ns, "nft", "-j", "-a", "list", "table", "bridge", "otherix").stdout)
    handle = next(i["rule"]["handle"] for i in listing["nftables"] if "rule" in i)
    sh(ns, "nft", "delete", "rule", "bridge", "otherix", "prerouting", "handle", str(handle))
    assert await apply(nft, want) == 1 and (await nft.observe()).rule_count == 29
    sh(ns, "nft", "add", "element", "bridge", "otherix", "nic_mac",
       f'{{ "{TAP_A}" . 02:00:00:00:00:ee }}')  # fmt: skip
    assert await apply(nft, want) == 1
    assert "02:00:00:00:00:ee" not in sh(ns, "nft", "list", "set", "bridge", "otherix", "nic_mac").stdout  # fmt: skip
    assert await apply(nft, want) == 0

    # replace: only a NAT network left; the bridge table goes in the same transaction
    nat_only = desired(NftSpec(nat_subnets=("10.2.0.0/24", "10.3.0.0/24")))
    assert await apply(nft, nat_only) == 1
    text = ruleset(ns)
    assert "table bridge otherix" not in text and "10.10.0.0" not in text
    assert "10.2.0.0/24" in text and "10.3.0.0/24" in text and "chain input" not in text
    assert (await nft.observe()).rule_count == 6  # 2 masquerade + 2 x 2 isolation

    # nothing wanted: our tables go, the foreign table stays
    assert await apply(nft, desired(NftSpec())) == 1
    assert (await nft.observe()).exists is False
    assert await apply(nft, desired(NftSpec())) == 0
    assert "counter" in sh(ns, "nft", "list", "table", "ip", "other").stdout


async def test_drop_counters_are_read_back_and_survive_a_reload(ns, nft):
    want = desired(spec(SNAP))
    await apply(nft, want)
    assert (await nft.observe()).drops["vxlan_guard"] == 0
    send_vxlan(ns, 3)
    assert (await nft.observe()).drops["vxlan_guard"] == 3 and nft.drops["vxlan_guard"] == 3
    # a new NIC reloads both tables: the counters carry over instead of starting again
    more = msgspec.structs.replace(SNAP, taps=SNAP.taps[:1])
    assert await apply(nft, desired(spec(more))) == 1
    send_vxlan(ns, 2)
    assert (await nft.observe()).drops["vxlan_guard"] == 5
    assert set(nft.drops) >= {"port_security_mac", "host_isolation", "vxlan_guard"}


async def test_nft_error_is_clear(ns, nft):
    with pytest.raises(NftError, match=r"nft -j -f failed \(exit 1\): .*") as info:
        await nft.load('{"nftables": [{"add": {"table": {"family": "inet"}}}]}')
    assert info.value.op == "load" and not info.value.temporary
    broken = NftApplier(nft="false", prefix=("ip", "netns", "exec", ns))
    with pytest.raises(NftError, match="exit 1"):
        await broken.observe()


async def test_a_failed_load_is_a_typed_error_and_the_old_tables_stay(ns, nft):
    first = desired(NftSpec(nat_subnets=("10.1.0.0/24",)))
    assert await apply(nft, first) == 2
    plan = nft.plan(desired(NftSpec(nat_subnets=("10.2.0.0/24",))), await nft.observe())
    plan = msgspec.structs.replace(plan, load='{"nftables": [{"add": {"bogus": {}}}]}')
    result = await nft.apply(plan)
    assert result.writes == 0 and len(result.errors) == 1
    assert isinstance(result.errors[0], NftError) and not result.errors[0].temporary
    assert result.reached.digest == first.digest
    assert "10.1.0.0/24" in ruleset(ns)


@pytest.fixture
def vm(ns):
    """A second namespace playing the VM at the other end of a bridge port."""
    name = ns + "-vm"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


async def test_port_security_drops_vlan_tags_ipv6_and_foreign_macs_from_a_port(ns, vm, nft):
    """Frames straight from a bridge port (a veth named as a tap: no wire in between that could
    strip the VLAN tag): tagged, IPv6 and foreign-MAC frames are dropped and counted by reason;
    the NIC's own IPv4 frame is not."""
    sh(ns, "ip", "link", "add", "otb1", "type", "bridge")
    sh(ns, "ip", "link", "add", TAP_A, "type", "veth", "peer", "name", "eth0", "netns", vm)
    sh(ns, "ip", "link", "set", TAP_A, "master", "otb1", "up")
    sh(ns, "ip", "link", "set", "otb1", "up")
    sh(vm, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")  # no chatter of its own
    sh(vm, "ip", "link", "set", "eth0", "address", "02:00:00:00:00:aa", "up")
    await apply(nft, desired(spec(SNAP)))
    code = (
        "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0))\n"
        "src = bytes.fromhex('0200000000aa'); dst = b'\\xff' * 6\n"
        "ip = b'\\x45' + bytes(11) + socket.inet_aton('10.10.0.2') + socket.inet_aton('10.10.0.1')\n"
        "s.send(dst + src + b'\\x08\\x00' + ip + bytes(26))\n"  # its own: passes
        "s.send(dst + src + b'\\x81\\x00\\x00\\x05\\x08\\x00' + ip + bytes(26))\n"  # VLAN 5
        "s.send(dst + src + b'\\x86\\xdd' + bytes(46))\n"  # IPv6
        "s.send(dst + bytes.fromhex('0200000000bb') + b'\\x08\\x00' + ip + bytes(26))\n"
    )
    before = (await nft.observe()).drops
    sh(vm, "python3", "-c", code)
    after = (await nft.observe()).drops
    counted = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert counted == {"port_security_ethertype": 2, "port_security_mac": 1}


async def test_a_bridged_tap_nftables_does_not_know_is_closed(ns, vm, nft):
    """Links bridge a new tap before nftables loads its rules (and a failed load would leave it
    so): until the tap is in the rules, every frame from it is dropped, counted as an unknown
    tap; once loaded, its own frame passes and a forged one is dropped as before."""
    new_tap = "ot0000000000ee"
    sh(ns, "ip", "link", "add", "otb1", "type", "bridge")
    sh(ns, "ip", "link", "add", new_tap, "type", "veth", "peer", "name", "eth0", "netns", vm)
    sh(ns, "ip", "link", "set", new_tap, "master", "otb1", "up")
    sh(ns, "ip", "link", "set", "otb1", "up")
    sh(vm, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
    sh(vm, "ip", "link", "set", "eth0", "address", "02:00:00:00:00:ee", "up")
    code = (
        "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0))\n"
        "ip = b'\\x45' + bytes(11) + socket.inet_aton('10.10.0.9') + socket.inet_aton('10.10.0.1')\n"
        "for src in ('0200000000ee', '0200000000dd'):\n"  # its own MAC, then a forged one
        "    s.send(b'\\xff' * 6 + bytes.fromhex(src) + b'\\x08\\x00' + ip + bytes(26))\n"
    )
    await apply(nft, desired(spec(SNAP)))  # the rules of the taps it knows: not this one
    before = (await nft.observe()).drops
    sh(vm, "python3", "-c", code)
    after = (await nft.observe()).drops
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        "port_security_unknown_tap": 2
    }
    tap = Tap(name=new_tap, bridge="otb1", mtu=1500, mac="02:00:00:00:00:ee", ip="10.10.0.9")
    await apply(nft, desired(spec(msgspec.structs.replace(SNAP, taps=(*SNAP.taps, tap)))))
    before = (await nft.observe()).drops
    sh(vm, "python3", "-c", code)
    after = (await nft.observe()).drops
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        "port_security_mac": 1
    }
