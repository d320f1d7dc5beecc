"""What a VM can reach, tried from inside VMs as an attacker would (issue 8), on a 2-node lab with
real taps, nft and a wireguard-go mesh: each attack fails, and in the same test its legitimate
counterpart works, so no test can pass by breaking everything. The first test also shows the
attack succeeding once the agent's tables are gone (the check can fail).

Networks: NAT ``lan`` (a = attacker, b = victim, on n1), NAT ``lan2`` (c, on n1: another
network's gateway and addresses), overlay ``ov`` (o1 on n1, o2 and o3 on n2). Frames are forged
with plain ``AF_PACKET`` sockets inside the VM namespace; no extra packages.
"""

import asyncio
import contextlib
import json
import socket
import struct
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from agent.nft.rules import REASONS
from lab.cluster import Lab
from lab.netns import exec_in, run
from lab.topology import OUTSIDE_IP
from lab.vm import ping
from schemas import naming
from tests.e2e.helpers import ack_stream, ensure_network, ensure_vms, eventually, lab_fixture
from tests.e2e.test_overlay_networks import vxlan_frame

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=2, mesh=True, heartbeat=0.5)

LAN, LAN2, OV, VNI = "lan", "lan2", "ov", 3000
PORT = 7070  # TCP listeners on the nodes and the outside host
BROADCAST = "ff:ff:ff:ff:ff:ff"

RAW_SEND = """
import socket, sys, time
ifname, frame, count, gap = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for _ in range(count):
    s.send(frame)
    time.sleep(gap)
"""
UDP_LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while True:
        data, (src, _) = s.recvfrom(2000)
        print(src, data.decode(errors="replace"), flush=True)
except OSError:
    pass
"""
UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(3):
    s.sendto(bytes.fromhex(sys.argv[4]), (sys.argv[2], int(sys.argv[3])))
"""
TCP_LISTEN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
TCP_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
    print("open")
except OSError as e:
    print("closed", e)
"""


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def udp_frame(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, port: int, payload: bytes):
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))  # fmt: skip
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~csum & 0xFFFF) + ip[12:]
    return ether(dst_mac, src_mac, 0x0800, ip + udp)


def arp_reply(src_mac: str, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str):
    """ "sender_ip is-at sender_mac", told to target, in a frame from src_mac."""
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
    arp += mac_bytes(sender_mac) + socket.inet_aton(sender_ip)
    arp += mac_bytes(target_mac) + socket.inet_aton(target_ip)
    return ether(target_mac, src_mac, 0x0806, arp)


async def vm_sh(lab: Lab, vm: str, *argv: str, check: bool = True) -> str:
    return await exec_in(lab.vms[vm].netns, *argv, check=check)


async def raw_send(lab: Lab, vm: str, frame: bytes, count: int = 20, gap: float = 0.02) -> None:
    await vm_sh(lab, vm, "python3", "-c", RAW_SEND, "eth0", frame.hex(), str(count), str(gap))


@contextlib.asynccontextmanager
async def background(ns: str, code: str, *args: str):
    """A python snippet running in ``ns``, live once it printed 'ready'; yields its process."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "python3", "-c", code, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"ready"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def udp_received(ns: str, port: int, send, seconds: float = 2.0) -> str:
    """Listen on UDP ``port`` in ``ns`` while ``send()`` runs; what arrived ("src payload")."""
    async with background(ns, UDP_LISTEN, str(port), str(seconds)) as proc:
        await send()
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 10)
    return out.decode()


async def tcp_open(ns: str, ip: str) -> bool:
    out = await exec_in(ns, "python3", "-c", TCP_CONNECT, ip, str(PORT))
    return out.startswith("open")


