"""Detach a NIC, attach another at its address: every VM of the network reaches the new NIC at
once (issue 9). VMs that talked to the old NIC hold its MAC in their ARP cache; without the
agent's gratuitous ARP for the new NIC they lost 100 % of their first pings for seconds.

"At once" is measured strictly: as soon as the new NIC's node acks the version that created it,
each VM sends ONE echo request (``lab.vm.probe_once``) and its reply must come within one
heartbeat. With the announcement held back by three heartbeats (a sitecustomize on PYTHONPATH
wrapping ``agent.announce.Announcer._announce``: agents inherit the test's environment) this
test fails.
"""

import asyncio

import pytest

from agent.announce import garp_frame
from lab.cluster import Lab
from lab.netns import run
from lab.vm import probe_once
from tests.chaos import report
from tests.e2e.helpers import ack_stream, ensure_network, ensure_vms, lab_fixture, warm_up
from tests.e2e.test_vm_isolation import drops, raw_send

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

HEARTBEAT = 0.5
lab = lab_fixture(nodes=2, mesh=True, heartbeat=HEARTBEAT)


async def neighbour(lab: Lab, vm: str, ip: str) -> str:
    return await run("ip", "netns", "exec", lab.vms[vm].netns, "ip", "neigh", "show", ip)


async def test_new_nic_at_a_reused_address_is_reachable_within_one_heartbeat_of_its_ack(lab: Lab):
    await ensure_network(lab, "ov", "overlay", "10.91.0.0/24")
    await ensure_vms(lab, "ov", {"x1": "n1", "x2": "n2", "x3": "n1"})
    await warm_up(lab, ["x1", "x2", "x3"])
    old_ip, old_mac = lab.vms["x3"].ip, lab.vms["x3"].mac
    for vm in ("x1", "x2"):  # both now cache x3's MAC
        assert old_mac in await neighbour(lab, vm, old_ip)
    # Linux ignores an ARP update within locktime (1 s) of the entry's last one: the warm-up
    # pings just refreshed it, and the agents are quick enough now to announce x4 within that
    await asyncio.sleep(1.1)
    await lab.vm_rm("x3")

    # default allocation does not hand the address straight out again
    api = await lab.connect()
    probe = await api.nic_attach("ov", "n1", "probe")
    assert probe.nic.ip != old_ip
    await api.nic_detach(probe.nic.id)

    # the operator asks for the address explicitly, on the other node
    async with ack_stream(lab, "n2") as acks:
        await lab.vm_add("x4", "ov", "n2", ip=old_ip)
        status = await api.status()
        wanted = next(n.desired_version for n in status.nodes if n.node.name == "n2")
        ack = acks.first
        while not (ack.ok and ack.applied_version >= wanted):
            ack = await asyncio.wait_for(acks.get(), 10)
        # at once: the FIRST echo request from a VM on each node, answered within one heartbeat
        first = await asyncio.gather(
            *(probe_once(lab.vms[vm].netns, old_ip, wait=HEARTBEAT) for vm in ("x1", "x2"))
        )
    x4 = lab.vms["x4"]
    assert x4.ip == old_ip and x4.mac != old_mac
    report.add(
        f"address reuse (e2e): {old_ip} with a new MAC, first single probes after n2's ack of "
        f"version {ack.applied_version}: {dict(zip(('x1', 'x2'), first, strict=True))}"
    )
    assert first == [True, True]
    for vm in ("x1", "x2"):
        assert x4.mac in await neighbour(lab, vm, old_ip)


async def test_a_vm_cannot_announce_another_vms_address(lab: Lab):
    """The host's announcement passes port security (above); the same frame from a VM, claiming
    another VM's address with its own MAC, is dropped at its tap and changes no ARP cache."""
    await ensure_network(lab, "ov", "overlay", "10.91.0.0/24")
    await ensure_vms(lab, "ov", {"x1": "n1", "x2": "n2", "x4": "n2"})  # runs alone too
    await warm_up(lab, ["x2", "x4"])
    x1, x4 = lab.vms["x1"], lab.vms["x4"]
    assert x4.mac in await neighbour(lab, "x2", x4.ip)
    before = (await drops(lab, "n1"))["port_security_arp"]
    await asyncio.sleep(1.1)  # past ARP's lock time, which a plain reply would have to wait out
    await raw_send(lab, "x1", garp_frame(x1.mac, x4.ip), 20, 0.02)
    await asyncio.sleep(0.5)
    assert x4.mac in await neighbour(lab, "x2", x4.ip)
    assert (await drops(lab, "n1"))["port_security_arp"] >= before + 20
