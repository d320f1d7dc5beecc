"""A flood of duplicated agent reports against a real nats-server (issue 9): the controller keeps
answering the API, its report queues have explicit bounds, memory does not grow, and a flood past
a bound is dropped and counted (schemas.bus.Reconnect, as the controller process counts it)
rather than queued. The bound is lowered on the live subscriptions for that test: 65,536 messages
would take far longer to flood than a test may.
"""

import asyncio
import time
import tracemalloc

import pytest

from client.api import ApiClient
from schemas import naming
from schemas.bus import Reconnect
from schemas.codec import encode
from schemas.messages import Ack, Health
from tests.integration.test_heartbeat import wait_status
from tests.integration.test_untrusted_reports import genuine_ack

pytestmark = pytest.mark.timeout(60)

FLOOD = 5000  # copies of each report


@pytest.fixture
def api(controller, nc):
    return ApiClient(nc)


async def test_duplicate_acks_and_health_leave_the_controller_answering_in_bounded_memory(
    api, controller, nats_server
):
    await api.node_register(name="n1")
    await genuine_ack(nats_server, api, "n1")
    st = await wait_status(api, "n1", lambda s: s.converged)
    node = await nats_server.connect("n1")
    v = st.desired_version
    ack = encode(Ack(node="n1", version=v, applied_version=v, digest=st.desired_digest))
    health = encode(Health(node="n1", applied_version=v, ok=True, started_at=0, sent_at=0))
    limits = {(s._pending_msgs_limit, s._pending_bytes_limit) for s in controller._subs}
    assert limits == {(65536, 64 * 2**20)}  # explicit bounds, not nats-py's 512k messages
    tracemalloc.start()
    try:
        await asyncio.sleep(0)
        baseline, _ = tracemalloc.get_traced_memory()
        slowest = 0.0
        for i in range(FLOOD):
            await node.publish(naming.ack_subject("n1"), ack)
            await node.publish(naming.health_subject("n1"), health)
            if i % 500 == 499:
                await node.flush(timeout=5)
                started = time.monotonic()
                status = await api.status()  # answers during the flood
                slowest = max(slowest, time.monotonic() - started)
        await node.flush(timeout=5)
        await asyncio.sleep(0.5)
        status = await api.status()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"flood: slowest status {slowest:.3f}s, +{(after - baseline) // 1024} KiB")
    assert status.converged and slowest < 2.0
    assert after - baseline < 8 * 2**20  # duplicates leave nothing behind


LOWERED = 50


async def test_a_flood_past_the_queue_bound_is_dropped_and_counted(api, controller, nats_server):
    await api.node_register(name="n1")
    await genuine_ack(nats_server, api, "n1")
    st = await wait_status(api, "n1", lambda s: s.converged)
    v = st.desired_version
    ack = encode(Ack(node="n1", version=v, applied_version=v, digest=st.desired_digest))
    counted = Reconnect("controller")  # the controller process's error_cb
    controller.nc._error_cb = counted.on_error
    for sub in controller._subs:  # lower the bound on the live subscriptions
        sub._pending_msgs_limit = sub._pending_queue._maxsize = LOWERED
    node = await nats_server.connect("n1")
    for _ in range(FLOOD):  # no await that yields: the server gets them back to back
        await node.publish(naming.ack_subject("n1"), ack)
    await node.flush(timeout=5)
    await asyncio.sleep(0.5)
    dropped = counted.slow_consumer[naming.ack_subject("n1")]
    print(f"flood of {FLOOD} acks, queue bound {LOWERED}: {dropped} dropped and counted")
    assert 0 < dropped < FLOOD
    assert max(s.pending_msgs for s in controller._subs) <= LOWERED
    assert (await api.status()).converged  # still answering, nothing stuck
