"""A lab with the fault proxy (lab.natsfault) on its bus: the controller and both agents reach
nats-server through it and converge; dropping every frame on one node's desired-state subject
leaves that node behind while the other keeps converging, and clearing the rule lets it catch up.
The test's own client goes straight to nats-server, so its view is never faulted."""

import pytest

from lab.cluster import Lab
from schemas import naming
from tests.e2e.helpers import ensure_network, eventually, lab_fixture

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

lab = lab_fixture(nodes=2, mesh=False, heartbeat=0.5, faults=True)


async def nodes(lab: Lab) -> dict:
    return {n.node.name: n for n in (await (await lab.connect()).status()).nodes}


async def test_one_node_behind_while_its_desired_state_is_dropped(lab: Lab):
    proxy = lab.faults
    assert proxy is not None and {"controller", "n1", "n2"} <= set(proxy.stats()["connections"])
    events = []
    proxy.observe(events.append)
    desired_n1 = naming.desired_subject("n1")

    async def delivered_to_n1():  # the heartbeat reaches n1 through the proxy
        return [
            e for e in events if (e.identity, e.op[-3:], e.subject) == ("n1", "MSG", desired_n1)
        ]

    await eventually(delivered_to_n1, timeout=10, what="a snapshot delivered to n1 via the proxy")

    rule = proxy.add_rule("drop", desired_n1)
    api = await lab.connect()
    await ensure_network(lab, "lan", "bridge", "10.90.0.0/24")
    await api.nic_attach("lan", "n1", "f1")
    await api.nic_attach("lan", "n2", "f2")

    async def n2_converged_n1_behind():
        state = await nodes(lab)
        n1, n2 = state["n1"], state["n2"]
        return n2.converged and n1.applied_version < n1.desired_version and not n1.converged

    await eventually(n2_converged_n1_behind, timeout=20, what="n2 converged, n1 behind")
    dropped_before = rule.dropped
    await eventually(lambda: _true(rule.dropped >= dropped_before + 4), timeout=10,
                     what="four more heartbeats dropped")  # fmt: skip
    state = await nodes(lab)
    assert not state["n1"].converged and state["n2"].converged  # still behind, heartbeats later
    # the observer saw what the controller published, dropped
    assert any(e.identity == "controller" and e.subject == desired_n1 and e.fate == "dropped"
               for e in events)  # fmt: skip

    proxy.clear()
    await lab.wait_converged(timeout=20)


async def _true(value: bool) -> bool:
    return value
