"""Benchmarks that print figures; never part of the test suite (shared machines are noisy)."""

import asyncio
import statistics
import time

from schemas import naming
from schemas.codec import decode
from schemas.messages import Ack


def summary(label: str, samples: list[float]) -> float:
    """Print median, min and max in milliseconds; return the median in seconds."""
    med = statistics.median(samples)
    print(f"{label:<48} median {med * 1000:8.2f} ms   min {min(samples) * 1000:8.2f}   max {max(samples) * 1000:8.2f}   (n={len(samples)})", flush=True)  # fmt: skip
    return med


async def timed_acks(nc, node: str) -> "asyncio.Queue[tuple[float, Ack]]":
    """A node's acks with their arrival time; returns once the subscription has delivered one."""
    acks: asyncio.Queue[tuple[float, Ack]] = asyncio.Queue()

    async def on_ack(msg):
        acks.put_nowait((time.perf_counter(), decode(msg.data, Ack)))

    await nc.subscribe(naming.ack_subject(node), cb=on_ack)
    await asyncio.wait_for(acks.get(), 10)  # a positive signal, not flush()
    return acks
