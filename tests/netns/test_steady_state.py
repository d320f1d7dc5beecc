"""The agent's steady state on a real namespace: real netlink, real nft, real notifications.

An unchanged heartbeat reads no kernel state in full and writes nothing: the agent's acks say
zero writes, its link dumps are counted, and an independent notification socket (a netlink
monitor on the same namespace) sees nothing of ours change. Then each drift an operator could
make by hand is made between two heartbeats, and the next heartbeat repairs it completely.
(WireGuard's check is covered by tests/chaos/test_drift.py on a lab with wireguard-go.)
"""

import secrets
import subprocess

import msgspec
import pytest

from agent.assemble import head_for
from agent.kernel_events import KernelEvents
from agent.links.applier import LinkApplier
from agent.links.model import FdbAction, Observed
from agent.links.netlink import NetlinkLinks
from agent.links.plan import advance
from agent.netlink_thread import NetlinkThread
from agent.nft.applier import NftApplier
from agent.runner import Agent, AgentConfig, _echoes
from controller.compute import snapshot_digest
from schemas.codec import encode
from schemas.desired import Bridge, FdbEntry, Tap
from tests.unit.test_subsystems import AGENT_SNAP, TAP, VX, FakeNats

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

LAN, VM_TAP = "otn0a0b0c0d", "ot00000000cafe"
SNAP = msgspec.structs.replace(
    AGENT_SNAP,
    bridges=(*AGENT_SNAP.bridges, Bridge(name=LAN, mtu=1500, address="10.77.0.1/24")),
    taps=(
        *AGENT_SNAP.taps,
        Tap(name=VM_TAP, bridge=LAN, mtu=1500, mac="02:aa:00:00:00:01", ip="10.77.0.2"),
    ),
    nat_subnets=("10.77.0.0/24",),
)
SNAP = msgspec.structs.replace(SNAP, digest=snapshot_digest(SNAP))
RAW = encode(head_for(SNAP))  # the HEAD on the wire, its sections attached


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True, timeout=10
    ).stdout


class CountingLinks(NetlinkLinks):
    dumps = 0

    async def observe(self):
        self.dumps += 1
        return await super().observe()


@pytest.fixture
def node(tmp_path):
    ns = "otss-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    nl = NetlinkThread(netns=ns)
    events = monitor = None
    try:
        sh(ns, "ip", "link", "set", "lo", "up")
        nl.start()
        kernel = CountingLinks(nl)
        events, monitor = KernelEvents.open(ns), KernelEvents.open(ns)
        nft = NftApplier(prefix=("ip", "netns", "exec", ns))
        config = AgentConfig(node="n1", state_dir=tmp_path)
        agent = Agent(FakeNats(), config, LinkApplier(kernel), nft, events=events)  # type: ignore[arg-type]
        yield ns, agent, kernel, monitor
    finally:
        for sock in (events, monitor):
            if sock is not None:
                sock.close()
        nl.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


async def converged(agent: Agent) -> None:
    assert (await agent.handle(RAW)).changes > 0
    for _ in range(10):  # until a heartbeat writes nothing (the tap's carrier settles)
        ack = await agent.handle(RAW)
        assert ack.ok, ack.error
        if ack.changes == 0 and agent.counters["skipped"]:
            return
    raise AssertionError(f"never steady: {agent.counters}")


async def in_sync(agent: Agent) -> bool:
    seen = await agent.links.observe()
    nft = agent.nft.plan(agent.nft.desired(SNAP), await agent.nft.observe())
    return (
        agent.links.plan(SNAP, seen).actions == ()
        and nft.load is None
        and not nft.enable_forwarding
    )


async def test_unchanged_heartbeats_read_nothing_in_full_and_write_nothing(node):
    ns, agent, kernel, monitor = node
    await converged(agent)
    monitor.drain()
    monitor.know(link.index for link in (await agent.links.observe()).links.values())
    dumps, skipped = kernel.dumps, agent.counters["skipped"]
    for _ in range(20):
        ack = await agent.handle(RAW)
        assert ack.ok and ack.changes == 0
    assert kernel.dumps == dumps and agent.counters["skipped"] == skipped + 20
    assert monitor.drain() is False  # no write touched anything of ours
    sh(ns, "ip", "link", "set", TAP, "mtu", "1300")
    assert monitor.drain() is True  # ... and the monitor would have seen one


DRIFTS = {
    "vxlan deleted": [("ip", "link", "del", VX)],
    "mtu changed": [("ip", "link", "set", TAP, "mtu", "1300")],
    "tap released from its bridge": [("ip", "link", "set", TAP, "nomaster")],
    "bridge address removed": [("ip", "addr", "flush", "dev", LAN)],
    "port fdb entry removed": [
        ("bridge", "fdb", "del", "02:aa:00:00:00:01", "dev", VM_TAP, "master", "static")
    ],
    "foreign vxlan fdb entry": [
        (
            "bridge",
            "fdb",
            "append",
            "02:00:00:00:00:99",
            "dev",
            VX,
            "dst",
            "100.64.0.99",
            "self",
            "permanent",
        ),
    ],  # fmt: skip
    "stray tap": [("ip", "tuntap", "add", "ot0000deadbeef", "mode", "tap")],
    "nft table flushed": [("nft", "flush", "table", "inet", "otherix")],
    "nft bridge table deleted": [("nft", "delete", "table", "bridge", "otherix")],
    "forwarding off": [("sysctl", "-qw", "net.ipv4.ip_forward=0")],
}


