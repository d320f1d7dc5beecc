"""Chaos: drift by hand. Each change an operator (or a bug) could make to a node's kernel is made
inside the node's namespace; the conformance check must SEE it, and the agent must repair it
within two heartbeats, leaving devices without the ``ot`` prefix untouched.

To make "seen" deterministic the agent is paused (SIGSTOP) while the drift is made and observed,
then resumed; the repair time is measured from the moment the drift began, pause included, so it
never flatters the agent. wireguard-go is a process of its own and keeps running. The foreign
device must come out of every repair exactly as it went in (MTU, state, master, address). Each
drift's figures go to tests.chaos.report (printed at the end of the run).
"""

import asyncio
import json
import os
import signal
import time

import pytest
import pytest_asyncio

from lab.cluster import Lab
from lab.conformance import compare, conformance, desired_snapshot, observe, wait_conformant
from lab.invariants import History, PingProbe
from lab.netns import run
from schemas.desired import Snapshot
from tests.chaos import report
from tests.e2e.helpers import ensure_network, ensure_vms, lab_fixture, warm_up

pytestmark = [
    pytest.mark.netns,
    pytest.mark.chaos,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
]

HEARTBEAT = 1.0
WITHIN_HEARTBEATS = 2
NODE = "n1"
FOREIGN = "keepme0"  # a device without the ot prefix: must survive every repair

# faults=True only puts the fault proxy on the bus path (no rule is set): History sees every
# snapshot and ack through it
lab = lab_fixture(nodes=2, mesh=True, heartbeat=HEARTBEAT, faults=True)


@pytest_asyncio.fixture(loop_scope="module")
async def workload(lab: Lab) -> History:
    """An overlay across both nodes (a VM on each), a NAT bridge network on n1, a foreign
    device on n1, every node conformant before any drift, and the bus's history recorded from
    then on."""
    await ensure_network(lab, "ov", "overlay", "10.90.0.0/24")
    await ensure_network(lab, "lan", "bridge", "10.91.0.0/24", "nat")
    await ensure_vms(lab, "ov", {"x1": "n1", "x2": "n2"})
    await ensure_vms(lab, "lan", {"b1": "n1"})
    if FOREIGN not in await lab.exec_node(NODE, "ip", "-br", "link", "show"):
        await lab.exec_node(NODE, "ip", "link", "add", FOREIGN, "type", "bridge")
    await warm_up(lab, ["x1", "x2"])
    await wait_conformant(lab, ["n1", "n2"], timeout=30)
    if not hasattr(lab, "history"):
        status = await (await lab.connect()).status()
        lab.history = History(start={n.node.name: n.applied_version for n in status.nodes})
        lab.faults.observe(lab.history.observe)
    return lab.history


async def _foreign(lab: Lab) -> dict:
    """What a repair must leave alone on the foreign device."""
    (link,) = json.loads(await lab.exec_node(NODE, "ip", "-d", "-j", "link", "show", FOREIGN))
    return {k: link.get(k) for k in ("mtu", "operstate", "master", "address", "flags")}


def _wg(lab: Lab, *argv: str) -> tuple[str, ...]:
    """A ``wg`` command inside the agent's mount and network namespaces (its UAPI socket)."""
    return ("nsenter", "-t", str(lab.agent_pid(NODE)), "-m", "-n", "wg", *argv)


def _vx(s: Snapshot):
    return s.vxlans[0]


def _remote_unicast(s: Snapshot):
    return next(e for e in _vx(s).fdb if e.mac != "00:00:00:00:00:00")


