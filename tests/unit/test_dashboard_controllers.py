"""deploy/grafana-otherix.json with several controllers: every controller ingests and refuses
the same agent report, so the refusals panel counts the leader's figures only."""

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-otherix.json"


def test_report_refusals_are_not_summed_over_controllers():
    text = json.loads(DASHBOARD.read_text())
    queries = [
        t["expr"]
        for p in text["panels"]
        for t in p.get("targets", [])
        if "otherix_controller_refusals_total" in t["expr"]
    ]
    assert queries
    for query in queries:
        assert "and on (instance) (otherix_controller_leader == 1)" in query, query
