"""Chaos: the broker and the controller die; the cluster converges again.

Every failure here is real (SIGKILL, a restarted nats-server on the same JetStream store);
assertions are about state and traffic, never about how fast recovery was. A killed wireguard-go
is tests/netns/test_wireguard_userspace.py's (the supervisor restores the whole config).
"""

import asyncio
import os
import signal

import pytest
import pytest_asyncio

from lab.cluster import Lab
from lab.netns import alive
from tests.e2e.helpers import (
    ack_stream,
    ensure_network,
    ensure_vms,
    eventually,
    health_stream,
    lab_fixture,
    links,
    warm_up,
)

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=2, mesh=True, heartbeat=0.5)


@pytest_asyncio.fixture(loop_scope="module")
async def workload(lab: Lab) -> None:
    """An overlay across both nodes and a NAT bridge on n1, each with its VMs."""
    await ensure_network(lab, "ov", "overlay", "10.80.0.0/24")
    await ensure_network(lab, "lan", "bridge", "10.81.0.0/24", "nat")
    await ensure_vms(lab, "ov", {"x1": "n1", "x2": "n2"})
    await ensure_vms(lab, "lan", {"b1": "n1"})
    await warm_up(lab, ["x1", "x2"])


async def versions(lab: Lab) -> dict[str, int]:
    status = await (await lab.connect()).status()
    return {n.node.name: n.desired_version for n in status.nodes}


@pytest.mark.usefixtures("workload")
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


@pytest.mark.usefixtures("workload")
async def test_controller_crash_changes_nothing_on_the_nodes(lab: Lab):
    before = await versions(lab)
    devices = await links(lab, "n1")
    pid = int((lab.state_dir / "controller.pid").read_text().split()[0])
    async with health_stream(lab, "n1") as health:
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: asyncio.sleep(0, not alive(pid)), what="controller gone")
        # silence, counted in the agent's own reports: three health intervals (each longer than
        # two heartbeats) in which not one snapshot arrived, and the agent changed nothing
        silent = [await asyncio.wait_for(health.get(), 10) for _ in range(4)][1:]
    assert len({h.snapshots_received for h in silent}) == 1, silent
    assert all(h.ok and h.applied_version == before["n1"] for h in silent)
    assert await links(lab, "n1") == devices
    assert await lab.ping("x1", lab.vms["x2"].ip)  # silence tears nothing down
    (lab.state_dir / "controller.pid").unlink()
    await lab.start_controller()
    async with ack_stream(lab, "n1") as acks:
        ack = await asyncio.wait_for(acks.get(), 10)
    assert ack.ok and ack.changes == 0  # same intent, same snapshot: zero kernel writes
    # A crashed controller cannot know that the versions it saved (at most every second) are
    # the last it sent: the restarted one continues above its mark, never back (a clean stop
    # keeps them: tests/integration/test_failover.py)
    after = await versions(lab)
    assert all(after[n] > before[n] for n in before), (before, after)
    assert await links(lab, "n1") == devices
    assert await lab.ping("x1", lab.vms["x2"].ip)
