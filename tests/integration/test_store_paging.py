"""The intent store lists all its keys past nats-server's 100,000-subject page of stream info
(a 5,000-node store with 20 NICs per node has 105,100 keys and loaded without its nodes)."""

import asyncio

import pytest
from nats.js.api import KeyValueConfig, StorageType

from controller.store import Store
from schemas.codec import encode
from schemas.intent import Node

pytestmark = pytest.mark.timeout(180)

PAGE = 100_000  # nats-server's page of subjects in a stream info reply


async def test_keys_past_one_page_of_stream_info(open_nats_server):
    # the open bus: the test bucket is not the controller's, which is all its identity may write
    nc = await open_nats_server.connect()
    try:
        js, value = nc.jetstream(), encode(Node(name="x"))
        # in memory: the shipped bucket fsyncs every write, and 100,000 fsyncs take minutes
        kv = await js.create_key_value(KeyValueConfig(bucket="paging", storage=StorageType.MEMORY))
        store = Store(kv)
        names = [f"nic.{i:06d}" for i in range(PAGE + 5)] + ["node.zz1", "node.zz2"]
        for start in range(0, len(names), 500):  # keys sort after every nic.*: the last page
            await asyncio.gather(
                *(
                    js.publish(f"$KV.paging.{k}", value, timeout=30)
                    for k in names[start : start + 500]
                )
            )
        keys = await store.keys()
        assert len(keys) == len(names) and keys[-2:] == ["node.zz1", "node.zz2"]
    finally:
        await nc.close()
