"""Agent metrics and probes over real HTTP: a real agent in its node's namespace, serving on that
namespace's loopback (``--metrics-address``), scraped from inside the namespace with curl.

/readyz answers 503 until a desired version is applied (here: the agent starts while no controller
runs); refused snapshots show up by reason; a NAT bridge network and an overlay move the apply
figures, netlink writes, the nft rule count, the applied version and, after an overlay ping, the
WireGuard handshake age of the other node.
"""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.cluster import Lab
from lab.netns import exec_in
from schemas import naming
from schemas.codec import encode
from schemas.desired import Snapshot
from tests.e2e.helpers import ensure_network, ensure_vms, eventually, lab_fixture, warm_up

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=2, mesh=True, heartbeat=0.5)
ADDRESS = "127.0.0.1:9464"  # n1's own loopback: each node namespace has its own


async def get(lab: Lab, path: str, node: str = "n1") -> tuple[int, str]:
    """(HTTP status, body) of ``path`` on ``node``'s agent; status 0 when nothing answers."""
    url = f"http://{ADDRESS}{path}"
    out = await exec_in(lab.node_netns(node), "curl", "-s", "-m", "5", "-w", "\n%{http_code}",
                        url, check=False)  # fmt: skip
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


async def scrape(lab: Lab) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (name, labels) → value."""
    status, text = await get(lab, "/metrics")
    assert status == 200, (status, text)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def at(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def applied_version(lab: Lab, node: str) -> int:
    nodes = await (await lab.connect()).node_list()
    return next(n.applied_version for n in nodes if n.node.name == node)


async def test_readyz_waits_for_an_apply_and_refusals_are_counted_by_reason(lab: Lab):
    await lab.stop_controller()  # the agent starts with no one to give it a desired version
    await lab.stop_agent("n1")
    await lab.start_agent("n1", "--metrics-address", ADDRESS)
    try:

        async def connected_not_applied():
            return await get(lab, "/readyz") == (503, "no desired version applied yet\n")

        await eventually(connected_not_applied, timeout=20, what="/readyz: connected, not applied")
        assert await get(lab, "/healthz") == (200, "ok\n")
        before = await scrape(lab)
        assert at(before, "otherix_agent_connected") == 1
        assert at(before, "otherix_agent_apply_duration_seconds_count") == 0
        held = at(before, "otherix_agent_applied_version")
        assert held and held > 0  # loaded from its state directory, as before the restart

        # only the controller's identity may publish desired state: this plays one gone wrong;
        # one at a time, as the agent keeps only the newest HEAD it has not started on
        forger = await lab.nats_client("controller")
        stale = encode(Snapshot(node="n1", version=int(held) - 1))
        malformed = b'{"node": "n1", "version": "x"}'
        try:
            for count, (reason, data) in enumerate((("stale", stale), ("malformed", malformed)), 1):
                await forger.publish(naming.desired_subject("n1"), data)

                async def counted(reason=reason, count=count):
                    s = await scrape(lab)
                    refusals = at(s, "otherix_agent_refusals_total", reason=reason)
                    heads = at(s, "otherix_agent_heads_total", outcome="refused")
                    return (refusals, heads) == (1, count) and s

                after = await eventually(counted, what=f"a {reason} refusal counted")
        finally:
            await forger.close()
        assert at(after, "otherix_agent_apply_duration_seconds_count") == 2
        assert at(after, "otherix_agent_bus_published_bytes_total", kind="ack") > 0
        assert (await get(lab, "/readyz"))[0] == 503  # a refusal is not an apply
    finally:
        await lab.start_controller()
    await lab.wait_converged()

    async def ready():
        return await get(lab, "/readyz") == (200, "ok\n")

    await eventually(ready, what="/readyz 200 after the first apply")
    samples = await scrape(lab)
    assert at(samples, "otherix_agent_applied_version") == await applied_version(lab, "n1")


async def test_figures_move_with_a_nat_network_and_an_overlay(lab: Lab):
    if (await get(lab, "/healthz"))[0] != 200:  # run alone: the test above did not restart it
        await lab.stop_agent("n1")
        await lab.start_agent("n1", "--metrics-address", ADDRESS)
    await eventually(lambda: get_ready(lab), timeout=20, what="n1's agent serving and ready")
    before = await scrape(lab)
    api = await lab.connect()
    await ensure_network(lab, "nat", "bridge", "10.93.0.0/24", "nat")
    await api.nic_attach("nat", "n1", "mb1")
    await ensure_network(lab, "ov", "overlay", "10.94.0.0/24")
    await ensure_vms(lab, "ov", {"m1": "n1", "m2": "n2"})  # waits for every node's ack
    version = await applied_version(lab, "n1")

    async def caught_up():
        s = await scrape(lab)
        return at(s, "otherix_agent_applied_version") == version and s

    after = await eventually(caught_up, what="the gauge at the acked version")

    def grew(name: str, **labels: str) -> bool:
        return (at(after, name, **labels) or 0) > (at(before, name, **labels) or 0)

    assert grew("otherix_agent_heads_total", outcome="applied")
    assert grew("otherix_agent_changes_applied_total")
    assert grew("otherix_agent_netlink_writes_total")
    assert grew("otherix_agent_apply_duration_seconds_count")
    assert grew("otherix_agent_bus_published_bytes_total", kind="ack")
    assert at(after, "otherix_agent_bus_published_bytes_total", kind="request") > 0  # registered
    assert at(after, "otherix_agent_nft_rules") > 0  # the NAT network's masquerade and guards
    assert at(after, "otherix_agent_connected") == 1

    await warm_up(lab, ["m1", "m2"])
    assert await lab.ping("m1", lab.vms["m2"].ip, timeout=5)

    async def handshake():
        s = await scrape(lab)
        age = at(s, "otherix_agent_wireguard_handshake_age_seconds", peer="n2")
        return age is not None and (at(s, "otherix_agent_wireguard_peers"), age)

    peers, age = await eventually(handshake, what="a handshake age for peer n2")
    assert peers == 1 and 0 <= age < 60
    print(f"\nn1 after the change: {summary(before, after)}; handshake with n2 {age:.1f}s ago")


async def get_ready(lab: Lab) -> bool:
    return (await get(lab, "/readyz"))[0] == 200


def summary(before: dict, after: dict) -> str:
    names = ("changes_applied_total", "netlink_writes_total")
    moved = {
        n: (at(after, f"otherix_agent_{n}") or 0) - (at(before, f"otherix_agent_{n}") or 0)
        for n in names
    }
    applied = at(after, "otherix_agent_heads_total", outcome="applied") - at(
        before, "otherix_agent_heads_total", outcome="applied"
    )
    return f"+{applied:g} applied HEADs, " + ", ".join(f"+{v:g} {n}" for n, v in moved.items())
