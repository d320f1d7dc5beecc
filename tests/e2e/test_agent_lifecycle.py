"""The agent's life on a real lab node: SIGTERM acks and leaves the data plane in place, a start
while nats-server is down keeps trying until it comes up, and a flood of duplicate snapshots is
absorbed in bounded memory (issue 9).
"""

import asyncio
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from lab import cluster
from lab.cluster import Lab
from schemas import naming
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
    await ensure_network(lab, "ov", "overlay", "10.92.0.0/24")
    await ensure_vms(lab, "ov", {"y1": "n1", "y2": "n2"})
    await warm_up(lab, ["y1", "y2"])


async def start_agent_process(lab: Lab, node: str, monkeypatch) -> asyncio.subprocess.Process:
    """Start ``node``'s agent and keep its process handle (for its exit status)."""
    started = []

    async def keep(*args, **kwargs):
        started.append(proc := await spawn(*args, **kwargs))
        return proc

    spawn = cluster.spawn
    monkeypatch.setattr(cluster, "spawn", keep)
    await lab.start_agent(node)
    monkeypatch.setattr(cluster, "spawn", spawn)
    return started[0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def ot_devices(devices: dict[str, str]) -> dict[str, str]:
    return {name: d for name, d in devices.items() if name.startswith(naming.PREFIX)}


@pytest.mark.usefixtures("workload")
async def test_sigterm_acks_the_applied_version_and_leaves_the_data_plane(lab: Lab, monkeypatch):
    await lab.stop_agent("n1")  # its own SIGTERM; restarted with a handle on the process
    proc = await start_agent_process(lab, "n1", monkeypatch)
    status = await lab.wait_converged()
    n1 = next(n for n in status.nodes if n.node.name == "n1")
    before = await links(lab, "n1")
    async with ack_stream(lab, "n1") as acks, health_stream(lab, "n1") as health:
        killed_at = time.time()  # before the signal: the agent may answer before we look
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await asyncio.sleep(0.3)  # what it flushed is on its way to us
        last_ack = acks.first
        while not acks.empty():
            last_ack = acks.get_nowait()
        reports = [health.get_nowait() for _ in range(health.qsize())]
    assert last_ack.sent_at >= killed_at, "no ack after SIGTERM"
    assert (last_ack.version, last_ack.applied_version) == (n1.desired_version,) * 2
    assert last_ack.digest == n1.desired_digest and last_ack.ok
    assert any(h.sent_at >= killed_at for h in reports), "no health report after SIGTERM"
    # nothing deleted: every managed device is still there, and VMs still talk across nodes
    assert ot_devices(await links(lab, "n1")) == ot_devices(before)
    assert await lab.ping("y1", lab.vms["y2"].ip, count=3, timeout=5)

    await lab.start_agent("n1")
    async with ack_stream(lab, "n1") as acks:
        ack = acks.first
        while not (ack.ok and ack.applied_version >= n1.desired_version):
            ack = await asyncio.wait_for(acks.get(), 10)
    assert ack.changes == 0, ack  # converged with zero writes, deletes included
    assert ot_devices(await links(lab, "n1")) == ot_devices(before)


@pytest.mark.usefixtures("workload")
async def test_agent_started_while_nats_is_down_registers_once_it_is_up(lab: Lab, monkeypatch):
    await lab.close()
    await lab.stop_agent("n2")
    await lab.stop_nats()
    try:
        log_file = lab.state_dir / "agent-n2.log"
        tried = log_file.read_text().count("cannot reach the bus") if log_file.exists() else 0
        waiting = await start_agent_process(lab, "n2", monkeypatch)
        for _ in range(300):  # until its first try failed (a loaded machine starts slowly)
            if log_file.read_text().count("cannot reach the bus") > tried:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the agent never tried to reach the bus")
        waiting.send_signal(signal.SIGTERM)  # stopped while still trying: a clean exit
        assert await asyncio.wait_for(waiting.wait(), 5) == 0
        await lab.start_agent("n2")
        await asyncio.sleep(3)  # several tries, with back-off
        assert lab.agent_pid("n2") is not None, "the agent gave up while nats-server was down"
    finally:
        await lab.start_nats()  # same port and JetStream store
    await lab.wait_api()  # the controller reconnected too
    await lab.wait_converged(timeout=30)
    log = (lab.state_dir / "agent-n2.log").read_text()
    assert "cannot reach the bus" in log
    assert await lab.ping("y2", lab.vms["y1"].ip, count=3, timeout=5)


@pytest.mark.usefixtures("workload")
async def test_a_flood_of_duplicate_snapshots_is_absorbed_in_bounded_memory(lab: Lab):
    await lab.wait_converged()
    node_nc = await lab.nats_client("n1")  # the node may read its own desired state
    controller_nc = await lab.nats_client("controller")  # only the controller may publish it
    try:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        async def first_snapshot(msg):
            if not got.done():
                got.set_result(msg.data)

        sub = await node_nc.subscribe(naming.desired_subject("n1"), cb=first_snapshot)
        snapshot = await asyncio.wait_for(got, 10)
        await sub.unsubscribe()
        pid = lab.agent_pid("n1")
        assert pid is not None
        async with health_stream(lab, "n1") as health:
            first, rss_before = health.first, rss_kib(pid)
            for i in range(3000):
                await controller_nc.publish(naming.desired_subject("n1"), snapshot)
                if i % 500 == 0:
                    await controller_nc.flush(timeout=5)
            await controller_nc.flush(timeout=5)
            await asyncio.sleep(1.5)
            last = await eventually(
                lambda: asyncio.sleep(0, health.get_nowait() if not health.empty() else None),
                what="a health report after the flood",
            )
            while not health.empty():
                last = health.get_nowait()
        rss_after = rss_kib(pid)
    finally:
        await node_nc.close()
        await controller_nc.close()
    received = last.snapshots_received - first.snapshots_received
    applied = last.snapshots_applied - first.snapshots_applied
    print(f"flood: received {received}, applied {applied}, rss {rss_before}→{rss_after} KiB")
    assert lab.agent_pid("n1") == pid and last.ok
    assert received > 0 and applied < received / 5, (received, applied)  # coalesced, not queued
    assert rss_after - rss_before < 30 * 1024, (rss_before, rss_after)
    async with ack_stream(lab, "n1") as acks:  # still applying, and nothing to change
        ack = await asyncio.wait_for(acks.get(), 10)
    assert ack.ok and ack.changes == 0
