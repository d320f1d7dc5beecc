"""The bus back-off schedule and what the reconnect policy does with nats-py's callbacks."""

import asyncio
import logging
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats import errors as nats_errors

from schemas.bus import Reconnect, backoff, cancel_and_wait


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half():
    assert [backoff(a, 0.25, 5.0, rand=lambda: 1.0) for a in range(7)] == [
        0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0,
    ]  # fmt: skip
    assert [backoff(a, 0.25, 5.0, rand=lambda: 0.0) for a in range(3)] == [0.125, 0.25, 0.5]


@given(st.integers(min_value=-5, max_value=10**6), st.floats(min_value=0, max_value=1))
def test_backoff_is_bounded_for_any_attempt(attempt, r):
    delay = backoff(attempt, 0.25, 5.0, rand=lambda: r)
    assert 0.125 <= delay <= 5.0


def test_jitter_spreads_clients_that_failed_together():
    import random

    rng = random.Random(7)
    delays = {round(backoff(4, rand=rng.random), 3) for _ in range(50)}
    assert len(delays) > 40 and min(delays) >= 2.0 and max(delays) <= 4.0


def test_reconnect_handler_waits_by_the_servers_failed_tries():
    policy = Reconnect("t", rand=lambda: 1.0)
    server = SimpleNamespace(reconnects=3, uri=SimpleNamespace(netloc="127.0.0.1:4222"))
    assert policy.next_server([server], {}) == (server, 2.0)
    kwargs = policy.kwargs()
    assert kwargs["max_reconnect_attempts"] == -1 and kwargs["reconnect_time_wait"] == 0


@pytest.mark.asyncio
async def test_first_connect_failures_sleep_with_back_off_and_log_once(caplog, monkeypatch):
    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr("schemas.bus.asyncio.sleep", sleep)
    policy = Reconnect("agent n1", rand=lambda: 1.0)
    with caplog.at_level(logging.WARNING, logger="schemas.bus"):
        for _ in range(5):
            await policy.on_error(ConnectionRefusedError("refused"))
    assert slept == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert len(caplog.records) == 1 and "cannot reach the bus" in caplog.text
    policy.connected = True
    await policy.on_disconnected()
    await policy.on_error(ConnectionRefusedError("refused"))  # nats-py's loop waits: we do not
    assert len(slept) == 5
    await policy.on_reconnected()
    assert policy.failures == 0 and not policy.down


@pytest.mark.asyncio
async def test_slow_consumer_drops_are_counted_and_logged_once(caplog):
    policy = Reconnect("controller")
    policy.connected = True
    with caplog.at_level(logging.WARNING, logger="schemas.bus"):
        for _ in range(500):
            await policy.on_error(nats_errors.SlowConsumerError("otherix.v1.ack.n1", "", 1, None))
    assert policy.slow_consumer["otherix.v1.ack.n1"] == 500
    assert len(caplog.records) == 1


async def test_a_first_connect_that_hangs_after_a_failed_try_is_begun_anew(monkeypatch):
    """nats-py can hang for ever closing a half-made TLS transport after a failed first try:
    a connect whose tries stopped is cancelled and started again, and one that keeps trying
    (the server still down) is left to go on."""
    from schemas import bus as bus_module

    monkeypatch.setattr(bus_module, "STALLED_CONNECT", 0.2)
    calls, cancelled = [], []

    async def connect(servers, error_cb, **kw):
        calls.append(servers)
        if len(calls) == 1:  # fails once, then hangs as nats-py did
            await error_cb(OSError("connection reset"))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
        for _ in range(3):  # still trying, slowly: not stalled
            await asyncio.sleep(0.1)
            await error_cb(OSError("refused"))
        return "connected"

    bus = Reconnect("agent n1", base=0.001, cap=0.001)
    nc = await asyncio.wait_for(bus_module.connect_patiently(["nats://x"], bus, connect), 5)
    assert nc == "connected" and len(calls) == 2 and cancelled == [True]


async def test_cancel_and_wait_ends_a_loop_whose_first_cancel_was_swallowed():
    """Python 3.11's wait_for returns its inner result when a cancel lands as that result
    arrives (gh-86296); a renew loop around a nats-py request then ran on after stop()."""
    rounds = 0

    async def loop_that_swallows_one_cancel():
        nonlocal rounds
        swallowed = False
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # as wait_for does when its inner future just finished

    tasks = [asyncio.create_task(loop_that_swallows_one_cancel()) for _ in range(3)]
    tasks.append(asyncio.create_task(asyncio.sleep(0)))  # one that ends on its own
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await cancel_and_wait(tasks)
    assert all(task.done() for task in tasks) and rounds >= 3