async def drops(lab: Lab, node: str) -> dict[str, int]:
    """The node's drop counters, straight from its tables."""
    counters: dict[str, int] = dict.fromkeys(REASONS, 0)  # a missing table counts nothing
    for family in ("inet", "bridge"):
        argv = ("nft", "-j", "list", "counters", "table", family, "otherix")
        out = await exec_in(lab.node_netns(node), *argv, check=False)
        for item in json.loads(out or '{"nftables": []}')["nftables"]:
            if "counter" in item:
                counters[item["counter"]["name"]] = item["counter"]["packets"]
    return counters


async def tunnel_ip(lab: Lab, node: str) -> str:
    nodes = await (await lab.connect()).node_list()
    return next(n.node.tunnel_ip for n in nodes if n.node.name == node)


def underlay_ip(lab: Lab, node: str) -> str:
    return lab.topology.nodes[node].underlay_ip


async def bridge_mac(lab: Lab, node: str, bridge: str) -> str:
    return (await lab.exec_node(node, "cat", f"/sys/class/net/{bridge}/address")).strip()


async def neighbour(ns: str, ip: str) -> str:
    out = await exec_in(ns, "ip", "neigh", "show", ip)
    words = out.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else ""


@contextlib.asynccontextmanager
async def without_tables(lab: Lab, node: str):
    """The control: the agent stopped and both of its tables deleted, restored afterwards."""
    await lab.stop_agent(node)
    try:
        for family in ("inet", "bridge"):
            await lab.exec_node(node, "nft", "delete", "table", family, "otherix")
        yield
    finally:
        await lab.start_agent(node)
        async with ack_stream(lab, node) as acks:  # the new agent acks only after applying
            assert acks.first.ok


@pytest_asyncio.fixture(loop_scope="module")
async def world(lab: Lab) -> None:
    await ensure_network(lab, LAN, "bridge", "10.30.0.0/24", "nat")
    await ensure_network(lab, LAN2, "bridge", "10.31.0.0/24", "nat")
    await ensure_network(lab, OV, "overlay", "10.32.0.0/24", vni=VNI)
    await ensure_vms(lab, LAN, {"a": "n1", "b": "n1"})
    await ensure_vms(lab, LAN2, {"c": "n1"})
    await ensure_vms(lab, OV, {"o1": "n1", "o2": "n2", "o3": "n2"})
    for src, dst in (("o1", "o2"), ("o1", "o3"), ("o2", "o3")):  # WireGuard's first handshake
        await lab.ping(src, lab.vms[dst].ip, timeout=10)


async def node_reaches_all(lab: Lab, node: str, vm: str, count: int = 20) -> bool:
    """The node (the VM's gateway side of the bridge) pings ``vm``: every reply must arrive."""
    return await ping(lab.node_netns(node), lab.vms[vm].ip, count=count, timeout=4)


@pytest.mark.usefixtures("world")
async def test_a_vm_that_takes_another_vms_mac_is_cut_off_and_the_victim_keeps_its_traffic(
    lab: Lab,
):
    a, b = lab.vms["a"], lab.vms["b"]
    before = (await drops(lab, "n1"))["port_security_mac"]

    async def attack() -> bool:
        """a takes b's MAC and talks; True if that did no harm: b still gets every packet
        meant for it, a gets no answer, and the node still knows a by a's own MAC."""
        node_ns = lab.node_netns("n1")
        await exec_in(node_ns, "ip", "neigh", "flush", "to", a.ip)
        assert await node_reaches_all(lab, "n1", "a", 1)
        await vm_sh(lab, "a", "ip", "link", "set", "eth0", "address", b.mac)
        try:
            chatter = asyncio.create_task(ping(a.netns, "10.30.0.1", count=60, timeout=4))
            await asyncio.sleep(0.5)  # a's frames (ARP, ICMP) now carry b's MAC
            victim_ok = await node_reaches_all(lab, "n1", "b")
            attacker_ok = await chatter
            node_knows_a = await neighbour(node_ns, a.ip) == a.mac
        finally:
            await vm_sh(lab, "a", "ip", "link", "set", "eth0", "address", a.mac)
        return victim_ok and not attacker_ok and node_knows_a

    assert await attack()
    assert (await drops(lab, "n1"))["port_security_mac"] > before
    assert await lab.ping("a", b.ip, count=3)  # with its own MAC again, a talks as before
    # the check can fail: without the agent's tables a's frames reach the node as b's
    async with without_tables(lab, "n1"):
        assert not await attack()
    assert await attack()


