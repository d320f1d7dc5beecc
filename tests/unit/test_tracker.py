from controller.tracker import Tracker
from schemas.intent import Node
from schemas.messages import Ack

NODE = Node(name="n1")


def test_converged_needs_an_ok_ack_of_the_desired_version():
    t = Tracker()
    assert not t.status(NODE, 3, now=0, stale_after=10).converged
    t.record_ack(Ack(node="n1", version=3, applied_version=3), now=100)
    assert t.status(NODE, 3, now=101, stale_after=10).converged
    assert not t.status(NODE, 4, now=101, stale_after=10).converged


def test_error_ack_blocks_convergence_until_an_ok_one():
    t = Tracker()
    t.record_ack(Ack(node="n1", version=3, applied_version=3), now=100)
    t.record_ack(Ack(node="n1", version=4, applied_version=3, ok=False, error="boom"), now=101)
    st = t.status(NODE, 3, now=101, stale_after=10)
    assert st.last_error == "boom" and not st.converged
    t.record_ack(Ack(node="n1", version=4, applied_version=4), now=102)
    assert t.status(NODE, 4, now=102, stale_after=10).converged


def test_silent_node_goes_stale_and_is_not_converged():
    t = Tracker()
    t.record_ack(Ack(node="n1", version=3, applied_version=3), now=100)
    fresh = t.status(NODE, 3, now=109, stale_after=10)
    stale = t.status(NODE, 3, now=111, stale_after=10)
    assert fresh.converged and not fresh.stale
    assert stale.stale and not stale.converged and stale.applied_version == 3
