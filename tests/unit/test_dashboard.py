"""deploy/grafana-otherix.json against the registries that make the metrics: every query names
only metrics the controller or the agent defines, every metric has a panel, and the panels take
their data source from the ``${DS_PROMETHEUS}`` variable (importable into any Grafana)."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.metrics import AgentMetrics
from controller.metrics import ControllerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-otherix.json"
METRIC = re.compile(r"\botherix_[a-z0-9_]+")
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
# the names the README, the compose files and this dashboard agree on (fixed for issue 11)
CONTROLLER = {
    "otherix_controller_heartbeat_duration_seconds",
    "otherix_controller_heartbeat_overruns",
    "otherix_controller_nodes",
    "otherix_controller_changes",
    "otherix_controller_refusals",
    "otherix_controller_api_errors",
    "otherix_controller_api_request_duration_seconds",
    "otherix_controller_bus_published_bytes",
    "otherix_controller_bus_published_messages",
    "otherix_controller_leader",
    "otherix_controller_desired_version_max",
}
AGENT = {
    "otherix_agent_apply_duration_seconds",
    "otherix_agent_heads",
    "otherix_agent_changes_applied",
    "otherix_agent_refusals",
    "otherix_agent_netlink_writes",
    "otherix_agent_nft_rules",
    "otherix_agent_wireguard_peers",
    "otherix_agent_wireguard_handshake_age_seconds",
    "otherix_agent_wireguard_handshake_age_max_seconds",
    "otherix_agent_wireguard_peers_without_handshake",
    "otherix_agent_applied_version",
    "otherix_agent_bus_published_bytes",
    "otherix_agent_connected",
}


def families(registry: CollectorRegistry) -> dict[str, str]:
    """Metric family name → type, as the registry exposes them."""
    return {f.name: f.type for f in registry.collect()}


def series_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every name a query may use (``_total``, ``_bucket`` … included) → its family."""
    return {
        name + suffix: name
        for name, kind in families(registry).items()
        for suffix in SUFFIXES[kind]
    }


def panels(items: list[dict]) -> Iterator[dict]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def test_the_registries_define_the_fixed_names():
    assert set(families(ControllerMetrics().registry)) == CONTROLLER
    assert set(families(AgentMetrics().registry)) == AGENT


def test_every_query_names_defined_metrics_and_every_metric_has_a_panel(dashboard):
    defined = series_names(ControllerMetrics().registry) | series_names(AgentMetrics().registry)
    used = set()
    for expr in exprs(dashboard):
        names = METRIC.findall(expr)
        assert names, f"no Otherix metric in {expr!r}"
        unknown = [n for n in names if n not in defined]
        assert not unknown, f"{expr!r} names metrics nobody defines: {unknown}"
        if any(n.endswith("_bucket") for n in names):
            assert expr.startswith("histogram_quantile("), expr
        used |= {defined[n] for n in names}
    assert used == CONTROLLER | AGENT, f"no panel for {sorted(CONTROLLER | AGENT - used)}"


def test_the_data_source_is_a_variable_and_the_layout_is_sound(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == source, panel["title"]
            assert all(t["datasource"] == source for t in panel["targets"]), panel["title"]
    required = ("Heartbeat duration", "Nodes by state", "Leader per instance", "Agents connected")
    titles = {p["title"] for p in panels(dashboard["panels"])}
    assert set(required) <= titles
