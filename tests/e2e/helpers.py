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
from tests.chaos import report


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


async def warm_up(lab: Lab, vms: list[str], patience: float = 30.0) -> None:
    """Until every pair of VMs has pinged once. The first packet across a fresh mesh may wait for
    WireGuard's handshake retry (5 s, twice on a loaded machine); tests assert reachability, and
    latency is bench overlay_ping's, so fixtures pay that wait here, whichever test runs first.
    A pair slower than 10 s is reported; one still silent after ``patience`` fails the fixture
    with what the nodes' WireGuard and agents said."""

    async def reach(a: str, b: str) -> float | None:
        started = time.monotonic()
        while not await lab.ping(a, lab.vms[b].ip, timeout=5):
            if time.monotonic() - started > patience:
                return None
        return time.monotonic() - started

    pairs = list(itertools.combinations(vms, 2))
    took = dict(zip(pairs, await asyncio.gather(*(reach(a, b) for a, b in pairs)), strict=True))
    if slow := {f"{a}→{b}": f"{t:.1f}s" for (a, b), t in took.items() if t and t > 10}:
        report.add(f"warm-up: first pings slower than 10 s: {slow}")
    if silent := [pair for pair, t in took.items() if t is None]:
        raise AssertionError(f"no ping within {patience}s for {silent}:\n{await diagnose(lab)}")


async def diagnose(lab: Lab) -> str:
    """What each node's WireGuard device and agent say: for a failure that will not repeat."""
    parts = []
    for node in lab.state.nodes:
        for argv in (("wg", "show"), ("ip", "route", "show", "cache")):  # cache: PMTU exceptions
            with contextlib.suppress(Exception):
                parts.append(f"--- {node}: {' '.join(argv)}\n" + await lab.exec_node(node, *argv))
        log = lab.state_dir / f"agent-{node}.log"
        if log.exists():
            parts.append(f"--- {node}: agent log\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(parts)
