"""Overlay networks end to end: VXLAN over a real wireguard-go mesh, FDB owned by the controller."""

import asyncio
import itertools
import socket
import struct

import pytest
import pytest_asyncio

from lab.cluster import Lab
from lab.netns import run
from tests.e2e.helpers import ack_stream, ensure_network, ensure_vms, lab_fixture, links, warm_up

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=3, mesh=True, heartbeat=0.5)

VMS = {"o1": "n1", "o2": "n2", "o3": "n3", "o4": "n1"}  # where each VM starts


@pytest_asyncio.fixture(loop_scope="module")
async def ov(lab: Lab) -> None:
    """Overlay ``ov`` (VNI 1000) with the VMS (made by the first test that needs it)."""
    await ensure_network(lab, "ov", "overlay", "10.20.0.0/24", vni=1000)
    await ensure_vms(lab, "ov", VMS)
    await warm_up(lab, list(VMS))


async def tunnel_ip(lab: Lab, node: str) -> str:
    nodes = await (await lab.connect()).node_list()
    return next(n.node.tunnel_ip for n in nodes if n.node.name == node)


async def fdb(lab: Lab, node: str, dev: str) -> set[str]:
    out = await lab.exec_node(node, "bridge", "fdb", "show", "dev", dev)
    return {line.strip() for line in out.splitlines() if line.strip()}


@pytest.mark.usefixtures("ov")
async def test_every_vm_pings_every_other_across_nodes(lab: Lab):
    results = await asyncio.gather(
        *(lab.ping(a, lab.vms[b].ip, count=2, timeout=5) for a, b in itertools.permutations(VMS, 2))
    )
    assert all(results), dict(zip(itertools.permutations(VMS, 2), results, strict=True))


@pytest.mark.usefixtures("ov")
async def test_mtu_1390_crosses_1391_refused_locally(lab: Lab):
    dst = lab.vms["o2"].ip
    assert await lab.ping("o1", dst, size=1390 - 28, dont_fragment=True, timeout=3)
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", f"{lab.prefix}-vm-o1", "ping", "-n", "-c", "1", "-W", "1",
        "-M", "do", "-s", str(1391 - 28), dst,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode != 0
    assert b"message too long" in out.lower()  # refused by the VM's own stack: no fragments
    mtus = {n: v for n, v in (await links(lab, "n1")).items() if n.startswith("ot")}
    assert mtus["otwg0"].startswith("mtu 1440")
    assert all(v.startswith("mtu 1390") for n, v in mtus.items() if n != "otwg0"), mtus


@pytest.mark.usefixtures("ov")
async def test_underlay_carries_only_wireguard(lab: Lab, tmp_path):
    pcap = tmp_path / "underlay.pcap"
    capture = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", lab.topology.fabric, "tcpdump", "-n", "-i", "any", "-U", "--immediate-mode",
        "-w", str(pcap), "udp or icmp", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(capture.stderr.readline(), 10)  # "listening on any"
        marker = "4f544852584f5645524c4159"  # "OTHRXOVERLAY" in every ping payload
        assert await lab.ping("o1", lab.vms["o2"].ip, count=5, timeout=5) is True
        await run("ip", "netns", "exec", f"{lab.prefix}-vm-o1", "ping", "-n", "-q", "-c", "5",
                  "-i", "0.1", "-p", marker, lab.vms["o3"].ip)  # fmt: skip
    finally:
        capture.terminate()
        await capture.wait()
    data = pcap.read_bytes()
    packets = await run("tcpdump", "-n", "-r", str(pcap))
    assert "51820" in packets  # the mesh carried the pings
    assert ".4789" not in packets  # no VXLAN in the clear
    assert "ICMP" not in packets  # no VM packet in the clear
    assert bytes.fromhex(marker) not in data
    for vm in VMS:
        assert lab.vms[vm].ip not in packets


@pytest.mark.usefixtures("ov")
async def test_fdb_holds_exactly_the_controllers_entries(lab: Lab):
    nics = {n.nic.vm: n.nic for n in await (await lab.connect()).nic_list(network="ov")}
    tips = {n: await tunnel_ip(lab, n) for n in ("n1", "n2", "n3")}
    for node in ("n1", "n2", "n3"):
        entries = await fdb(lab, node, "otvx1000")
        ours = {e for e in entries if " dst " in e}
        expected = {
            f"00:00:00:00:00:00 dst {tips[other]} self permanent" for other in tips if other != node
        }
        expected |= {
            f"{nic.mac} dst {tips[nic.node]} self permanent"
            for nic in nics.values()
            if nic.node != node
        }
        assert ours == expected, (node, ours ^ expected)
        # nothing learned from the wire: every self entry without dst is the device's own
        assert not [e for e in entries if "self" in e and "permanent" not in e], entries


