"""The echoes of our FDB writes say which entry they announce, on a real namespace.

After a reconcile that wrote only FDB entries the agent knows the result without a dump
(``links.plan.advance``) when the notifications since are the echoes of its writes. An echo is
the kernel announcing what was written: the entry added (its VXLAN dst too), or the entry
deleted. Someone else deleting an entry just added, or setting it to another dst, before the
agent drained its notifications, announces the same (ifindex, MAC) and must still be news.
"""

import pytest

from agent.links.model import FdbAction
from agent.runner import _echoes
from tests.netns import test_steady_state as steady
from tests.netns.test_steady_state import REMOTE, VX, fdb_snap, read_and_drained, sh

node = steady.node

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

MAC = "02:00:00:00:00:02"
FOREIGN = {
    "the entry just added deleted": ("bridge", "fdb", "del", MAC, "dev", VX, "dst", REMOTE, "self"),
    "the entry just added set to another dst": (
        "bridge", "fdb", "replace", MAC, "dev", VX, "dst", "100.64.0.9", "self", "permanent"
    ),
    "the entry just deleted added again": (
        "bridge", "fdb", "append", "02:00:00:00:00:01", "dev", VX, "dst", REMOTE, "self",
        "permanent",
    ),
    "the bridge entry just added deleted": (
        "bridge", "fdb", "del", MAC, "dev", VX, "master", "static"
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FOREIGN))
async def test_a_foreign_write_of_an_entry_we_just_wrote_is_news(node, name):
    ns, agent, _, monitor = node
    links = agent.links
    await links.reconcile(fdb_snap({"02:00:00:00:00:01": REMOTE}))
    seen = await read_and_drained(links, monitor)
    plan = links.plan(fdb_snap({MAC: REMOTE}), seen)  # one added, one deleted
    assert plan.actions and all(isinstance(a, FdbAction) for a in plan.actions), plan.actions
    result = await links.apply(plan)
    assert not result.errors and result.writes == len(plan.actions)
    sh(ns, *FOREIGN[name])
    echoes = _echoes(plan)
    assert echoes is not None and monitor.drain(echoes) is True


async def test_our_own_fdb_writes_alone_are_still_echoes(node):
    ns, agent, _, monitor = node
    links = agent.links
    await links.reconcile(fdb_snap({"02:00:00:00:00:01": REMOTE}))
    for macs in (
        {MAC: REMOTE},
        {MAC: "100.64.0.3"},
        {MAC: "100.64.0.3", "02:00:00:00:00:01": REMOTE},
    ):
        seen = await read_and_drained(links, monitor)
        plan = links.plan(fdb_snap(macs), seen)
        result = await links.apply(plan)
        assert not result.errors and result.writes == len(plan.actions)
        assert monitor.drain(_echoes(plan)) is False, plan.actions