@pytest.mark.usefixtures("world")
async def test_frames_with_another_vms_source_mac_are_dropped(lab: Lab):
    a, b, c = lab.vms["a"], lab.vms["b"], lab.vms["c"]
    # a datagram from a to b in a frame with c's MAC as source never arrives; with a's it does
    forged = udp_frame(b.mac, c.mac, a.ip, b.ip, 9999, b"FORGED")
    genuine = udp_frame(b.mac, a.mac, a.ip, b.ip, 9999, b"GENUINE")

    async def send():
        await raw_send(lab, "a", forged, count=3)
        await raw_send(lab, "a", genuine, count=3)

    got = await udp_received(b.netns, 9999, send)
    assert "FORGED" not in got and f"{a.ip} GENUINE" in got
    # a flood with b's MAC as source does not take b's traffic
    forged = ether(BROADCAST, b.mac, 0x0800, bytes(46))
    sender = asyncio.create_task(raw_send(lab, "a", forged, count=150, gap=0.02))
    await asyncio.sleep(0.3)
    assert await node_reaches_all(lab, "n1", "b")  # b's traffic stays b's
    await sender
    # the cross-node version: o1 on n1 forges o2's MAC; o3 on n2 keeps reaching o2
    o2 = lab.vms["o2"]
    forged = ether(BROADCAST, o2.mac, 0x0800, bytes(46))
    sender = asyncio.create_task(raw_send(lab, "o1", forged, count=150, gap=0.02))
    await asyncio.sleep(0.3)
    assert await ping(lab.vms["o3"].netns, o2.ip, count=20, timeout=4)
    await sender
    # VLAN-tagged and IPv6 frames from a VM go nowhere either; a's own frames still do
    # (the lab's wire reads frames with AF_PACKET, which hands the VLAN tag over as metadata:
    # the tagged frame reaches the tap untagged, an IPv4 packet from 0.0.0.0)
    before = await drops(lab, "n1")
    await raw_send(lab, "a", ether(BROADCAST, a.mac, 0x8100, b"\x00\x05\x08\x00" + bytes(46)), 3)
    await raw_send(lab, "a", ether(BROADCAST, a.mac, 0x86DD, bytes(46)), 3)
    after = await drops(lab, "n1")
    assert after["port_security_ethertype"] >= before["port_security_ethertype"] + 3
    assert sum(after[k] - before[k] for k in after if k.startswith("port_security")) >= 6
    assert await lab.ping("a", b.ip, count=3)


@pytest.mark.usefixtures("world")
async def test_a_forged_arp_reply_changes_no_neighbour_entry(lab: Lab):
    a, b = lab.vms["a"], lab.vms["b"]
    bridge = naming.bridge_network_bridge(LAN)
    gw_mac = await bridge_mac(lab, "n1", bridge)
    assert await lab.ping("b", "10.30.0.1") and await node_reaches_all(lab, "n1", "b", 1)
    assert await neighbour(b.netns, "10.30.0.1") == gw_mac
    assert await neighbour(lab.node_netns("n1"), b.ip) == b.mac
    before = (await drops(lab, "n1"))["port_security_arp"]
    await asyncio.sleep(1.1)  # past ARP's lock time: a forged reply would now be taken
    # "the gateway is at a's MAC", told to b; "b is at a's MAC", told to the node
    to_b = arp_reply(a.mac, a.mac, "10.30.0.1", b.mac, b.ip)
    to_node = arp_reply(a.mac, a.mac, b.ip, gw_mac, "10.30.0.1")
    await asyncio.gather(raw_send(lab, "a", to_b, 40, 0.05), raw_send(lab, "a", to_node, 40, 0.05))
    assert await neighbour(b.netns, "10.30.0.1") == gw_mac
    assert await neighbour(lab.node_netns("n1"), b.ip) == b.mac
    assert (await drops(lab, "n1"))["port_security_arp"] >= before + 80
    # a's genuine ARP still works: it resolves and reaches b and the gateway
    await vm_sh(lab, "a", "ip", "neigh", "flush", "dev", "eth0")
    assert await lab.ping("a", b.ip, count=2) and await lab.ping("a", "10.30.0.1")
    assert await neighbour(b.netns, "10.30.0.1") == gw_mac


