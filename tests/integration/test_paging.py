"""Listings on a bus with a small max_payload (16 KB): ``status``, ``node.list`` and ``nic.list``
hold more than one reply could carry, and still come back whole, through ApiClient and through
``otherixctl`` (which follow the controller's cursors). The raw pages show what bounds them: the
byte budget whatever ``limit`` asks, the cursor, and old request bodies (``{}``) getting page one.
"""

import contextlib
import io
import json

import pytest
import pytest_asyncio

from client import cli
from client.api import ApiClient
from schemas import api, naming
from schemas.codec import decode, encode
from tests.conftest import NatsServer, start_controller

pytestmark = pytest.mark.timeout(120)

MAX_PAYLOAD = 16 * 1024
NODES = 60  # about 400 bytes of status each: one unpaged reply would be about 24 KB
NICS = 80  # about 300 bytes each


@pytest_asyncio.fixture
async def small_bus(tmp_path):
    (tmp_path / "js").mkdir()
    server = NatsServer(tmp_path / "js", max_payload=MAX_PAYLOAD)
    server.start()
    ctl = None
    try:
        ctl = await start_controller(server, heartbeat=1.0)
        client = ApiClient(await server.connect("admin"))
        await client.network_create("lan", "bridge", "10.0.0.0/24")
        names = [f"node-{i:03d}-with-a-longer-name" for i in range(NODES)]
        admin = await server.connect("admin")  # the admin may register any node (no CLI for it)
        for i, name in enumerate(names):
            req = api.NodeRegister(name=name, underlay_ip=f"192.0.2.{i + 1}")
            await admin.request(naming.node_api_subject("node.register", name), encode(req), 5)
        for i in range(NICS):
            await client.nic_attach("lan", names[i % 3], f"vm-{i:03d}")
        yield server, client, names
    finally:
        if ctl is not None:
            await ctl.stop()
        await server.close_clients()
        server.stop()


async def raw(server_nc, endpoint: str, body: bytes, reply_type):
    msg = await server_nc.request(naming.api_subject(endpoint), body, timeout=5)
    assert not (msg.headers or {}).get("Nats-Service-Error-Code"), msg.headers
    assert len(msg.data) <= MAX_PAYLOAD * 3 // 4, len(msg.data)
    return decode(msg.data, reply_type)


async def test_unpaged_listings_would_not_fit(small_bus):
    server, client, names = small_bus
    statuses = await client.node_list()
    nics = await client.nic_list()
    assert len(encode(statuses)) > MAX_PAYLOAD and len(encode(nics)) > MAX_PAYLOAD


async def test_api_client_returns_every_item(small_bus):
    server, client, names = small_bus
    assert [s.node.name for s in await client.node_list()] == names
    status = await client.status()
    assert [s.node.name for s in status.nodes] == names
    assert (status.networks, status.nics, status.next) == (1, NICS, None)
    nics = await client.nic_list()
    assert sorted(i.nic.vm for i in nics) == [f"vm-{i:03d}" for i in range(NICS)]
    assert len({i.nic.id for i in nics}) == NICS
    assert len(await client.nic_list(node=names[0])) == len(range(0, NICS, 3))


async def test_pages_stay_under_the_budget_whatever_the_limit(small_bus):
    server, client, names = small_bus
    nc = await server.connect("viewer")  # listings are reads: a viewer pages too
    first = await raw(nc, "node.list", b"{}", api.NodePage)  # an old request: page one
    assert 0 < len(first.items) < NODES and first.next is not None
    huge = await raw(nc, "node.list", b'{"limit": 100000}', api.NodePage)
    assert huge == first
    two = await raw(nc, "node.list", b'{"limit": 2}', api.NodePage)
    assert [s.node.name for s in two.items] == names[:2]
    body = encode(api.Page(limit=3, cursor=two.next))
    after = await raw(nc, "node.list", body, api.NodePage)
    assert [s.node.name for s in after.items] == names[2:5]

    status = await raw(nc, "status", b"{}", api.Status)
    assert 0 < len(status.nodes) < NODES and status.next and status.nics == NICS
    seen, cursor = [], None
    while True:
        page = await raw(nc, "nic.list", encode(api.NicFilter(cursor=cursor)), api.NicPage)
        seen += page.items
        if (cursor := page.next) is None:
            break
    assert len(seen) == NICS and len({i.nic.id for i in seen}) == NICS


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"limit": 0}', "limit 0 must be at least 1"),
        (b'{"cursor": "nope"}', "cursor 'nope' is not one this API handed out"),
        (b'{"cursor": "WyJhIiwiYiJd"}', "is not one this API handed out"),  # ["a","b"]
    ],
)
async def test_bad_page_requests_are_refused(small_bus, body, message):
    server, client, names = small_bus
    msg = await (await server.connect("admin")).request(
        naming.api_subject("node.list"), body, timeout=5
    )
    assert (msg.headers or {}).get("Nats-Service-Error-Code") == "400"
    assert message in msg.headers["Nats-Service-Error"]


async def ctl(server: NatsServer, *argv: str) -> str:
    env = server.env("admin")
    flags = ["--nats", server.url]
    flags += ["--nats-creds", env["OTHERIX_NATS_CREDS"], "--nats-ca", env["OTHERIX_NATS_CA"]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = await cli.run(cli.build_parser().parse_args([*flags, *argv]))
    assert rc == 0
    return out.getvalue()


async def test_otherixctl_prints_every_item(small_bus):
    server, client, names = small_bus
    nodes = json.loads(await ctl(server, "node", "list", "--json"))
    assert [n["node"]["name"] for n in nodes] == names
    status = json.loads(await ctl(server, "status", "--json"))
    assert [n["node"]["name"] for n in status["nodes"]] == names
    nics = json.loads(await ctl(server, "nic", "list", "--json"))
    assert len({n["nic"]["id"] for n in nics}) == NICS
    table = await ctl(server, "nic", "list")
    assert len(table.strip().splitlines()) == NICS + 1  # header + every NIC
    table = await ctl(server, "status")
    assert f"{NODES} node(s), 1 network(s), {NICS} NIC(s)" in table
    assert all(name in table for name in names)
