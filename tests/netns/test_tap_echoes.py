"""A NIC attached or detached on this node is not followed by a full read of the kernel (issue 10
item 5), on a real namespace: real netlink, real ``nft``, real notifications.

The tap change path writes the tap (create, enslave, learning off, up, its static bridge entry;
or delete) and loads nftables once; the agent then reads back only the tap and its bridge, and
the notifications of those writes are its own echoes, so the next unchanged heartbeat is
skipped (no link dump, ``heartbeats_reconciled`` unchanged). The adversary: anything else that
happens between the writes and the next heartbeat (another process's nft commit on our table, the
new tap deleted or downed, an FDB entry on another port, a write the kernel did not keep), at
either moment (before the agent drained the notifications, or after), still makes the next
heartbeat a full read, and the heartbeat after that finds the data plane repaired.
"""

import asyncio
import dataclasses

import msgspec
import pytest

from agent.assemble import head_for
from agent.links.model import AddPortFdb, DeleteLink, SetUp
from bench.agent_steady import change_head, restamp
from controller.compute import snapshot_digest
from schemas.codec import encode
from schemas.desired import Tap
from tests.netns import test_steady_state as steady
from tests.netns.test_steady_state import LAN, SNAP, TAP, normal, sh

node = steady.node  # the namespace, the agent in it, its link kernel, a monitor

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

NEW = Tap(name="ot0000000000a1", bridge=LAN, mtu=1500, mac="02:aa:00:00:00:a1", ip="10.77.0.9")


def with_new(attached: bool):
    snap = SNAP if not attached else msgspec.structs.replace(SNAP, taps=(*SNAP.taps, NEW))
    return msgspec.structs.replace(snap, digest=snapshot_digest(snap))


class Heads:
    """The controller's side: each step's HEAD as a delta from the last (the change path)."""

    def __init__(self):
        self.version, self.last = 1, restamp(head_for(SNAP), 1)

    def step(self, attached: bool) -> tuple[bytes, bytes]:
        """(the HEAD of the attach or detach, the HEAD alone: the heartbeats after it)."""
        self.version += 1
        new = restamp(head_for(with_new(attached)), self.version)
        change, self.last = change_head(self.last, new), new
        return encode(change), encode(msgspec.structs.replace(new, sections=()))


async def in_sync(agent, snap) -> bool:
    seen = await agent.links.observe()
    nft = agent.nft.plan(agent.nft.desired(snap), await agent.nft.observe())
    return agent.links.plan(snap, seen).actions == () and nft.load is None


async def repaired_by_the_next_heartbeat(agent, beat, snap) -> None:
    """The kernel is not as ``snap`` wants after a change: the next heartbeat is one full read,
    which writes what is missing, and leaves it as wanted."""
    assert not await in_sync(agent, snap)
    reconciled = agent.counters["reconciled"]
    ack = await agent.handle(beat)
    assert ack.ok and ack.changes > 0, ack
    assert agent.counters["reconciled"] == reconciled + 1
    assert await in_sync(agent, snap)


async def started(agent) -> Heads:
    heads = Heads()
    raw = encode(heads.last)
    assert (await agent.handle(raw)).changes > 0
    beat = encode(msgspec.structs.replace(heads.last, sections=()))
    for _ in range(10):  # until a heartbeat is skipped (the taps' carrier settles)
        ack = await agent.handle(beat)
        assert ack.ok, ack.error
        if ack.changes == 0 and agent.counters["skipped"]:
            return heads
    raise AssertionError(f"never steady: {agent.counters}")


async def test_the_heartbeat_after_a_nic_attached_or_detached_reads_nothing_in_full(node):
    ns, agent, kernel, monitor = node
    heads = await started(agent)
    for attached in (True, False, True, False):
        change, beat = heads.step(attached)
        ack = await agent.handle(change)
        assert ack.ok and ack.changes > 0, ack
        dumps, reconciled = kernel.dumps, agent.counters["reconciled"]
        if heads.version <= 3:  # the kernel's deferred link news (linkwatch) comes too
            await asyncio.sleep(1.5)
        for _ in range(3):
            ack = await agent.handle(beat)
            assert ack.ok and ack.changes == 0, ack
        assert (kernel.dumps, agent.counters["reconciled"]) == (dumps, reconciled)
        assert normal(agent._seen) == normal(await agent.links.observe())  # what a dump says
        assert await in_sync(agent, with_new(attached))
        assert (NEW.name in agent.taps) is attached  # health's taps follow without a dump
    assert agent.counters["tap_changes"] == 4


def nft_rule(ns: str) -> None:
    sh(ns, "nft", "insert", "rule", "inet", "otherix", "forward", "accept")


