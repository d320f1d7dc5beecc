"""Chaos: the broker, the controller and wireguard-go die; the cluster converges again.

Every failure here is real (SIGKILL, a restarted nats-server on the same JetStream store);
assertions are about state and traffic, never about how fast recovery was.
"""

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from lab.cluster import Lab
from lab.netns import alive, netns_pids
from tests.e2e.helpers import ack_stream, eventually, lab_fixture

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=2, mesh=True, heartbeat=0.5)


async def versions(lab: Lab) -> dict[str, int]:
    status = await (await lab.connect()).status()
    return {n.node.name: n.desired_version for n in status.nodes}


async def test_setup_overlay_and_bridge(lab: Lab):
    api = await lab.connect()
    await api.network_create("ov", "overlay", "10.80.0.0/24")
    await api.network_create("lan", "bridge", "10.81.0.0/24", "nat")
    await lab.vm_add("x1", "ov", "n1")
    await lab.vm_add("x2", "ov", "n2")
    await lab.vm_add("b1", "lan", "n1")
    await lab.wait_converged()
    assert await lab.ping("x1", lab.vms["x2"].ip, timeout=5)


async def test_broker_restart_keeps_intent_and_versions(lab: Lab):
    before = await versions(lab)
    await lab.close()
    await lab.stop_nats()
    assert await lab.ping("x1", lab.vms["x2"].ip)  # the data plane does not need the broker
    await lab.start_nats()  # same port, same JetStream store
    await lab.wait_api()
    api = await lab.connect()
    assert {n.network.name for n in await api.network_list()} == {"ov", "lan"}
    await lab.wait_converged()
    after = await versions(lab)
    assert all(after[n] >= before[n] for n in before), (before, after)
    # a change after the restart is delivered and applied
    await lab.vm_add("x3", "ov", "n2")
    await lab.wait_converged()
    assert await lab.ping("x1", lab.vms["x3"].ip, timeout=5)


async def test_controller_crash_changes_nothing_on_the_nodes(lab: Lab):
    before = await versions(lab)
    pid = int((lab.state_dir / "controller.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: asyncio.sleep(0, not alive(pid)), what="controller gone")
    (lab.state_dir / "controller.pid").unlink()
    await lab.start_controller()
    async with ack_stream(lab, "n1") as acks:
        ack = await asyncio.wait_for(acks.get(), 10)
    assert ack.ok and ack.changes == 0  # same intent, same snapshot: zero kernel writes
    assert await versions(lab) == before  # no version bump without a content change
    assert await lab.ping("x1", lab.vms["x2"].ip)


async def wireguard_go_pids(lab: Lab, node: str) -> list[int]:
    """wireguard-go processes in the node's network namespace (pgrep would see every node's)."""
    found = []
    for pid in await netns_pids(lab.node_netns(node)):
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go":
                found.append(pid)
    return found


async def test_killed_wireguard_go_is_restarted_and_the_mesh_recovers(lab: Lab):
    [pid] = await wireguard_go_pids(lab, "n1")
    os.kill(pid, signal.SIGKILL)

    async def restarted():
        now = await wireguard_go_pids(lab, "n1")
        return now and now != [pid]

    await eventually(restarted, timeout=20, what="wireguard-go restarted by the agent")

    async def pings():
        return await lab.ping("x1", lab.vms["x2"].ip, timeout=2)

    await eventually(pings, timeout=30, what="overlay ping after wireguard-go restart")
