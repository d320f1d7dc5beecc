"""The links plan of an FDB change (``agent.links.plan.plan_fdb_change``) and the kernel state
known from its echoes (``advance``), each held to what it stands in for: the whole plan, and
the fake kernel after the writes, over random sequences of valid deltas."""

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.assemble import Assembler
from agent.links.model import AddFdb, AddPortFdb, DelFdb, DelPortFdb, Observed
from agent.links.plan import advance, plan, plan_fdb_change
from tests.unit.fake_kernel import FakeKernel
from tests.unit.test_fdb_change import BASE, DELTA, VXLAN, next_head, passes, start

ADDS = (AddFdb, AddPortFdb)


def norm(observed: Observed) -> Observed:
    """Without empty entry sets: a device with none and a device not listed plan the same."""
    return msgspec.structs.replace(
        observed,
        **{
            field: {k: v for k, v in getattr(observed, field).items() if v}
            for field in ("fdb", "learned", "port_fdb", "port_learned")
        },
    )


def ordered(actions) -> bool:
    """Adds before deletes: no window without forwarding."""
    kinds = [isinstance(a, ADDS) for a in actions]
    return kinds == sorted(kinds, reverse=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DELTA, min_size=1, max_size=8))
def test_the_plan_of_a_change_is_the_whole_plan(deltas):
    head, vni = start()
    assembler = Assembler(BASE.node)
    for section in head.sections:
        assembler.offer(section)
    snap = assembler.snapshot(head)
    kernel = FakeKernel()
    kernel.apply(plan(snap, kernel.observe_now()))
    observed = kernel.observe_now()
    assert plan(snap, observed) == []
    assembler.mark()
    for upserts, removals in deltas:
        delta = vni.change(upserts, removals)
        head = next_head(head, vni, delta)
        assembler.offer(delta)
        new = assembler.snapshot(head)
        if not passes(new):
            continue  # a refused change is never planned; the next delta builds on it
        change = assembler.change()
        assert change is not None
        fast = plan_fdb_change(new, observed, change)
        whole = plan(new, observed)
        assert fast is not None
        assert sorted(map(msgspec.json.encode, fast)) == sorted(map(msgspec.json.encode, whole))
        assert ordered(fast) and all(
            isinstance(a, AddFdb | DelFdb | AddPortFdb | DelPortFdb) for a in fast
        )
        kernel.apply(fast)
        known = advance(observed, fast)
        assert norm(known) == norm(kernel.observe_now())  # the echoes tell the state exactly
        assert plan(new, known) == []
        observed = known
        assembler.mark()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "del"]),
            st.sampled_from(["00:00:00:00:00:00", "02:00:00:00:10:01", "02:00:00:00:10:02"]),
            st.sampled_from(["100.64.0.2", "100.64.0.3", "100.64.0.4"]),
        ),
        max_size=12,
    ),
    st.integers(1, 3),
)
def test_advance_is_the_kernel_after_the_writes(writes, batches):
    """Any FDB writes on a VXLAN, in one or several heartbeats (each carrying its index on):
    ``advance`` gives what the kernel (the fake, which models replace and append) holds."""
    kernel = FakeKernel()
    kernel.apply(plan(BASE, kernel.observe_now()))
    observed = kernel.observe_now()
    actions = [
        AddFdb(device=VXLAN.name, mac=mac, dst=dst)
        if op == "add"
        else DelFdb(device=VXLAN.name, mac=mac, dst=dst)
        for op, mac, dst in writes
    ]
    size = -(-len(actions) // batches) or 1
    for i in range(0, len(actions), size):
        batch = actions[i : i + size]
        kernel.apply(batch)
        observed = advance(observed, batch)
        assert norm(observed) == norm(kernel.observe_now())
