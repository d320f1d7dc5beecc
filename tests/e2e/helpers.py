"""Shared helpers for the end-to-end tests (real nats-server, controller, agents, namespaces)."""

import asyncio
import contextlib
import itertools
import secrets
import time

import pytest_asyncio

from lab.cluster import Lab
from schemas import naming
from schemas.codec import decode
from schemas.messages import Ack, Health


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
async def stream(lab: Lab, subject: str, type_):
    """Messages on ``subject`` decoded as ``type_``, as an asyncio.Queue; live once the first one
    has arrived (``queue.first``): a positive signal, not flush()."""
    queue: asyncio.Queue = asyncio.Queue()
    await lab.connect()

    async def on_msg(msg):
        queue.put_nowait(decode(msg.data, type_))

    sub = await lab.nc.subscribe(subject, cb=on_msg)
    try:
        queue.first = await asyncio.wait_for(queue.get(), 10)
        yield queue
    finally:
        await sub.unsubscribe()


def ack_stream(lab: Lab, node: str):
    """Acks of ``node``; live once the first ack has arrived."""
    return stream(lab, naming.ack_subject(node), Ack)


def health_stream(lab: Lab, node: str):
    """Health reports of ``node`` (every ``lab.health_interval``); live once the first arrived."""
    return stream(lab, naming.health_subject(node), Health)


async def ensure_network(lab: Lab, name: str, *args, **kwargs) -> None:
    """Create the network unless a test before this one did (so any single test runs alone)."""
    api = await lab.connect()
    if name not in {i.network.name for i in await api.network_list()}:
        await api.network_create(name, *args, **kwargs)


async def ensure_vms(lab: Lab, network: str, placement: dict[str, str]) -> None:
    """VM name → node: add the VMs still missing, then wait for the cluster to converge."""
    for vm, node in placement.items():
        if vm not in lab.vms:
            await lab.vm_add(vm, network, node)
    await lab.wait_converged()


async def warm_up(lab: Lab, vms: list[str]) -> None:
    """Ping between every pair of VMs once, without asserting. The first packet across a fresh
    mesh sometimes waits for WireGuard's handshake retry (5 s); tests assert reachability, and
    latency is bench overlay_ping's, so fixtures pay that wait here, whichever test runs first."""
    pairs = itertools.combinations(vms, 2)
    await asyncio.gather(*(lab.ping(a, lab.vms[b].ip, timeout=10) for a, b in pairs))