@pytest.mark.usefixtures("world")
async def test_a_spoofed_ipv4_source_is_neither_bridged_nor_masqueraded(lab: Lab):
    a, b, c = lab.vms["a"], lab.vms["b"], lab.vms["c"]
    spoofed = c.ip  # another network's address
    await vm_sh(lab, "a", "ip", "addr", "add", f"{spoofed}/32", "dev", "eth0")
    try:

        async def send_from(src: str, dst: str):
            return await vm_sh(lab, "a", "python3", "-c", UDP_SEND, src, dst, "9999", b"HI".hex())

        to_b = await udp_received(b.netns, 9999, lambda: send_from(spoofed, b.ip))
        out = await udp_received(lab.topology.outside, 9999, lambda: send_from(spoofed, OUTSIDE_IP))
        assert "HI" not in to_b and "HI" not in out
        # the same datagrams from a's own address go through (masqueraded to the outside)
        to_b = await udp_received(b.netns, 9999, lambda: send_from(a.ip, b.ip))
        out = await udp_received(lab.topology.outside, 9999, lambda: send_from(a.ip, OUTSIDE_IP))
        assert f"{a.ip} HI" in to_b and f"{underlay_ip(lab, 'n1')} HI" in out
    finally:
        await vm_sh(lab, "a", "ip", "addr", "del", f"{spoofed}/32", "dev", "eth0")


@pytest.mark.usefixtures("world")
async def test_vxlan_into_the_mesh_from_a_nat_vm_never_reaches_an_overlay_vm(lab: Lab):
    o1, o2 = lab.vms["o1"], lab.vms["o2"]
    n2_tunnel = await tunnel_ip(lab, "n2")
    frame = vxlan_frame(VNI, o2.mac, o2.ip, 9999, b"FORGED")
    before = (await drops(lab, "n1"))["forward_isolation"]

    async def forge():
        await vm_sh(lab, "a", "python3", "-c", UDP_SEND, lab.vms["a"].ip, n2_tunnel, "4789", frame.hex())  # fmt: skip

    assert "FORGED" not in await udp_received(o2.netns, 9999, forge)
    assert (await drops(lab, "n1"))["forward_isolation"] >= before + 3
    # the overlay itself keeps working across the nodes
    assert await lab.ping("o1", o2.ip, count=3, timeout=5)

    async def hello():
        await vm_sh(lab, "o1", "python3", "-c", UDP_SEND, o1.ip, o2.ip, "9999", b"HELLO".hex())

    assert f"{o1.ip} HELLO" in await udp_received(o2.netns, 9999, hello)


