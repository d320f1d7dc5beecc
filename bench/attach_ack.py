"""Time from ``nic attach`` to the agent's ack of the snapshot that made the tap (median of 20).

Baselines measured in the same run: a bare API round trip (``nic list``) and creating + enslaving
+ upping a tap with the ``ip`` command in a namespace, i.e. the kernel work alone; and the same
attach on a lab whose bus runs without TLS and identities, which shows what bus security costs.
"""

import asyncio
import secrets
import time

from bench import summary, timed_acks
from lab.cluster import Lab
from schemas import naming

RUNS = 20


async def main() -> None:
    secured = await measure(secure=True)
    open_bus = await measure(secure=False)
    print(
        f"bus security: attach {secured * 1000:.1f} ms secured vs {open_bus * 1000:.1f} ms open"
        f" (ratio {secured / open_bus:.2f}x)"
    )


async def measure(secure: bool) -> float:
    """Print this lab's figures; return the attach median (seconds)."""
    print(f"-- bus {'with TLS and identities' if secure else 'open (no TLS, no identities)'}")
    lab = Lab("otbn" + secrets.token_hex(2), mesh=False, heartbeat=1.0, secure=secure)
    try:
        await lab.up(1)
        api = await lab.connect()
        await api.network_create("bench", "bridge", "10.30.0.0/16")
        acks = await timed_acks(lab.nc, "n1")

        attach = []
        for i in range(RUNS):
            await lab.wait_converged()
            while not acks.empty():
                acks.get_nowait()
            start = time.perf_counter()
            await api.nic_attach("bench", "n1", f"vm{i}")
            while True:
                at, ack = await asyncio.wait_for(acks.get(), 10)
                if ack.ok and ack.changes:
                    attach.append(at - start)
                    break

        api_rtt = []
        for _ in range(RUNS):
            start = time.perf_counter()
            await api.nic_list()
            api_rtt.append(time.perf_counter() - start)

        kernel = []
        bridge = naming.bridge_network_bridge("bench")
        for i in range(RUNS):
            tap = f"otbench{i:04d}"
            start = time.perf_counter()
            await lab.exec_node("n1", "sh", "-c",
                                f"ip tuntap add mode tap name {tap} && ip link set {tap} master {bridge} up")  # fmt: skip
            kernel.append(time.perf_counter() - start)
            await lab.exec_node("n1", "ip", "link", "del", tap)

        med_attach = summary("nic attach -> agent ack (tap created)", attach)
        med_api = summary("baseline: API round trip (nic list)", api_rtt)
        med_kernel = summary("baseline: `ip` creates+enslaves a tap", kernel)
        print(
            f"ratio attach/API round trip: {med_attach / med_api:.1f}x; attach/ip commands: {med_attach / med_kernel:.1f}x"
        )
        return med_attach
    finally:
        await lab.down()
