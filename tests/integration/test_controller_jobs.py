"""The controller's jobs kept apart, on a real nats-server: read endpoints never write the store,
not even while a change waits for the publisher; the version they show is the one it sends."""

import asyncio
import time

import pytest

from client.api import ApiClient
from controller.store import BUCKET
from schemas import naming
from schemas.codec import decode, encode
from schemas.intent import Generation
from schemas.messages import Ack
from tests.conftest import start_controller

pytestmark = pytest.mark.timeout(30)


def count_writes(store) -> list[str]:
    """Every put and delete through this Store, as "put <type>" / "delete <type>"."""
    writes: list[str] = []
    put, delete = store.put, store.delete

    async def counted_put(obj):
        writes.append(f"put {type(obj).__name__}")
        await put(obj)

    async def counted_delete(obj):
        writes.append(f"delete {type(obj).__name__}")
        await delete(obj)

    store.put, store.delete = counted_put, counted_delete
    return writes


async def last_seq(nc) -> int:
    """The bucket stream's last sequence: it moves on any write, whoever makes it."""
    return (await nc.jetstream().stream_info(f"KV_{BUCKET}")).state.last_seq


async def reads(api: ApiClient) -> dict[str, int]:
    """One call of every read endpoint; n1's desired version as status and node.list show it."""
    status, nodes = await api.status(), await api.node_list()
    await api.network_list()
    await api.network_show("br")
    await api.nic_list()
    await api.nic_list(network="br")
    return {"status": status.nodes[0].desired_version, "node.list": nodes[0].desired_version}


async def test_reads_never_write_while_a_change_is_pending(nats_server, nc):
    ctl = await start_controller(nats_server, heartbeat=3600.0)  # only changes wake the publisher
    try:
        api = ApiClient(nc)
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/24")
        await ctl.publish_all()  # n1's version is persisted: nothing pending
        v1 = (await api.status()).nodes[0].desired_version
        assert v1 >= 1

        # Hold the publisher: it keeps waking but publishes nothing, so changes stay pending.
        woke = asyncio.Event()

        async def held() -> None:
            woke.set()

        ctl.publisher.publish_all = held
        ctl.publisher.wake()
        await asyncio.wait_for(woke.wait(), 5)  # past any real publish_all already under way

        await api.nic_attach("br", "n1", "vm")  # n1's content changes: v1 + 1 is pending
        writes, seq = count_writes(ctl.store), await last_seq(ctl.nc)
        for _ in range(25):
            assert await reads(api) == {"status": v1 + 1, "node.list": v1 + 1}

        # n1 reports a version this controller never issued: continuing above it is pending too
        ack = Ack(node="n1", version=v1, applied_version=500, ok=False, error="stale snapshot")
        await (await nats_server.connect("n1")).publish(naming.ack_subject("n1"), encode(ack))
        deadline = time.monotonic() + 5
        while (seen := await reads(api)) != {"status": 501, "node.list": 501}:
            assert time.monotonic() < deadline, seen
        for _ in range(25):
            assert await reads(api) == {"status": 501, "node.list": 501}
        assert writes == [] and await last_seq(ctl.nc) == seq

        # released, the publisher sends exactly the version the reads showed, below the mark it
        # persisted (one write per block of versions: none was needed for these)
        del ctl.publisher.publish_all
        await ctl.publish_all()
        assert writes == [] and ctl.versions["n1"].version == 501
        stored = decode((await ctl.store.kv.get("generation.reserved")).value, Generation)
        assert stored.reserved >= 501
    finally:
        await ctl.stop()