@pytest.mark.usefixtures("world")
async def test_no_node_address_is_reachable_from_a_vm_but_its_way_out_is(lab: Lab):
    n1_tunnel, n2_tunnel = await tunnel_ip(lab, "n1"), await tunnel_ip(lab, "n2")
    targets = {
        "n1 underlay": underlay_ip(lab, "n1"),
        "n1 tunnel": n1_tunnel,
        "own gateway (TCP is no service)": "10.30.0.1",
        "lan2's gateway": "10.31.0.1",
        "n2 tunnel": n2_tunnel,
        "n2 underlay": underlay_ip(lab, "n2"),
    }
    status = await (await lab.connect()).status()
    health_before = next(n.health for n in status.nodes if n.node.name == "n1")
    assert health_before is not None
    async with contextlib.AsyncExitStack() as stack:
        for ns in (lab.node_netns("n1"), lab.node_netns("n2"), lab.topology.outside):
            await stack.enter_async_context(background(ns, TCP_LISTEN, str(PORT)))
        # the listeners answer where they may: from each node itself, and from a VM outside
        assert await tcp_open(lab.node_netns("n1"), underlay_ip(lab, "n2"))
        assert await tcp_open(lab.node_netns("n2"), n1_tunnel)
        assert await tcp_open(lab.vms["a"].netns, OUTSIDE_IP)  # through NAT
        assert await lab.ping("a", "10.30.0.1")  # the VM's own gateway answers echo
        opened = await asyncio.gather(
            *(tcp_open(lab.vms["a"].netns, ip) for ip in targets.values())
        )
        assert not any(opened), dict(zip(targets, opened, strict=True))
        # an overlay VM has no way in at all, even when it aims at the bridge's MAC by hand
        o1 = lab.vms["o1"]
        otb = naming.overlay_bridge(VNI)
        mac = await bridge_mac(lab, "n1", otb)
        # (one way, with UDP: TCP could not answer anyway, the node has no route back)
        n1_ns = lab.node_netns("n1")
        aims = [(n1_ns, underlay_ip(lab, "n1")), (n1_ns, n1_tunnel), (lab.topology.outside, OUTSIDE_IP)]  # fmt: skip
        try:
            for _, ip in aims:
                await vm_sh(lab, "o1", "ip", "route", "replace", f"{ip}/32", "dev", "eth0")
                await vm_sh(lab, "o1", "ip", "neigh", "replace", ip, "lladdr", mac, "dev", "eth0")
            for ns, ip in aims:

                async def sneak(ip=ip):
                    await vm_sh(lab, "o1", "python3", "-c", UDP_SEND, o1.ip, ip, "9998", b"SNEAK".hex())  # fmt: skip

                assert "SNEAK" not in await udp_received(ns, 9998, sneak, seconds=1.0), ip
        finally:
            for _, ip in aims:
                await vm_sh(lab, "o1", "ip", "route", "del", f"{ip}/32", check=False)
                await vm_sh(lab, "o1", "ip", "neigh", "del", ip, "dev", "eth0", check=False)
    # the refusals are counted, and an operator sees the counters in `otherixctl status --json`
    ctl = Path(sys.executable).parent / "otherixctl"
    env = {"PATH": "/usr/bin:/bin", **lab.bus_env("admin")}

    async def counted():
        out = await run("env", *(f"{k}={v}" for k, v in env.items()), str(ctl), "status", "--json")
        n1 = next(n for n in json.loads(out)["nodes"] if n["node"]["name"] == "n1")
        drops_now = (n1.get("health") or {}).get("drops", {})
        return drops_now.get("host_isolation", 0) > health_before.drops.get("host_isolation", 0)

    await eventually(counted, timeout=15, what="host_isolation drops in otherixctl status")


@pytest.mark.usefixtures("world")
async def test_port_security_off_lets_an_appliance_send_as_others(lab: Lab):
    """The NIC flag: a NIC without port security is not filtered (an appliance's choice)."""
    api = await lab.connect()
    nic = await api.nic_attach(LAN, "n1", "appliance", port_security=False)
    try:
        await lab.wait_converged()
        sets = await lab.exec_node("n1", "nft", "list", "set", "bridge", "otherix", "secured")
        assert nic.tap not in sets and lab.vms["a"].tap in sets
    finally:
        await api.nic_detach(nic.nic.id)
        await lab.wait_converged()


