"""The release order of NIC addresses lives in intent: a restarted controller still hands out the
least recently released address last (issue 9)."""

import pytest

from client.api import ApiClient
from tests.conftest import start_controller

pytestmark = pytest.mark.timeout(30)


async def test_release_order_survives_a_controller_restart(nats_server, nc):
    api = ApiClient(nc)
    ctl = await start_controller(nats_server)
    try:
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/29")  # .2-.6 for NICs
        nics = [await api.nic_attach("br", "n1", f"vm{i}") for i in range(5)]
        assert [n.nic.ip for n in nics] == [f"10.0.0.{i}" for i in range(2, 7)]
        for i in (3, 1, 2):  # release .5, then .3, then .4
            await api.nic_detach(nics[i].nic.id)
    finally:
        await ctl.stop()
    ctl = await start_controller(nats_server)  # a new process would load the same store
    try:
        again = [(await api.nic_attach("br", "n1", f"new{i}")).nic.ip for i in range(3)]
        assert again == ["10.0.0.5", "10.0.0.3", "10.0.0.4"]
    finally:
        await ctl.stop()


async def test_a_crash_mid_detach_never_hands_the_address_out_at_once(nats_server, nc):
    """A detach is two writes (the network's release order, the NIC's deletion); a controller
    killed between them must find the address already at the back of the release order."""
    api = ApiClient(nc)
    ctl = await start_controller(nats_server)
    try:
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/29")
        nic = (await api.nic_attach("br", "n1", "vm")).nic
        writes: list[str] = []
        store = ctl.store
        put, delete = store.put, store.delete

        async def record_put(obj):
            writes.append(f"put {type(obj).__name__}")
            await put(obj)

        async def record_delete(obj):
            writes.append(f"delete {type(obj).__name__}")
            await delete(obj)

        store.put, store.delete = record_put, record_delete
        await api.nic_detach(nic.id)
    finally:
        await ctl.stop()
    assert writes.index("put Network") < writes.index("delete Nic"), writes