async def test_flood_list_only_towards_nodes_hosting_the_vni(lab: Lab):
    api = await lab.connect()
    await api.network_create("ov2", "overlay", "10.21.0.0/24", vni=2000)
    await lab.vm_add("p1", "ov2", "n1")
    await lab.vm_add("p2", "ov2", "n2")
    await lab.wait_converged()
    floods = {e for e in await fdb(lab, "n1", "otvx2000") if e.startswith("00:00:00:00:00:00")}
    assert floods == {f"00:00:00:00:00:00 dst {await tunnel_ip(lab, 'n2')} self permanent"}
    assert "otvx2000" not in await links(lab, "n3")  # n3 hosts no NIC of VNI 2000
    assert await lab.ping("p1", lab.vms["p2"].ip, timeout=5)


def vxlan_frame(vni: int, dst_mac: str, dst_ip: str, port: int, payload: bytes) -> bytes:
    """A VXLAN packet whose inner frame is a UDP datagram to a VM."""
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.20.0.250"), socket.inet_aton(dst_ip))  # fmt: skip
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~csum & 0xFFFF) + ip[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("026600000001") + b"\x08\x00"
    return struct.pack("!II", 0x08000000, vni << 8) + eth + ip + udp


async def forged_delivered(lab: Lab, vm: str) -> bool:
    """Send a forged VXLAN packet from the outside host to the VM's node; did the VM get it?"""
    target = lab.vms[vm]
    node_ip = next(n.underlay_ip for n in lab.topology.nodes.values() if n.netns == target.node_ns)
    listener = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", target.netns, "python3", "-c",
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 9999));"
        "print('ready', flush=True); s.settimeout(2);\n"
        "try: print(s.recv(100).decode(), flush=True)\nexcept OSError: print('nothing', flush=True)",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert (await asyncio.wait_for(listener.stdout.readline(), 10)).strip() == b"ready"
    frame = vxlan_frame(1000, target.mac, target.ip, 9999, b"FORGED")
    sender = (
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f"[s.sendto(bytes.fromhex('{frame.hex()}'), ('{node_ip}', 4789)) for _ in range(3)]"
    )
    await run("ip", "netns", "exec", lab.topology.outside, "python3", "-c", sender)
    out, _ = await asyncio.wait_for(listener.communicate(), 10)
    return b"FORGED" in out


@pytest.mark.usefixtures("ov")
async def test_forged_vxlan_from_the_underlay_never_reaches_a_vm(lab: Lab):
    assert not await forged_delivered(lab, "o1")
    assert await lab.ping("o1", lab.vms["o2"].ip, timeout=5)  # mesh traffic keeps flowing
    # the check can fail: without the agent's table the forged frame does arrive
    await lab.stop_agent("n1")
    try:
        await lab.exec_node("n1", "nft", "delete", "table", "inet", "otherix")
        assert await forged_delivered(lab, "o1")
    finally:
        await lab.start_agent("n1")
    async with ack_stream(lab, "n1") as acks:  # the new agent acks only after applying
        assert acks.first.ok
    assert "udp dport 4789" in await lab.exec_node("n1", "nft", "list", "table", "inet", "otherix")
    assert not await forged_delivered(lab, "o1")


@pytest.mark.usefixtures("ov")
async def test_nic_moved_to_another_node_keeps_mac_and_ip(lab: Lab):
    api = await lab.connect()
    moved = lab.vms["o4"]
    mac, ip = moved.mac, moved.ip
    await lab.vm_rm("o4")
    await lab.vm_add("o4", "ov", "n3", ip=ip, mac=mac)
    await lab.wait_converged()
    for src in ("o1", "o2"):
        assert await lab.ping(src, ip, count=2, timeout=5), src
    tip3 = await tunnel_ip(lab, "n3")
    assert f"{mac} dst {tip3} self permanent" in await fdb(lab, "n1", "otvx1000")
    tip1 = await tunnel_ip(lab, "n1")
    assert not [e for e in await fdb(lab, "n2", "otvx1000") if e.startswith(mac) and tip1 in e]
    [nic] = [n.nic for n in await api.nic_list(node="n3") if n.nic.vm == "o4"]
    assert (nic.mac, nic.ip) == (mac, ip)
