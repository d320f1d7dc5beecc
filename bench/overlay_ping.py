"""Time from ``nic attach`` on node n1 to the first successful ping of a VM on node n2 across
the overlay (median of 10). The new VM's namespace is created by the lab while the agent works,
as a hypervisor would start the VM. Baselines from the same run: attach -> agent ack on n1, and
the overlay's ping round trip once established.
"""

import asyncio
import secrets
import time

from bench import summary, timed_acks
from lab.cluster import Lab
from lab.vm import ping

RUNS = 10


async def main() -> None:
    lab = Lab("otbo" + secrets.token_hex(2), mesh=True, heartbeat=1.0)
    try:
        await lab.up(2)
        api = await lab.connect()
        await api.network_create("bench", "overlay", "10.60.0.0/24")
        target = await lab.vm_add("target", "bench", "n2")
        await lab.wait_converged()
        acks = await timed_acks(lab.nc, "n1")

        to_ping, to_ack, rtt = [], [], []
        for i in range(RUNS):
            while not acks.empty():
                acks.get_nowait()
            vm = f"v{i}"
            start = time.perf_counter()
            handle = await lab.vm_add(vm, "bench", "n1")
            while True:
                at, ack = await asyncio.wait_for(acks.get(), 10)
                if ack.ok and ack.changes:
                    to_ack.append(at - start)
                    break
            deadline = start + 30
            while not await ping(handle.netns, target.ip, count=1, timeout=1):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{vm} never reached {target.ip}")
            to_ping.append(time.perf_counter() - start)
            t = time.perf_counter()
            await ping(handle.netns, target.ip, count=1, timeout=1)
            rtt.append(time.perf_counter() - t)
            await lab.vm_rm(vm)
            await lab.wait_converged()

        med = summary("nic attach on n1 -> first ping to n2 succeeds", to_ping)
        ack = summary("baseline: nic attach -> n1 agent ack", to_ack)
        one = summary("baseline: one ping (process start + RTT)", rtt)
        print(f"ratio attach->ping / attach->ack: {med / ack:.1f}x; / one ping: {med / one:.1f}x")
    finally:
        await lab.down()
