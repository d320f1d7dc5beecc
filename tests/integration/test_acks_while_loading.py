"""A controller that is still loading its role hears the nodes' acks already (it subscribes
first): an ack it cannot yet judge is dropped, not refused as an 'unpublished version' (a
refusal is a forged-report signal on the dashboard; every start and every takeover raised it)."""

import asyncio

import pytest

from client.api import ApiClient
from controller.service import Controller
from controller.store import Store
from schemas import naming
from schemas.codec import encode
from schemas.messages import Ack
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


async def test_a_deposed_leader_reloading_as_follower_does_not_refuse_the_new_leaders_acks(
    nats_server, nc
):
    """Deposed, it reloads as a follower; meanwhile its old publisher's versions are no bound
    for acks of the versions the new leader sends above them."""
    api = ApiClient(nc)
    old = await start_controller(nats_server, heartbeat=0.2, instance="old")
    new = None
    try:
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/24")
        await api.nic_attach("br", "n1", "vm1")
        n1 = await nats_server.connect("n1")
        await Listener(n1, "n1").start()
        before = old.versions["n1"].version
        for task in old._tasks:
            task.cancel()  # frozen: no renewals; it still believes it leads
        new = await start_controller(nats_server, heartbeat=0.2, instance="new")
        async with asyncio.timeout(10):
            while not new.leading or new.versions["n1"].version <= before:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        loaded, release = asyncio.Event(), asyncio.Event()
        generation = old.store.generation

        async def slow_generation():
            loaded.set()
            await release.wait()
            return await generation()

        old.store.generation = slow_generation
        stepping = asyncio.create_task(old._step())  # renewal fails: it follows, reloading
        await asyncio.wait_for(loaded.wait(), 10)
        sent = new.versions["n1"]
        ack = Ack(node="n1", version=sent.version, applied_version=sent.version, digest=sent.digest)
        await n1.publish(naming.ack_subject("n1"), encode(ack))
        await asyncio.sleep(1.0)  # delivered (the same ack is refused without the fix)
        release.set()
        await asyncio.wait_for(stepping, 10)
        assert not old.leading
        assert old.acks.refused["unpublished version"] == 0
    finally:
        await old.stop()
        if new is not None:
            await new.stop()
