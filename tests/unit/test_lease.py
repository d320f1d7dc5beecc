"""The lease's pure decisions: when a follower takes over, and when a leader may still act."""

from controller.lease import Action, Seen, Timing, follow, holds

T = Timing(heartbeat=1.0)


def test_no_lease_is_taken_at_once():
    action, _ = follow(5.0, None, 0, "", T)
    assert action is Action.ACQUIRE


def test_a_renewed_lease_is_never_taken():
    seen = None
    for step in range(20):  # the holder renews every heartbeat: the revision moves on
        now = step * T.heartbeat
        action, seen = follow(now, seen, revision=10 + step, holder="c1", timing=T)
        assert action is Action.WAIT and seen.since == now


def test_a_standing_revision_expires_after_expire_seconds_of_our_own_clock():
    action, seen = follow(100.0, None, 7, "c1", T)  # first sight: the clock starts now
    assert action is Action.WAIT and seen == Seen(7, "c1", 100.0)
    assert follow(100.0 + T.expire - 0.01, seen, 7, "c1", T)[0] is Action.WAIT
    assert follow(100.0 + T.expire, seen, 7, "c1", T)[0] is Action.ACQUIRE


def test_a_follower_that_just_started_waits_a_full_expiry_whatever_the_entry_age():
    # no wall clock from the entry: a lease left by a crashed leader long ago still costs one
    # expiry from the moment we first see it
    action, seen = follow(0.0, None, 3, "gone", T)
    assert action is Action.WAIT
    assert follow(T.expire / 2, seen, 3, "gone", T)[0] is Action.WAIT


def test_the_leader_stops_acting_before_any_follower_may_take_over():
    assert T.renew < T.hold < T.expire
    renewed = 50.0  # sent the renewal at 50; a follower saw it at 50 at the earliest
    assert holds(renewed + T.hold - 0.01, renewed, T)
    assert not holds(renewed + T.hold, renewed, T)
    _, seen = follow(renewed, None, 9, "c1", T)
    assert follow(renewed + T.hold, seen, 9, "c1", T)[0] is Action.WAIT
    assert not holds(renewed, None, T)  # never acquired or lost: never acts


def test_takeover_fits_three_heartbeats():
    # worst case after the leader dies right after a renewal: expire plus one poll
    assert T.expire + T.poll < 3 * T.heartbeat
