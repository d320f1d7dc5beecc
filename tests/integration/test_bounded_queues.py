"""A flood of duplicated agent reports against a real nats-server (issue 9): the controller keeps
answering the API, its report queues stay within their explicit bounds, and memory does not grow.
"""

import asyncio
import time
import tracemalloc

import pytest

from client.api import ApiClient
from schemas import naming
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
        deepest, slowest = 0, 0.0
        for i in range(FLOOD):
            await node.publish(naming.ack_subject("n1"), ack)
            await node.publish(naming.health_subject("n1"), health)
            if i % 500 == 499:
                await node.flush(timeout=5)
                deepest = max([deepest] + [s.pending_msgs for s in controller._subs])
                started = time.monotonic()
                status = await api.status()  # answers during the flood
                slowest = max(slowest, time.monotonic() - started)
        await node.flush(timeout=5)
        await asyncio.sleep(0.5)
        status = await api.status()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"flood: deepest queue {deepest}, slowest status {slowest:.3f}s, +{(after - baseline) // 1024} KiB"
    )
    assert status.converged and slowest < 2.0
    assert deepest <= 65536
    assert after - baseline < 8 * 2**20  # duplicates leave nothing behind
