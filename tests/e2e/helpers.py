"""Shared helpers for the end-to-end tests (real nats-server, controller, agents, namespaces)."""

import asyncio
import contextlib
import secrets
import time

import pytest_asyncio

from lab.cluster import Lab
from schemas import naming
from schemas.codec import decode
from schemas.messages import Ack


def lab_fixture(nodes: int = 2, **kwargs):
    """A module-scoped lab, always torn down (namespaces, processes) even when a test fails."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def lab():
        lab = Lab("ote" + secrets.token_hex(3), **kwargs)
        try:
            await lab.up(nodes)
            yield lab
        finally:
            await lab.down()

    return lab


async def links(lab: Lab, node: str) -> dict[str, str]:
    """name → 'kind mtu master state' of every device in the node namespace."""
    out = await lab.exec_node(node, "ip", "-d", "-o", "link", "show")
    result = {}
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        words = line.split()
        mtu = words[words.index("mtu") + 1]
        master = words[words.index("master") + 1] if "master" in words else "-"
        result[name] = f"mtu {mtu} master {master}"
    return result


async def eventually(
    predicate, timeout: float = 10.0, interval: float = 0.1, what: str = "condition"
):
    """Poll an async predicate; a timeout here is a generous bound, not a performance claim."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def ack_stream(lab: Lab, node: str):
    """Acks of ``node`` as an asyncio.Queue; live once the first ack has arrived."""
    queue: asyncio.Queue[Ack] = asyncio.Queue()
    await lab.connect()

    async def on_ack(msg):
        queue.put_nowait(decode(msg.data, Ack))

    sub = await lab.nc.subscribe(naming.ack_subject(node), cb=on_ack)
    try:
        # positive signal that the subscription works; kept for callers that need it
        queue.first = await asyncio.wait_for(queue.get(), 10)
        yield queue
    finally:
        await sub.unsubscribe()
