"""Controller failover on a lab with real agents: a second controller follows; the leader is
SIGKILLed; the follower takes over, the agents' applied versions never go back, and a change made
through the new leader reaches the data plane."""

import asyncio
import os
import signal

import pytest

from lab.cluster import Lab
from lab.netns import alive
from tests.e2e.helpers import (
    ack_stream,
    ensure_network,
    ensure_vms,
    eventually,
    lab_fixture,
    warm_up,
)

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=2, mesh=True, heartbeat=0.5)


def drained(queue: asyncio.Queue) -> list:
    items = [queue.first]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def test_agents_keep_converging_across_a_controller_failover(lab: Lab):
    await ensure_network(lab, "ov", "overlay", "10.83.0.0/24")
    await ensure_vms(lab, "ov", {"z1": "n1", "z2": "n2"})
    await warm_up(lab, ["z1", "z2"])
    await lab.start_controller(wait=False, name="controller-2")
    log = lab.state_dir / "controller-2.log"
    await eventually(lambda: asyncio.sleep(0, "serving on" in log.read_text()), timeout=30, what="controller-2 up")  # fmt: skip
    api = await lab.connect()
    assert (await api.status()).leader == f"{lab.prefix}-controller"

    pid = int((lab.state_dir / "controller.pid").read_text().split()[0])
    async with ack_stream(lab, "n1") as acks1, ack_stream(lab, "n2") as acks2:
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: asyncio.sleep(0, not alive(pid)), what="leader gone")
        successor = f"{lab.prefix}-controller-2"

        async def led() -> bool:
            return (await api.status()).leader == successor

        await eventually(led, timeout=10, what="controller-2 leads")
        await lab.vm_add("z3", "ov", "n2")  # through the new leader
        await lab.wait_converged()
        assert await lab.ping("z1", lab.vms["z3"].ip, timeout=5)
        await asyncio.sleep(1.0)  # a few more heartbeats' acks
    for node, queue in (("n1", acks1), ("n2", acks2)):
        applied = [a.applied_version for a in drained(queue)]
        assert applied == sorted(applied), (node, applied)  # never back
        assert applied[-1] > applied[0], (node, applied)  # the new leader's versions applied
    (lab.state_dir / "controller.pid").unlink()
