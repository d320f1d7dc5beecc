"""controller.tracker: converged means the agent applied exactly the desired content (digest),
without error, and its health is fresh."""

from controller.tracker import Tracker
from schemas.intent import Node, NodeVersion
from schemas.messages import Ack, Health

NODE = Node(name="n1")


def desired(version: int, digest: str = "d") -> NodeVersion:
    return NodeVersion(node="n1", version=version, digest=f"{digest}{version}")


def ack(version: int, digest: str = "d", **kw) -> Ack:
    return Ack(
        node="n1", version=version, applied_version=version, digest=f"{digest}{version}", **kw
    )


def health(applied: int = 0, **kw) -> Health:
    return Health(node="n1", applied_version=applied, ok=True, started_at=0, sent_at=0, **kw)


def test_converged_needs_an_ok_ack_of_the_desired_content_and_fresh_health():
    t = Tracker()
    assert not t.status(NODE, desired(3), now=0, stale_after=10).converged
    t.record_ack(ack(3), now=100)
    assert not t.status(NODE, desired(3), now=101, stale_after=10).converged  # no health yet
    t.record_health(health(3), now=100)
    assert t.status(NODE, desired(3), now=101, stale_after=10).converged
    assert not t.status(NODE, desired(4), now=101, stale_after=10).converged


def test_an_ack_with_another_digest_is_not_converged():
    """A forged or confused ack naming the right version but other content proves nothing."""
    t = Tracker()
    t.record_health(health(3), now=100)
    t.record_ack(ack(3, digest="forged"), now=100)
    assert not t.status(NODE, desired(3), now=101, stale_after=10).converged
    t.record_ack(ack(3), now=101)
    assert t.status(NODE, desired(3), now=101, stale_after=10).converged


def test_error_ack_blocks_convergence_until_an_ok_one():
    t = Tracker()
    t.record_health(health(3), now=100)
    t.record_ack(ack(3), now=100)
    t.record_ack(Ack(node="n1", version=4, applied_version=3, ok=False, error="boom"), now=101)
    st = t.status(NODE, desired(3), now=101, stale_after=10)
    assert st.last_error == "boom" and not st.converged
    t.record_ack(ack(4), now=102)
    assert t.status(NODE, desired(4), now=102, stale_after=10).converged


def test_silent_node_goes_stale_and_is_not_converged():
    t = Tracker()
    t.record_health(health(3), now=100)
    t.record_ack(ack(3), now=100)
    fresh = t.status(NODE, desired(3), now=109, stale_after=10)
    stale = t.status(NODE, desired(3), now=111, stale_after=10)
    assert fresh.converged and not fresh.stale
    assert stale.stale and not stale.converged and stale.applied_version == 3


def test_acks_without_health_do_not_keep_a_node_converged():
    """A stopped agent whose acks are replayed: health goes stale, so no convergence."""
    t = Tracker()
    t.record_health(health(3), now=100)
    for now in range(100, 130):
        t.record_ack(ack(3), now=now)
    st = t.status(NODE, desired(3), now=130, stale_after=10)
    assert not st.stale and not st.converged


def test_taps_without_carrier_are_listed():
    t = Tracker()
    t.record_health(health(3, taps={"ot000000000001": True, "ot000000000002": False}), now=100)
    assert t.status(NODE, desired(3), now=101, stale_after=10).no_carrier == ("ot000000000002",)
    assert t.status(NODE, desired(3), now=200, stale_after=10).no_carrier == ()  # stale: unknown


def test_an_agent_with_another_key_than_the_registered_one_is_not_converged():
    """An agent that lost its state comes back with a new WireGuard key, which registration
    refuses: whatever it acks, its peers trust the old key, and status must say so."""
    key, other = "A" * 43 + "=", "B" * 43 + "="
    node = Node(name="n1", wg_public_key=key)
    t = Tracker()
    t.record_ack(ack(3), now=100)
    t.record_health(health(3, wg_public_key=key), now=100)
    assert t.status(node, desired(3), now=101, stale_after=10).converged
    t.record_health(health(3, wg_public_key=other), now=100)
    status = t.status(node, desired(3), now=101, stale_after=10)
    assert not status.converged
    assert "is not the registered one" in status.last_error and "node rekey n1" in status.last_error