@pytest.mark.parametrize("name", list(DRIFTS))
async def test_drift_by_hand_is_repaired_by_the_next_heartbeat(node, name):
    ns, agent, kernel, _ = node
    await converged(agent)
    for argv in DRIFTS[name]:
        sh(ns, *argv)
    assert not await in_sync(agent)
    reconciled = agent.counters["reconciled"]
    ack = await agent.handle(RAW)
    assert ack.ok and ack.changes > 0, ack
    assert agent.counters["reconciled"] == reconciled + 1
    assert await in_sync(agent)


async def test_a_foreign_device_changing_does_not_cost_a_full_reconcile(node):
    ns, agent, kernel, _ = node
    await converged(agent)
    sh(ns, "ip", "link", "add", "keepme0", "type", "bridge")
    sh(ns, "ip", "addr", "add", "192.0.2.1/24", "dev", "keepme0")
    sh(ns, "ip", "link", "set", "keepme0", "up")
    dumps = kernel.dumps
    assert (await agent.handle(RAW)).changes == 0
    assert kernel.dumps == dumps


# --- FDB writes known without a dump: links.plan.advance and the echoes of our own writes ---

REMOTE = "100.64.0.2"


def fdb_snap(macs: dict[str, str], tap_mac: str | None = None):
    """The overlay with these remote MACs (and the flood entry); validation is not the point
    here, the kernel's answer to our FDB writes is."""
    vx = msgspec.structs.replace(
        SNAP.vxlans[0],
        fdb=(FdbEntry(mac="00:00:00:00:00:00", dst=REMOTE),)
        + tuple(FdbEntry(mac=m, dst=d) for m, d in macs.items()),
    )
    taps = (msgspec.structs.replace(SNAP.taps[0], mac=tap_mac or ""), *SNAP.taps[1:])
    return msgspec.structs.replace(SNAP, vxlans=(vx,), taps=taps)


async def read_and_drained(links, monitor):
    """The kernel as read now, the notifications so far drained: only what follows counts."""
    seen = await links.observe()
    monitor.know(link.index for link in seen.links.values())
    monitor.drain()
    return seen


def normal(o: Observed) -> tuple:
    def drop_empty(d):
        return {k: v for k, v in d.items() if v}

    return o.links, *map(drop_empty, (o.fdb, o.learned, o.port_fdb, o.port_learned))


@pytest.mark.parametrize(
    ("before", "after", "tap_mac"),
    [
        ({"02:00:00:00:00:01": REMOTE}, {"02:00:00:00:00:01": REMOTE, "02:00:00:00:00:02": REMOTE}, None),
        ({"02:00:00:00:00:01": REMOTE, "02:00:00:00:00:02": REMOTE}, {"02:00:00:00:00:01": REMOTE}, None),
        ({"02:00:00:00:00:01": REMOTE}, {"02:00:00:00:00:01": "100.64.0.3"}, None),  # dst moves
        ({"02:00:00:00:00:01": REMOTE}, {}, "02:00:00:00:00:01"),  # the NIC moves here
    ],
    ids=["added", "removed", "moved to another node", "moved to a local tap"],
)  # fmt: skip
async def test_fdb_writes_are_known_without_a_dump(node, before, after, tap_mac):
    ns, agent, _, monitor = node
    links = agent.links
    first = fdb_snap(before)
    await links.reconcile(first)
    seen = await read_and_drained(links, monitor)
    plan = links.plan(fdb_snap(after, tap_mac), seen)
    assert plan.actions and all(isinstance(a, FdbAction) for a in plan.actions), plan.actions
    result = await links.apply(plan)
    assert not result.errors and result.writes == len(plan.actions)
    echoes = _echoes(plan)
    assert echoes is not None and monitor.drain(echoes) is False  # only our own writes
    assert normal(advance(seen, plan.actions)) == normal(await links.observe())


async def test_a_foreign_fdb_write_among_our_echoes_is_still_seen(node):
    ns, agent, _, monitor = node
    links = agent.links
    await links.reconcile(fdb_snap({"02:00:00:00:00:01": REMOTE}))
    seen = await read_and_drained(links, monitor)
    plan = links.plan(fdb_snap({"02:00:00:00:00:01": REMOTE, "02:00:00:00:00:02": REMOTE}), seen)
    await links.apply(plan)
    sh(ns, "bridge", "fdb", "append", "02:00:00:00:00:99", "dev", VX, "dst", "100.64.0.9",
       "self", "permanent")  # fmt: skip
    assert monitor.drain(_echoes(plan)) is True
