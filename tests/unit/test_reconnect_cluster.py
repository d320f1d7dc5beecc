"""Losing one server of a cluster, a client's reconnect policy picks a survivor: never the
server it just lost while another has failed no more often, and the least-failed ones first."""

from types import SimpleNamespace

from schemas.bus import Reconnect


def _servers(*reconnects: int) -> list:
    return [
        SimpleNamespace(reconnects=n, uri=SimpleNamespace(netloc=f"127.0.0.1:{4222 + i}"))
        for i, n in enumerate(reconnects)
    ]


def test_the_server_just_lost_is_not_tried_first():
    for r in (0.0, 0.4, 0.99):
        policy = Reconnect("t", rand=lambda r=r: r)
        policy.connected_to(SimpleNamespace(connected_url=SimpleNamespace(netloc="127.0.0.1:4222")))
        chosen, _ = policy.next_server(_servers(0, 0, 0), {})
        assert chosen.uri.netloc != "127.0.0.1:4222"


def test_a_server_that_failed_is_left_for_the_others_then_retried():
    policy = Reconnect("t", rand=lambda: 0.0)
    policy.server = "127.0.0.1:4223"
    chosen, _ = policy.next_server(_servers(1, 1, 0), {})
    assert chosen.uri.netloc == "127.0.0.1:4224"
    chosen, delay = policy.next_server(_servers(1, 1, 1), {})  # every one failed once
    assert chosen.uri.netloc != "127.0.0.1:4224" and 0.25 <= delay <= 0.5


def test_one_server_is_retried_alone():
    policy = Reconnect("t", rand=lambda: 0.5)
    policy.server = "127.0.0.1:4222"
    (only,) = _servers(2)
    assert policy.next_server([only], {})[0] is only
