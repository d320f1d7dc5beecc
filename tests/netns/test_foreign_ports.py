"""Entries of ours that leave our ports for a port that is not ours, on a real namespace.

A bridge of ours may also hold a port someone else enslaved (an operator's veth or dummy): the
agent never touches that port, but a static entry of ours moved onto it (``bridge fdb replace
... dev <their port> master``) takes a VM's traffic away from its tap. The kernel announces such
a move with one RTM_NEWNEIGH that names the new port (and, in NDA_MASTER, our bridge), so the
notifications must count an entry on any port of our bridges, and the next heartbeat repairs it.
"""

import pytest

from tests.netns import test_steady_state as steady
from tests.netns.test_steady_state import LAN, RAW, converged, in_sync, sh

node = steady.node

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

VM_MAC = steady.SNAP.taps[-1].mac  # the NIC on ``LAN``'s tap


async def steady_again(agent) -> None:
    for _ in range(10):
        ack = await agent.handle(RAW)
        assert ack.ok, ack.error
        if ack.changes == 0 and agent.counters["skipped"]:
            return
    raise AssertionError(f"never steady: {agent.counters}")


async def test_our_entry_moved_to_a_foreign_port_of_our_bridge_is_repaired(node):
    ns, agent, _, _ = node
    await converged(agent)
    sh(ns, "ip", "tuntap", "add", "fx0", "mode", "tap")  # no dummy module here
    sh(ns, "ip", "link", "set", "fx0", "master", LAN)
    sh(ns, "ip", "link", "set", "fx0", "up")
    await steady_again(agent)
    assert await in_sync(agent)
    sh(ns, "bridge", "fdb", "replace", VM_MAC, "dev", "fx0", "master", "static")
    assert not await in_sync(agent)
    reconciled = agent.counters["reconciled"]
    ack = await agent.handle(RAW)
    assert ack.ok and ack.changes > 0, ack
    assert agent.counters["reconciled"] == reconciled + 1
    assert await in_sync(agent)
