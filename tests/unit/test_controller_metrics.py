"""controller.metrics' pure parts: nodes by state, readiness reasons, what counts as a change, and
the refusals tally exposed as a counter."""

from prometheus_client import generate_latest

from controller.metrics import ControllerMetrics, node_states, readiness, version_max
from schemas.api import Empty, NetworkInfo, NodeStatus
from schemas.intent import Network, NetworkType, Node, NodeVersion


def status(desired: int, applied: int, converged: bool = False, stale: bool = False) -> NodeStatus:
    return NodeStatus(
        node=Node(name="n"), desired_version=desired, applied_version=applied,
        converged=converged, stale=stale,
    )  # fmt: skip


def test_node_states():
    assert node_states([]) == {"registered": 0, "converged": 0, "stale": 0, "pending": 0}
    statuses = [status(3, 3, converged=True), status(4, 2), status(5, 5, stale=True), status(1, 0)]
    assert node_states(statuses) == {"registered": 4, "converged": 1, "stale": 1, "pending": 2}
    assert version_max([]) == 0
    versions = [NodeVersion(node=n, version=v, digest="") for n, v in (("a", 7), ("b", 3))]
    assert version_max(versions) == 7


def test_readiness_says_what_is_missing():
    fine = dict(connected=True, leading=True, heartbeat_age=0.1, stale_after=10.0,
                following=False, follow_behind=None)  # fmt: skip
    assert readiness(**fine) is None
    assert readiness(**fine | {"connected": False}) == "not connected to NATS"
    assert "no heartbeat published yet" in readiness(**fine | {"heartbeat_age": None})
    assert "for 12.0s" in readiness(**fine | {"heartbeat_age": 12.0})
    follower = fine | {"leading": False, "following": True, "follow_behind": 0}
    assert readiness(**follower) is None
    assert "3 entries behind" in readiness(**follower | {"follow_behind": 3})
    assert "not known yet" in readiness(**follower | {"follow_behind": None})
    assert "neither leading nor following" in readiness(**follower | {"following": False})


def test_changes_count_writes_that_changed_something_and_refusals_come_from_the_tally():
    metrics = ControllerMetrics()
    net = Network(name="br", type=NetworkType.BRIDGE, subnet="10.0.0.0/24", gateway="10.0.0.1")
    created = NetworkInfo(network=net, mtu=1500, nics=0, bridge="otb1")
    metrics.answered("network.create", created, b"x")
    metrics.answered("network.create", NetworkInfo(network=net, mtu=1500, nics=0, bridge="otb1",
                                                   existed=True), b"x")  # fmt: skip
    metrics.answered("network.list", Empty(), b"x")
    metrics.answered("section.get", Empty(), b"12345")
    metrics.refused["malformed"] += 2
    metrics.failed("nic.detach", 404)
    text = generate_latest(metrics.registry).decode()
    assert 'otherix_controller_changes_total{endpoint="network.create"} 1.0' in text
    assert "network.list" not in text
    assert 'otherix_controller_bus_published_bytes_total{kind="section"} 5.0' in text
    assert 'otherix_controller_refusals_total{reason="malformed"} 2.0' in text
    assert 'otherix_controller_api_errors_total{code="404",endpoint="nic.detach"} 1.0' in text
    assert 'otherix_controller_nodes{state="pending"} 0.0' in text  # every state, from the start
