"""The mesh follows cluster membership: nodes join, rotate keys and leave, all from the controller."""

import asyncio
import contextlib
import time

import pytest
import pytest_asyncio

from client.api import ApiError
from lab.cluster import Lab
from tests.e2e.helpers import (
    ack_stream,
    ensure_network,
    ensure_vms,
    eventually,
    lab_fixture,
    links,
    warm_up,
)

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=3, mesh=True, heartbeat=0.5)


async def wg_show(lab: Lab, node: str, what: str) -> dict[str, str]:
    """`wg show otwg0 WHAT` as the node sees it (the UAPI socket is in the agent's mount ns)."""
    pid = lab.agent_pid(node)
    assert pid, f"agent of {node} is not running"
    out = await lab.exec_node(node, "nsenter", "-t", str(pid), "-m", "wg", "show", "otwg0", what)
    return dict(line.split("\t", 1) for line in out.strip().splitlines() if line.strip())


async def node_info(lab: Lab, name: str):
    return next(n for n in await (await lab.connect()).node_list() if n.node.name == name)


async def fresh_convergence(lab: Lab, *nodes: str) -> None:
    """Converged *and* each node acked after now (old acks must not count)."""
    for node in nodes:
        async with ack_stream(lab, node) as acks:
            while True:
                ack = await asyncio.wait_for(acks.get(), 10)
                if ack.ok:
                    break
    await lab.wait_converged(nodes=set(nodes))


@pytest_asyncio.fixture(loop_scope="module")
async def ov(lab: Lab) -> None:
    """Overlay ``ov`` with VM m<i> on node n<i> (made by the first test that needs it)."""
    await ensure_network(lab, "ov", "overlay", "10.40.0.0/24")
    await ensure_vms(lab, "ov", {"m1": "n1", "m2": "n2", "m3": "n3"})
    await warm_up(lab, ["m1", "m2", "m3"])


@pytest.mark.usefixtures("ov")
async def test_overlay_across_three_nodes(lab: Lab):
    for a, b in (("m1", "m2"), ("m1", "m3"), ("m2", "m3")):
        assert await lab.ping(a, lab.vms[b].ip, timeout=5), (a, b)


@pytest.mark.usefixtures("ov")
async def test_node_list_shows_tunnel_key_and_peer_handshakes(lab: Lab):
    n1 = await node_info(lab, "n1")
    assert n1.node.tunnel_ip and n1.node.wg_public_key
    for vm in ("m2", "m3"):  # traffic to every peer, so each has a handshake to report
        assert await lab.ping("m1", lab.vms[vm].ip, timeout=5), vm
    keys = await wg_show(lab, "n1", "latest-handshakes")

    async def reported():
        h = (await node_info(lab, "n1")).health
        return (
            h is not None
            and {p.public_key for p in h.peers} == set(keys)
            and all(p.latest_handshake > 0 for p in h.peers)
        )

    await eventually(reported, what="health reports every peer with a handshake")
    assert (await node_info(lab, "n1")).health.wireguard_backend == "userspace"


@pytest.mark.usefixtures("ov")
async def test_adding_a_node_leaves_unaffected_peers_alone(lab: Lab):
    n2_key = (await node_info(lab, "n2")).node.wg_public_key
    assert await lab.ping("m1", lab.vms["m2"].ip)
    before = (await wg_show(lab, "n1", "latest-handshakes"))[n2_key]
    assert before != "0"
    # handshake times have one-second resolution: once the clock is past that second, a new
    # handshake with n2 would show as a different value (usually no wait at all)
    await eventually(lambda: asyncio.sleep(0, time.time() >= int(before) + 1), what="next second")
    await lab.add_node("n4")
    await lab.vm_add("m4", "ov", "n4")
    await lab.wait_converged()
    # the first packet to a new node may wait for WireGuard's handshake retry (warm_up)
    await warm_up(lab, ["m4", "m1"])
    n4_key = (await node_info(lab, "n4")).node.wg_public_key
    after = await wg_show(lab, "n1", "latest-handshakes")
    assert n4_key in after and after[n4_key] != "0"  # the new peer did handshake
    assert after[n2_key] == before  # the unaffected peer was not re-handshaked
    assert await lab.ping("m1", lab.vms["m2"].ip)


def log_since(lab: Lab, node: str, offset: int = 0) -> str:
    path = lab.state_dir / f"agent-{node}.log"
    return path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""


