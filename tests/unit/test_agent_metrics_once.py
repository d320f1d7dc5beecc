"""agent.metrics counts each HEAD once: the runner's worker counts an apply that crashed as
failed, and a crash after the HEAD was already counted (the applied state's save, the
announcer) must not count it a second time."""

from types import SimpleNamespace

from agent.metrics import OUTCOMES, AgentMetrics


def heads(m: AgentMetrics) -> dict[str, float]:
    return {o: m.heads.labels(o)._value.get() for o in OUTCOMES}


def test_a_crash_after_the_head_was_counted_does_not_count_it_again():
    m = AgentMetrics()
    m.head_started()
    m.reconciled(SimpleNamespace(version=2, digest="b"), SimpleNamespace(version=1, digest="a"), 3, [])  # fmt: skip
    m.head_done("failed")  # agent.runner._worker: the HEAD's handling raised after that
    assert heads(m) == {**dict.fromkeys(OUTCOMES, 0.0), "applied": 1.0}
    assert m.apply_duration._sum.get() > 0 and m.applies == 1


def test_a_crash_before_it_was_counted_counts_as_failed():
    m = AgentMetrics()
    m.head_started()
    m.head_done("failed")
    m.head_started()
    m.reconciled(SimpleNamespace(version=1, digest="a"), SimpleNamespace(version=1, digest="a"), 0, [])  # fmt: skip
    assert heads(m) == {**dict.fromkeys(OUTCOMES, 0.0), "failed": 1.0, "unchanged": 1.0}