FOREIGN = {
    "nft rule added to our table": nft_rule,
    "new tap deleted": lambda ns: sh(ns, "ip", "link", "del", NEW.name),
    "new tap downed": lambda ns: sh(ns, "ip", "link", "set", NEW.name, "down"),
    "fdb entry on another port": lambda ns: sh(
        ns, "bridge", "fdb", "add", "02:aa:00:00:00:77", "dev", TAP, "master", "static"
    ),
    "bridge downed": lambda ns: sh(ns, "ip", "link", "set", LAN, "down"),
    "new tap's learning on": lambda ns: sh(
        ns, "ip", "link", "set", NEW.name, "type", "bridge_slave", "learning", "on"
    ),
    "new tap's mtu changed": lambda ns: sh(ns, "ip", "link", "set", NEW.name, "mtu", "1300"),
    "new tap moved to another bridge of ours": lambda ns: sh(
        ns, "ip", "link", "set", NEW.name, "master", "otb1000"
    ),
    "new tap's entry deleted": lambda ns: sh(
        ns, "bridge", "fdb", "del", NEW.mac, "dev", NEW.name, "master", "static"
    ),
    "a stray static entry on the new tap": lambda ns: sh(
        ns, "bridge", "fdb", "add", "02:aa:00:00:00:78", "dev", NEW.name, "master", "static"
    ),
    "bridge mtu changed": lambda ns: sh(ns, "ip", "link", "set", LAN, "mtu", "1400"),
    "address added to the bridge": lambda ns: sh(
        ns, "ip", "addr", "add", "10.78.0.1/24", "dev", LAN
    ),
    # another tap's entry moved onto the written bridge itself: one event, naming the bridge
    "another port's entry moved to the bridge": lambda ns: sh(
        ns, "bridge", "fdb", "replace", "02:aa:00:00:00:01", "dev", LAN, "permanent"
    ),
}


@pytest.mark.parametrize("moment", ["before the drain", "after the heartbeat"])
@pytest.mark.parametrize("name", list(FOREIGN))
async def test_a_foreign_change_after_the_attach_is_read_and_repaired(node, name, moment):
    ns, agent, kernel, _ = node
    heads = await started(agent)
    change, beat = heads.step(True)
    if moment == "before the drain":  # between our writes and the reading of their echoes
        drain = agent.events.drain

        def foreign_first(echoes=None):
            if echoes is not None:
                FOREIGN[name](ns)
            return drain(echoes)

        agent.events.drain = foreign_first
    ack = await agent.handle(change)
    assert ack.ok and ack.changes > 0, ack
    if moment == "before the drain":
        agent.events.drain = drain
    else:
        FOREIGN[name](ns)
    await repaired_by_the_next_heartbeat(agent, beat, with_new(True))
    ack = await agent.handle(beat)  # nothing left to do
    assert ack.ok and ack.changes == 0, ack


@pytest.mark.parametrize(
    ("attached", "dropped"), [(True, SetUp), (True, AddPortFdb), (False, DeleteLink)]
)
async def test_a_tap_write_the_kernel_did_not_keep_is_read_and_repaired(node, attached, dropped):
    """The executor says the write was made, but the kernel does not have it (as if someone
    undid it unseen): the read-back finds it, and the next heartbeat is full and repairs it."""
    ns, agent, kernel, _ = node
    heads = await started(agent)
    if not attached:  # attach first, as it should go
        change, beat = heads.step(True)
        assert (await agent.handle(change)).ok and (await agent.handle(beat)).ok
    change, beat = heads.step(attached)
    execute = kernel.execute

    async def lossy(plan):
        kept = tuple(a for a in plan.actions if not isinstance(a, dropped))
        assert len(kept) < len(plan.actions)
        result = await execute(msgspec.structs.replace(plan, actions=kept))
        return dataclasses.replace(result, writes=result.writes + 1)

    kernel.execute = lossy
    ack = await agent.handle(change)
    kernel.execute = execute
    assert ack.ok and ack.changes > 0, ack
    await repaired_by_the_next_heartbeat(agent, beat, with_new(attached))


async def test_nftables_knows_what_its_own_load_left(node):
    """After a load (and only our loads), the tables are known without ``nft list``: what the
    next quiet reconcile plans against is what a listing shows, so it plans nothing."""
    ns, agent, _, _ = node
    nft = agent.nft
    await nft.reconcile(nft.desired(SNAP))  # forwarding on too, if it was off
    for snap in (with_new(True), with_new(False), with_new(True)):
        result = await nft.reconcile(nft.desired(snap))
        assert result.writes and nft.commits and not result.errors
        known, listed = nft._quiet_observed, await nft.observe()
        assert known is not None
        assert (known.exists, known.digest, known.rule_count, known.sets, known.forwarding) == (
            listed.exists, listed.digest, listed.rule_count, listed.sets, listed.forwarding
        )  # fmt: skip
        assert nft.plan(nft.desired(snap), known).writes == 0


async def test_an_entry_moved_onto_a_tap_as_it_is_deleted_is_read_and_repaired(node):
    """Another tap's entry moved onto the tap being detached, just before our delete: the move
    and the flush are both events of the written tap, and the read-back finds the tap gone as
    wanted; the entry the other tap lost must still make the next heartbeat a full read."""
    ns, agent, kernel, _ = node
    heads = await started(agent)
    change, beat = heads.step(True)
    assert (await agent.handle(change)).ok and (await agent.handle(beat)).ok
    change, beat = heads.step(False)
    execute = kernel.execute

    async def moved_first(plan):
        sh(ns, "bridge", "fdb", "replace", "02:aa:00:00:00:01", "dev", NEW.name, "master", "static")
        return await execute(plan)

    kernel.execute = moved_first
    ack = await agent.handle(change)
    kernel.execute = execute
    assert ack.ok and ack.changes > 0, ack
    await repaired_by_the_next_heartbeat(agent, beat, with_new(False))