@pytest.mark.usefixtures("ov")
async def test_a_node_joining_and_leaving_is_applied_by_the_change_path(lab: Lab):
    """The agents already running take a node's arrival and departure as one peer gained and
    one lost (issue 10 item 5): checked and planned by the change path (their logs say so, with
    the peers touched), WireGuard setting just that peer; the data path works both ways across
    the new peer, and without it afterwards."""
    stay = ("n1", "n2")
    offsets = {n: len(log_since(lab, n)) for n in stay}

    async def logged(what: str, event: str) -> None:
        async def seen():
            return all(what in log_since(lab, n, offsets[n]) for n in stay)

        try:
            await eventually(seen, what=f"{event} applied by the change path on n1 and n2")
        except AssertionError as e:
            logs = "\n".join(f"--- {n}\n" + log_since(lab, n, offsets[n])[-4000:] for n in stay)
            raise AssertionError(f"{e}\n{logs}") from None

    await lab.add_node("n5")
    try:
        key = (await node_info(lab, "n5")).node.wg_public_key
        for node in stay:
            await eventually(
                lambda node=node: _has_peer(lab, node, key), what=f"{node} has n5 as a peer"
            )
        await logged("checked and planned by the change path (mesh: peers +1 -0", "the join")
        await lab.vm_add("m5", "ov", "n5")
        await lab.wait_converged()
        await warm_up(lab, ["m5", "m1"])
        for a, b in (("m5", "m1"), ("m1", "m5"), ("m2", "m5")):
            assert await lab.ping(a, lab.vms[b].ip, timeout=5), (a, b)
        await lab.vm_rm("m5")
        # a heartbeat that wrote (m5's FDB entries deleted) is followed by a full one; the
        # change path plans against the kernel as the last full one read it: let that pass
        await lab.wait_converged()
        await asyncio.sleep(3 * 0.5)
        await lab.revoke_node("n5")  # or its running agent would register again
        offsets = {n: len(log_since(lab, n)) for n in stay}
        await (await lab.connect()).node_remove("n5", force=True)
        await logged("checked and planned by the change path (mesh: peers +0 -1", "the leave")
        for node in stay:
            assert key not in await wg_show(lab, node, "endpoints")
        assert await lab.ping("m1", lab.vms["m2"].ip, timeout=5)
        assert await lab.ping("m2", lab.vms["m1"].ip, timeout=5)
    finally:
        if "m5" in lab.vms:
            await lab.vm_rm("m5")
        await lab.remove_node("n5")
        with contextlib.suppress(ApiError):
            await (await lab.connect()).node_remove("n5", force=True)


async def _has_peer(lab: Lab, node: str, key: str | None) -> bool:
    return key is not None and key in await wg_show(lab, node, "endpoints")


@pytest.mark.usefixtures("ov")
async def test_key_rotation_keeps_the_mesh_working(lab: Lab):
    before = (await node_info(lab, "n2")).node
    old_key = before.wg_public_key
    await lab.stop_agent("n2")
    await lab.start_agent("n2", "--rotate-key")

    # a new key for a registered node is a takeover until an admin allows it: the agent says why
    async def refused():
        health = (await node_info(lab, "n2")).health
        return health is not None and (health.last_error or "").startswith("registration refused")

    await eventually(refused, what="n2's health reports its refused registration")
    assert (await node_info(lab, "n2")).node.wg_public_key == old_key
    await (await lab.connect()).node_rekey("n2")

    async def rotated():
        key = (await node_info(lab, "n2")).node.wg_public_key
        return key if key != old_key else None

    new_key = await eventually(rotated, what="n2 registered a new key")
    await fresh_convergence(lab, "n1", "n2", "n3")
    peers = await wg_show(lab, "n1", "endpoints")
    assert new_key in peers and old_key not in peers
    assert (await node_info(lab, "n2")).node.tunnel_ip == before.tunnel_ip  # stable for life
    for src in ("m1", "m3"):
        assert await lab.ping(src, lab.vms["m2"].ip, count=2, timeout=5), src


@pytest.mark.usefixtures("ov")
async def test_a_removed_node_whose_agent_runs_registers_again(lab: Lab):
    """Removing a node that still runs its agent (and keeps its bus identity) is undone by the
    agent within a few heartbeats: it notices the silence and registers again by itself."""
    node = "n9"
    await lab.add_node(node)
    try:
        await (await lab.connect()).node_remove(node)

        async def back():
            return node in {n.node.name for n in await (await lab.connect()).node_list()}

        await eventually(back, timeout=15, what=f"{node} registered again by itself")
        await lab.wait_converged(nodes={node})
    finally:
        await lab.remove_node(node)
        await (await lab.connect()).node_remove(node)


@pytest.mark.usefixtures("ov")
async def test_removed_node_leaves_every_peer_set_and_fdb(lab: Lab):
    gone = await node_info(lab, "n3")
    stay = [n.node.name for n in await (await lab.connect()).node_list() if n.node.name != "n3"]
    # revoked first, or its running agent would register again (see the test above)
    await lab.revoke_node("n3")
    await (await lab.connect()).node_remove("n3", force=True)
    await fresh_convergence(lab, *stay)
    for node in stay:
        assert gone.node.wg_public_key not in await wg_show(lab, node, "endpoints")
        fdb = await lab.exec_node(node, "bridge", "fdb", "show", "dev", "otvx1000")
        assert gone.node.tunnel_ip not in fdb
    assert await lab.ping("m1", lab.vms["m2"].ip, timeout=5)
    # what the node had stays in its kernel: nothing tears it down behind the operator's back
    assert "otwg0" in await links(lab, "n3")
