"""A controller that is still loading its role hears the nodes' acks already (it subscribes
first): an ack it cannot yet judge is dropped, not refused as an 'unpublished version' (a
refusal is a forged-report signal on the dashboard; every start and every takeover raised it)."""

import asyncio

import pytest

from client.api import ApiClient
from controller.service import Controller
from controller.store import Store
from tests.conftest import start_controller
from tests.integration.test_heartbeat import Listener
from tests.integration.test_untrusted_reports import genuine_ack

pytestmark = pytest.mark.timeout(60)


async def test_an_ack_heard_while_the_role_loads_is_not_refused(nats_server, nc):
    leader = await start_controller(nats_server, heartbeat=0.2, instance="a")
    client = await nats_server.connect("controller")
    store = await Store.open(client.jetstream())
    late = Controller(client, store, leader.config, instance="b")
    loaded, release, heard = asyncio.Event(), asyncio.Event(), asyncio.Event()
    generation = store.generation

    async def slow_generation():  # the role's load, held after intent is in memory
        loaded.set()
        await release.wait()
        return await generation()

    on_ack = late.acks.on_ack

    async def counting_on_ack(msg):
        await on_ack(msg)
        heard.set()

    store.generation = slow_generation
    late.acks.on_ack = counting_on_ack  # before start: subscribe takes this one
    starting = None
    try:
        api = ApiClient(nc)
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/24")
        await api.nic_attach("br", "n1", "vm1")
        await Listener(await nats_server.connect("n1"), "n1").start()
        starting = asyncio.create_task(late.start())
        await asyncio.wait_for(loaded.wait(), 20)
        assert "n1" in late.intent.nodes
        await genuine_ack(nats_server, api, "n1")
        await asyncio.wait_for(heard.wait(), 10)
        release.set()
        await asyncio.wait_for(starting, 20)
        assert late.acks.refused["unpublished version"] == 0
    finally:
        release.set()
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)
            await late.stop()
        await leader.stop()