@pytest.mark.usefixtures("world")
async def test_frames_to_link_local_group_macs_reach_nothing_on_the_node(lab: Lab):
    """Frames to 01:80:c2:00:00:0X skip the bridge's hooks and reached the node's stack with the
    tap as input device, past port security and host isolation, from a NAT VM with its own or a
    spoofed source and from an overlay VM (found by review). The same datagram addressed to
    the outside through the gateway still leaves."""
    n1 = lab.node_netns("n1")
    targets = (underlay_ip(lab, "n1"), await tunnel_ip(lab, "n1"))
    for vm, source in (("a", lab.vms["a"].ip), ("a", "10.99.99.99"), ("o1", lab.vms["o1"].ip)):
        mac = lab.vms[vm].mac
        for group in ("01:80:c2:00:00:02", "01:80:c2:00:00:0e"):
            for target in targets:

                async def send(target=target, group=group, source=source, vm=vm, mac=mac):
                    frame = udp_frame(group, mac, source, target, 7071, b"LINK-LOCAL")
                    await raw_send(lab, vm, frame, count=5)

                got = await udp_received(n1, 7071, send)
                assert "LINK-LOCAL" not in got, (vm, source, group, target, got)
    out = await udp_received(
        lab.topology.outside,
        9999,
        lambda: vm_sh(
            lab, "a", "python3", "-c", UDP_SEND, lab.vms["a"].ip, OUTSIDE_IP, "9999", b"OUT".hex()
        ),
    )
    assert f"{underlay_ip(lab, 'n1')} OUT" in out


async def test_adjacent_nat_networks_stay_apart(lab: Lab):
    """Two NAT networks on neighbouring /24s were merged into one /23 in the rules: each
    reached the other unmasqueraded (found by review). Each still reaches the outside."""
    await ensure_network(lab, "adj0", "bridge", "10.50.0.0/24", "nat")
    await ensure_network(lab, "adj1", "bridge", "10.50.1.0/24", "nat")
    await ensure_vms(lab, "adj0", {"p": "n1"})
    await ensure_vms(lab, "adj1", {"q": "n1"})
    p, q = lab.vms["p"], lab.vms["q"]
    assert not await lab.ping("p", q.ip, count=2, timeout=2)
    got = await udp_received(
        q.netns,
        9999,
        lambda: vm_sh(lab, "p", "python3", "-c", UDP_SEND, p.ip, q.ip, "9999", b"NEXT-DOOR".hex()),
    )
    assert "NEXT-DOOR" not in got
    out = await udp_received(
        lab.topology.outside,
        9999,
        lambda: vm_sh(lab, "p", "python3", "-c", UDP_SEND, p.ip, OUTSIDE_IP, "9999", b"OUT".hex()),
    )
    assert f"{underlay_ip(lab, 'n1')} OUT" in out


@pytest.mark.usefixtures("world")
async def test_a_peer_cannot_inject_into_a_network_it_does_not_host(lab: Lab):
    """A compromised node (n2) sends VXLAN through the mesh into a VNI only n1 hosts: refused
    and counted, while VXLAN of the network n1 and n2 share still flows (found by review: the
    guard checked peer and address but not the VNI)."""
    await ensure_network(lab, "ov9", "overlay", "10.33.0.0/24", vni=VNI + 9)
    await ensure_vms(lab, "ov9", {"o9": "n1"})
    o9 = lab.vms["o9"]
    n1_tunnel = await tunnel_ip(lab, "n1")
    frame = vxlan_frame(VNI + 9, o9.mac, o9.ip, 9999, b"INJECTED")
    before = (await drops(lab, "n1"))["vxlan_guard"]

    async def inject():  # from n2's own stack: through otwg0, from n2's tunnel address
        await lab.exec_node("n2", "python3", "-c", UDP_SEND, "0.0.0.0", n1_tunnel, "4789", frame.hex())  # fmt: skip

    assert "INJECTED" not in await udp_received(o9.netns, 9999, inject)
    assert (await drops(lab, "n1"))["vxlan_guard"] >= before + 3
    o1, o2 = lab.vms["o1"], lab.vms["o2"]

    async def hello():
        await vm_sh(lab, "o2", "python3", "-c", UDP_SEND, o2.ip, o1.ip, "9999", b"HELLO".hex())

    assert f"{o2.ip} HELLO" in await udp_received(o1.netns, 9999, hello)