# name → (commands made in the node namespace, what conformance must report)
DRIFTS = {
    "vxlan deleted": (
        lambda lab, s: [("ip", "link", "del", _vx(s).name)],
        lambda s: f"{_vx(s).name}: vxlan missing",
    ),
    "fdb entry removed": (
        lambda lab, s: [
            (
                "bridge",
                "fdb",
                "del",
                _remote_unicast(s).mac,
                "dev",
                _vx(s).name,
                "dst",
                _remote_unicast(s).dst,
                "self",
            )
        ],  # fmt: skip
        lambda s: f"{_vx(s).name}: fdb {_remote_unicast(s).mac} → {_remote_unicast(s).dst} missing",
    ),
    "foreign fdb entry": (
        lambda lab, s: [
            (
                "bridge",
                "fdb",
                "append",
                "02:00:00:00:00:99",
                "dev",
                _vx(s).name,
                "dst",
                "100.64.0.99",
                "self",
                "permanent",
            )
        ],  # fmt: skip
        lambda s: f"{_vx(s).name}: fdb 02:00:00:00:00:99 → 100.64.0.99 not desired",
    ),
    "mtu changed": (
        lambda lab, s: [("ip", "link", "set", _vx(s).name, "mtu", "1300")],
        lambda s: f"{_vx(s).name}: mtu 1300, desired {_vx(s).mtu}",
    ),
    "nft table flushed": (
        lambda lab, s: [("nft", "flush", "table", "inet", "otherix")],
        lambda s: "nft: table inet otherix: chain forward has 0 rules, desired",
    ),
    "wireguard peer removed": (
        lambda lab, s: [
            _wg(lab, "set", "otwg0", "peer", s.wireguard.peers[0].public_key, "remove")
        ],
        lambda s: f"otwg0: peer {s.wireguard.peers[0].public_key} missing",
    ),
    "stray tap": (
        lambda lab, s: [("ip", "tuntap", "add", "ot0000deadbeef", "mode", "tap")],
        lambda s: "ot0000deadbeef: stray tap, not desired",
    ),
}


async def _run(lab: Lab, argv: tuple[str, ...]) -> None:
    if argv[0] == "nsenter":  # enters the node's namespaces itself (the agent's)
        await run(*argv)
    else:
        await lab.exec_node(NODE, *argv)


@pytest.mark.usefixtures("workload")
async def test_converged_nodes_are_conformant(lab: Lab):
    for node in ("n1", "n2"):
        assert await conformance(lab, node) == []


@pytest.mark.parametrize("name", list(DRIFTS))
async def test_drift_by_hand_is_seen_then_repaired_within_two_heartbeats(
    lab: Lab, workload: History, name: str
):
    make, expected = DRIFTS[name]
    snapshot = await desired_snapshot(lab, NODE)
    assert compare(snapshot, await observe(lab, NODE)) == []
    foreign, checks_at = await _foreign(lab), workload.checks
    pid = lab.agent_pid(NODE)
    assert pid is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        for argv in make(lab, snapshot):
            await _run(lab, argv)
        seen = compare(snapshot, await observe(lab, NODE))
    finally:
        os.kill(pid, signal.SIGCONT)
    want = expected(snapshot)
    assert any(line.startswith(want) for line in seen), f"{want!r} not seen in {seen}"

    checks = 1
    deadline = started + (WITHIN_HEARTBEATS + 1) * HEARTBEAT  # past the bound: report, fail below
    while diffs := compare(snapshot, await observe(lab, NODE)):
        checks += 1
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    heartbeats = (time.monotonic() - started) / HEARTBEAT
    history = workload
    outcome = f"NOT repaired after {heartbeats:.2f}" if diffs else f"repaired in {heartbeats:.2f}"
    report.add(
        f"drift {name!r}: seed n/a (no random faults), seen ({len(seen)} difference(s)), "
        f"{outcome} heartbeats, {checks} conformance checks, "
        f"{history.checks - checks_at} invariant checks"
    )
    assert diffs == [], f"not repaired within {WITHIN_HEARTBEATS} heartbeats: {diffs}"
    assert heartbeats <= WITHIN_HEARTBEATS, f"repaired after {heartbeats:.2f} heartbeats"
    # against the latest snapshot too (nothing else changed meanwhile), on both nodes
    assert await conformance(lab, NODE) == []
    assert await conformance(lab, "n2") == []
    assert await _foreign(lab) == foreign, "the foreign device was touched"
    # the bus agrees: both nodes ack the latest version with its digest, nothing went backwards
    await history.wait_converged(
        ["n1", "n2"], within_heartbeats=WITHIN_HEARTBEATS, heartbeat=HEARTBEAT
    )
    history.assert_ok()


@pytest.mark.usefixtures("workload")
async def test_after_every_drift_the_data_path_works(lab: Lab):
    assert await lab.ping("x1", lab.vms["x2"].ip, timeout=5)
    assert await lab.ping("b1", "10.91.0.1", timeout=5)
    async with PingProbe(lab.vms["x1"].netns, lab.vms["x2"].ip) as probe:
        await asyncio.sleep(1.5)
    # a reply still in flight when the probe stops counts as lost
    assert probe.result.sent >= 10 and probe.result.lost <= 1, probe.result
