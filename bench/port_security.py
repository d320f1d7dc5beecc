"""Throughput between two VMs on one node with and without port security, in the same run.

One lab node, one NAT bridge network, two pairs of VMs: one pair whose NICs have port security
(every frame goes through the ``bridge otherix`` checks), one pair without. A python TCP sender
pushes a fixed byte count to a receiver that times first byte to EOF; pairs alternate, RUNS
each, medians printed in MB/s with the ratio. The lab's wire (a python process per VM copying
frames between tap and veth, as a hypervisor would) bounds the absolute figures, not the ratio.
"""

import asyncio
import secrets
import statistics

from lab.cluster import Lab
from lab.netns import exec_in
from lab.vm import VmHandle

RUNS = 9
BYTES = 64 * 2**20
PORT = 5201

RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
got, start = 0, None
while True:
    data = c.recv(1 << 20)
    if start is None:
        start = time.perf_counter()
    if not data:
        break
    got += len(data)
print(got, time.perf_counter() - start, flush=True)
"""
SENDER = """
import socket, sys
total, chunk = int(sys.argv[3]), b"x" * (1 << 16)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sent = 0
while sent < total:
    s.sendall(chunk)
    sent += len(chunk)
s.close()
"""


async def transfer(sender: VmHandle, receiver: VmHandle) -> float:
    """MB/s of one BYTES transfer, as the receiver saw it."""
    rx = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", receiver.netns, "python3", "-c", RECEIVER, str(PORT),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert (await asyncio.wait_for(rx.stdout.readline(), 10)).strip() == b"ready"
        await exec_in(sender.netns, "python3", "-c", SENDER, receiver.ip, str(PORT), str(BYTES),
                      timeout=120)  # fmt: skip
        got, seconds = (await asyncio.wait_for(rx.stdout.readline(), 120)).split()
    finally:
        if rx.returncode is None:
            rx.kill()
        await rx.wait()
    assert int(got) == BYTES, got
    return BYTES / float(seconds) / 1e6


async def main() -> None:
    lab = Lab("otbp" + secrets.token_hex(2), mesh=False, heartbeat=1.0)
    try:
        await lab.up(1)
        api = await lab.connect()
        await api.network_create("bench", "bridge", "10.61.0.0/24", "nat")
        pairs = {
            "with port security": (
                await lab.vm_add("s1", "bench", "n1", port_security=True),
                await lab.vm_add("r1", "bench", "n1", port_security=True),
            ),
            "without port security": (
                await lab.vm_add("s2", "bench", "n1", port_security=False),
                await lab.vm_add("r2", "bench", "n1", port_security=False),
            ),
        }
        await lab.wait_converged()
        secured = await lab.exec_node("n1", "nft", "list", "set", "bridge", "otherix", "secured")
        assert pairs["with port security"][0].tap in secured
        assert pairs["without port security"][0].tap not in secured
        for sender, receiver in pairs.values():  # warm up: ARP, TCP, page cache
            await transfer(sender, receiver)
        rates: dict[str, list[float]] = {label: [] for label in pairs}
        for _ in range(RUNS):
            for label, (sender, receiver) in pairs.items():
                rates[label].append(await transfer(sender, receiver))
        print(f"TCP, {BYTES >> 20} MiB per transfer, {RUNS} transfers per pair, median (min-max)")
        medians = {}
        for label, samples in rates.items():
            medians[label] = statistics.median(samples)
            print(f"{label:<24} {medians[label]:8.1f} MB/s  ({min(samples):.1f}-{max(samples):.1f})")  # fmt: skip
        ratio = medians["with port security"] / medians["without port security"]
        print(f"ratio with/without port security: {ratio:.3f}")
    finally:
        await lab.down()
