"""The controller API end to end: ApiClient → real nats-server → in-process Controller → KV store.

Every refused request is checked for its code, its message, and for leaving the KV bucket exactly
as it was (same keys, same values, same stream sequence: not even a rewrite).
"""

import asyncio
import re

import msgspec
import nats
import pytest
import pytest_asyncio

from agent.assemble import Assembler, complete
from client.api import ApiClient, ApiError
from controller.store import BUCKET
from schemas import SCHEMA_VERSION, naming
from schemas.codec import decode
from schemas.desired import Snapshot
from schemas.intent import Intent
from schemas.wire import Head
from tests.conftest import start_controller

pytestmark = pytest.mark.timeout(30)

KEY_A = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="  # any 32 bytes in base64
KEY_B = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


UNDERLAY = "192.0.2.0/24"  # the nodes' own network, as a real cluster's --underlay-cidr gives it


@pytest_asyncio.fixture
async def controller(nats_server):
    ctl = await start_controller(nats_server, underlay_cidrs=(UNDERLAY,))
    try:
        yield ctl
    finally:
        await ctl.stop()


@pytest.fixture
def api(controller, nc):
    return ApiClient(nc)


async def store_state(ctl) -> tuple[dict[str, bytes], int]:
    """Every live key with its value, plus the stream's last sequence (moves on any write)."""
    values = {}
    for key in await ctl.store.keys():
        try:
            values[key] = (await ctl.store.kv.get(key)).value
        except nats.js.errors.KeyNotFoundError:
            pass  # deleted
    info = await ctl.nc.jetstream().stream_info(f"KV_{BUCKET}")
    return values, info.state.last_seq


async def populate(api: ApiClient) -> dict:
    """A small cluster the bad requests run against."""
    await api.node_register(
        name="n1", underlay_ip="192.0.2.1", wg_public_key=KEY_A, wg_listen_port=51820
    )
    await api.node_register(name="n2")
    await api.network_create("br", "bridge", "10.0.0.0/24")
    await api.network_create("ov", "overlay", "10.1.0.0/24")
    await api.network_create("tiny", "bridge", "10.2.0.0/30")
    nic = await api.nic_attach("br", "n1", "vm1", mac="02:00:00:00:00:01")
    full = await api.nic_attach("tiny", "n1", "vm2")
    return {"nic": nic, "full": full}


# --- networks ---------------------------------------------------------------------------------


async def test_network_create_list_show_delete(api):
    br = await api.network_create("br", "bridge", "10.0.0.0/24")
    assert br.network.type == "bridge" and br.network.subnet == "10.0.0.0/24"
    assert br.network.gateway == "10.0.0.1" and br.network.egress == "none"
    assert br.network.vni is None and br.mtu == 1500 and br.nics == 0
    assert br.bridge == naming.bridge_network_bridge("br") and br.bridge.startswith("otn")

    nat = await api.network_create("nat", "bridge", "10.9.8.0/23", egress="nat")
    assert nat.network.egress == "nat" and nat.network.gateway == "10.9.8.1"

    ov1 = await api.network_create("ov1", "overlay", "10.1.0.0/24")
    ov2 = await api.network_create("ov2", "overlay", "10.2.0.0/24")
    ov3 = await api.network_create("ov3", "overlay", "10.3.0.0/24", vni=4242)
    assert (ov1.network.vni, ov2.network.vni, ov3.network.vni) == (1000, 1001, 4242)
    assert (ov1.bridge, ov1.mtu) == ("otb1000", 1390)

    listed = await api.network_list()
    assert [i.network.name for i in listed] == ["br", "nat", "ov1", "ov2", "ov3"]
    assert (await api.network_show("ov3")).network == ov3.network

    deleted = await api.network_delete("ov1")
    assert deleted.network == ov1.network
    with pytest.raises(ApiError) as e:
        await api.network_show("ov1")
    assert e.value.code == 404 and "'ov1' does not exist" in e.value.message
    # the freed VNI is the lowest free one again
    assert (await api.network_create("ov4", "overlay", "10.4.0.0/24")).network.vni == 1000


@pytest.mark.parametrize("kind", ["vlan", "isolated"])
async def test_deferred_network_types(api, controller, kind):
    before = await store_state(controller)
    with pytest.raises(ApiError) as e:
        await api.network_create("later", kind, "10.0.0.0/24")
    assert e.value.code == 501 and "deferred: not supported yet" in e.value.message
    assert kind in e.value.message
    assert await store_state(controller) == before


async def test_delete_network_with_force_takes_its_nics(api):
    await populate(api)
    deleted = await api.network_delete("br", force=True)
    assert deleted.nics == 1
    assert [i.nic.network for i in await api.nic_list()] == ["tiny"]


# --- nodes ------------------------------------------------------------------------------------


async def test_node_register_list_remove(api):
    n1 = await api.node_register(
        name="n1", underlay_ip="192.0.2.1", wg_public_key=KEY_A, wg_listen_port=51820
    )
    assert n1.node.tunnel_ip == "100.64.0.1" and n1.desired_version >= 1
    n2 = await api.node_register(name="n2", underlay_ip="192.0.2.2", wg_public_key=KEY_B)
    assert n2.node.tunnel_ip == "100.64.0.2"
    # registering again keeps the tunnel address and the registration time
    again = await api.node_register(
        name="n1", underlay_ip="192.0.2.1", wg_public_key=KEY_A, wg_listen_port=51820
    )
    assert again.node == n1.node
    assert [s.node.name for s in await api.node_list()] == ["n1", "n2"]

    removed = await api.node_remove("n2")
    assert removed.node.name == "n2"
    assert [s.node.name for s in await api.node_list()] == ["n1"]
    with pytest.raises(ApiError) as e:
        await api.node_remove("n2")
    assert e.value.code == 404 and "'n2' is not registered" in e.value.message


async def test_node_remove_with_force_takes_its_nics(api):
    await populate(api)
    await api.node_remove("n1", force=True)
    assert await api.nic_list() == []


# --- NICs -------------------------------------------------------------------------------------


async def test_nic_attach_list_detach(api):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    await api.network_create("br", "bridge", "10.0.0.0/29")
    await api.network_create("other", "bridge", "10.0.1.0/24")

    a = await api.nic_attach("br", "n1", "vm-a")
    b = await api.nic_attach("br", "n2", "vm-b")
    c = await api.nic_attach("other", "n1", "vm-c")
    assert (a.nic.ip, b.nic.ip, c.nic.ip) == ("10.0.0.2", "10.0.0.3", "10.0.1.2")
    macs = {a.nic.mac, b.nic.mac, c.nic.mac}
    assert len(macs) == 3
    for info in (a, b, c):
        first = int(info.nic.mac[:2], 16)
        assert MAC_RE.match(info.nic.mac) and first & 0b10 and not first & 0b01
        assert re.fullmatch(r"[0-9a-f]{32}", info.nic.id)
        assert info.tap == "ot" + info.nic.id[:12] and len(info.tap) == 14

    # chosen address and MAC are honoured (the MAC normalised)
    d = await api.nic_attach("br", "n1", "vm-d", ip="10.0.0.6", mac="02-AB-CD-EF-00-11")
    assert (d.nic.ip, d.nic.mac) == ("10.0.0.6", "02:ab:cd:ef:00:11")

    assert [i.nic.id for i in await api.nic_list(network="br", node="n1")] == [a.nic.id, d.nic.id]
    assert {i.nic.id for i in await api.nic_list(node="n1")} == {a.nic.id, c.nic.id, d.nic.id}
    assert len(await api.nic_list()) == 4
    assert (await api.network_show("br")).nics == 3

    # detach by full id, by a 12-digit prefix, by tap name; the freed IP is handed out again
    assert (await api.nic_detach(a.nic.id)).nic == a.nic
    assert (await api.nic_detach(b.nic.id[:12])).nic == b.nic
    assert (await api.nic_detach(c.tap)).nic == c.nic
    assert [i.nic.id for i in await api.nic_list()] == [d.nic.id]
    # never-used addresses first, then the least recently released (a, then b): issue 9
    ips = [(await api.nic_attach("br", "n2", f"vm-{i}")).nic.ip for i in range(4)]
    assert ips == ["10.0.0.4", "10.0.0.5", "10.0.0.2", "10.0.0.3"]
    assert (await api.network_show("br")).network.released == ("10.0.0.2", "10.0.0.3")
    with pytest.raises(ApiError) as e:  # a repeated detach (say, after a timeout) says so
        await api.nic_detach(a.nic.id)
    assert (e.value.code, e.value.message) == (
        404,
        f"NIC {a.nic.id} is already detached (vm 'vm-a' on network 'br', node n1): nothing to do",
    )


# --- retries: a request repeated (its reply lost) changes nothing more ----------------------------


async def test_attach_twice_makes_one_nic(api, controller):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    await api.network_create("br", "bridge", "10.0.0.0/24")
    first = await api.nic_attach("br", "n1", "vm")
    assert not first.existed
    before = await store_state(controller)
    again = await api.nic_attach("br", "n1", "vm")
    assert again.existed and (again.nic, again.tap) == (first.nic, first.tap)
    assert [i.nic.id for i in await api.nic_list()] == [first.nic.id]
    assert await store_state(controller) == before  # not even a rewrite

    # what a retry cannot return is refused, naming the NIC it clashes with
    for kwargs, differs in (
        ({"node": "n2"}, "node n1, not n2"),
        ({"node": "n1", "ip": "10.0.0.9"}, "ip 10.0.0.2, not 10.0.0.9"),
    ):
        with pytest.raises(ApiError) as e:
            await api.nic_attach("br", vm="vm", **kwargs)
        assert (e.value.code, e.value.message) == (
            409,
            f"vm 'vm' already has NIC {first.nic.id} (tap {first.tap}) on network 'br' with"
            f" {differs}: a VM has one NIC per network, detach that one first to change it",
        )
    assert await store_state(controller) == before


async def test_attach_retried_after_a_client_timeout_leaves_one_nic(api, controller, nc):
    await api.node_register(name="n1")
    await api.network_create("br", "bridge", "10.0.0.0/24")
    impatient = ApiClient(nc, timeout=0.3)
    async with controller.api._lock:  # the controller is busy (as while it stamps versions)
        with pytest.raises(ApiError) as e:
            await impatient.nic_attach("br", "n1", "vm")
        assert e.value.code == 504 and "did not answer nic.attach within 0.3s" in e.value.message
    # the request was made after all, once the controller got to it
    for _ in range(250):  # bounded: at most 5 s
        if made := await api.nic_list():
            break
        await asyncio.sleep(0.02)
    retried = await api.nic_attach("br", "n1", "vm")
    assert retried.existed and retried.nic == made[0].nic
    assert [i.nic.id for i in await api.nic_list()] == [made[0].nic.id]


async def test_network_create_twice_returns_the_network(api, controller):
    first = await api.network_create("ov", "overlay", "10.1.0.0/24")
    before = await store_state(controller)
    again = await api.network_create("ov", "overlay", "10.1.0.0/24")
    assert again.existed and not first.existed and again.network == first.network
    assert await store_state(controller) == before
    with pytest.raises(ApiError) as e:
        await api.network_create("ov", "overlay", "10.1.0.0/24", vni=5000)
    assert (e.value.code, e.value.message) == (
        409,
        "network 'ov' already exists with vni 1000, not 5000",
    )


async def test_status_reports_desired_versions(api):
    await api.node_register(name="n1")
    await api.node_register(name="n2")
    st = await api.status()
    assert [s.node.name for s in st.nodes] == ["n1", "n2"]
    assert all(s.desired_version >= 1 and s.applied_version == 0 for s in st.nodes)
    assert not st.converged and st.heartbeat_interval == 0.2 and st.underlay_mtu == 1500
    before = {s.node.name: s.desired_version for s in st.nodes}

    await api.network_create("br", "bridge", "10.0.0.0/24")
    await api.nic_attach("br", "n1", "vm")
    st = await api.status()
    after = {s.node.name: s.desired_version for s in st.nodes}
    assert after["n1"] > before["n1"] and after["n2"] == before["n2"]
    assert (st.networks, st.nics) == (1, 1)


# --- refused requests change nothing ------------------------------------------------------------

NAME_RULE = "use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"

MESH = "the mesh prefix 100.64.0.0/16 (the nodes' tunnel addresses)"
NO_VM = "which no VM network may use"

# one case per line reads as a table
# fmt: off
BAD_REQUESTS = [
    # (call, code, the whole message)
    (lambda a: a.network_create("Bad_Name", "bridge", "10.5.0.0/24"), 400, f"network name 'Bad_Name' is invalid: {NAME_RULE}"),
    (lambda a: a.network_create("-x", "bridge", "10.5.0.0/24"), 400, f"network name '-x' is invalid: {NAME_RULE}"),
    (lambda a: a.network_create("x" * 64, "bridge", "10.5.0.0/24"), 400, f"network name '{'x' * 64}' is invalid: {NAME_RULE}"),
    (lambda a: a.network_create("br", "bridge", "10.5.0.0/24"), 409, "network 'br' already exists with subnet 10.0.0.0/24, not 10.5.0.0/24"),
    (lambda a: a.network_create("x", "bridge", "10.0.0.128/25"), 409, "subnet 10.0.0.128/25 overlaps 10.0.0.0/24 of network 'br'"),
    (lambda a: a.network_create("x", "bridge", "10.0.0.0/8"), 409, "subnet 10.0.0.0/8 overlaps 10.0.0.0/24 of network 'br'"),
    (lambda a: a.network_create("x", "bridge", "10.5.0.1/24"), 400, "subnet '10.5.0.1/24' is not a valid network in CIDR form: 10.5.0.1/24 has host bits set"),
    (lambda a: a.network_create("x", "bridge", "banana"), 400, "subnet 'banana' is not a valid network in CIDR form: 'banana' does not appear to be an IPv4 or IPv6 network"),
    (lambda a: a.network_create("x", "bridge", "10.5.0.0/31"), 400, "subnet 10.5.0.0/31: prefix length must be between /8 and /30 (room for a gateway and at least one NIC)"),
    (lambda a: a.network_create("x", "bridge", "10.5.0.0/32"), 400, "subnet 10.5.0.0/32: prefix length must be between /8 and /30 (room for a gateway and at least one NIC)"),
    (lambda a: a.network_create("x", "bridge", "fd00::/64"), 400, "subnet fd00::/64: only IPv4 subnets are supported"),
    # infrastructure and special-purpose ranges: the range is named, with why it is off limits
    (lambda a: a.network_create("x", "bridge", "100.64.1.0/24"), 400, f"subnet 100.64.1.0/24 overlaps {MESH}, {NO_VM}"),
    (lambda a: a.network_create("x", "overlay", "100.0.0.0/8"), 400, f"subnet 100.0.0.0/8 overlaps {MESH}, {NO_VM}"),
    (lambda a: a.network_create("x", "bridge", "192.0.2.128/25", egress="nat"), 400, f"subnet 192.0.2.128/25 overlaps the underlay 192.0.2.0/24 (the nodes' own network), {NO_VM}"),
    (lambda a: a.network_create("x", "bridge", "0.0.0.0/8"), 400, f"subnet 0.0.0.0/8 overlaps the 'this network' range 0.0.0.0/8, {NO_VM}"),
    (lambda a: a.network_create("x", "bridge", "127.0.0.0/24"), 400, f"subnet 127.0.0.0/24 overlaps the loopback range 127.0.0.0/8, {NO_VM}"),
    (lambda a: a.network_create("x", "bridge", "169.254.0.0/16"), 400, f"subnet 169.254.0.0/16 overlaps the link-local range 169.254.0.0/16, {NO_VM}"),
    (lambda a: a.network_create("x", "overlay", "224.0.0.0/8"), 400, f"subnet 224.0.0.0/8 overlaps the multicast range 224.0.0.0/4, {NO_VM}"),
    (lambda a: a.network_create("x", "bridge", "240.0.0.0/8"), 400, f"subnet 240.0.0.0/8 overlaps the reserved range 240.0.0.0/4 (with the broadcast address), {NO_VM}"),
    (lambda a: a.network_create("x", "bridge", "255.255.255.252/30"), 400, f"subnet 255.255.255.252/30 overlaps the reserved range 240.0.0.0/4 (with the broadcast address), {NO_VM}"),
    (lambda a: a.network_create("x", "overlay", "10.5.0.0/24", egress="nat"), 400, "egress 'nat' is only available on bridge networks"),
    (lambda a: a.network_create("x", "bridge", "10.5.0.0/24", vni=5000), 400, "--vni only applies to overlay networks"),
    (lambda a: a.network_create("x", "overlay", "10.5.0.0/24", vni=1000), 409, "vni 1000 is already used by another network"),
    (lambda a: a.network_create("x", "overlay", "10.5.0.0/24", vni=0), 400, "vni 0 is out of range 1..16777215"),
    (lambda a: a.network_create("x", "overlay", "10.5.0.0/24", vni=2**24), 400, "vni 16777216 is out of range 1..16777215"),
    (lambda a: a.network_show("nope"), 404, "network 'nope' does not exist"),
    (lambda a: a.network_delete("nope"), 404, "network 'nope' does not exist"),
    (lambda a: a.network_delete("br"), 409, "network 'br' still has 1 NIC(s) attached; detach them first or delete with force"),
    (lambda a: a.nic_attach("nope", "n1", "vm"), 404, "network 'nope' does not exist"),
    (lambda a: a.nic_attach("br", "nope", "vm"), 404, "node 'nope' is not registered"),
    (lambda a: a.nic_attach("br", "n1", ""), 400, "vm must be a printable name of 1 to 128 characters"),
    (lambda a: a.nic_attach("br", "n1", "vm", ip="10.9.0.5"), 400, "ip 10.9.0.5 is outside the network's subnet 10.0.0.0/24"),
    (lambda a: a.nic_attach("br", "n1", "vm", ip="10.0.0.1"), 400, "ip 10.0.0.1 is the gateway of 10.0.0.0/24"),
    (lambda a: a.nic_attach("br", "n1", "vm", ip="10.0.0.0"), 400, "ip 10.0.0.0 is the network or broadcast address of 10.0.0.0/24"),
    (lambda a: a.nic_attach("br", "n1", "vm", ip="10.0.0.255"), 400, "ip 10.0.0.255 is the network or broadcast address of 10.0.0.0/24"),
    (lambda a: a.nic_attach("br", "n1", "vm", ip="10.0.0.2"), 409, "ip 10.0.0.2 is already in use in 10.0.0.0/24"),
    (lambda a: a.nic_attach("br", "n1", "vm", ip="10.0.0.300"), 400, "ip '10.0.0.300' is not a valid IPv4 address"),
    (lambda a: a.nic_attach("br", "n1", "vm", mac="02:00:00:00:00"), 400, "mac '02:00:00:00:00' is not a MAC address like 02:00:00:00:00:01"),
    (lambda a: a.nic_attach("br", "n1", "vm", mac="zz:00:00:00:00:01"), 400, "mac 'zz:00:00:00:00:01' is not a MAC address like 02:00:00:00:00:01"),
    (lambda a: a.nic_attach("br", "n1", "vm", mac="01:00:5e:00:00:01"), 400, "mac 01:00:5e:00:00:01 is a multicast address; a NIC needs a unicast one"),
    (lambda a: a.nic_attach("br", "n1", "vm", mac="02:00:00:00:00:01"), 409, "mac 02:00:00:00:00:01 is already used by another NIC"),
    (lambda a: a.nic_attach("tiny", "n1", "vm"), 409, "subnet 10.2.0.0/30 is exhausted: no free address left"),
    (lambda a: a.nic_detach("0123"), 400, "NIC id '0123': give the full id or at least 12 hex digits"),
    (lambda a: a.nic_detach("0123456789ab"), 404, "NIC '0123456789ab' does not exist"),
    (lambda a: a.nic_list(network="nope"), 404, "network 'nope' does not exist"),
    (lambda a: a.node_register(name="Bad Name"), 400, f"node name 'Bad Name' is invalid: {NAME_RULE}"),
    (lambda a: a.node_register(name="n3", underlay_ip="999.1.1.1"), 400, "underlay_ip '999.1.1.1' is not an IPv4 address"),
    (lambda a: a.node_register(name="n3", underlay_ip="fd00::1"), 400, "underlay_ip 'fd00::1' is not an IPv4 address"),
    (lambda a: a.node_register(name="n3", underlay_ip="127.0.0.1"), 400, "underlay_ip 127.0.0.1 is in the loopback range 127.0.0.0/8: no other node can reach it there"),
    (lambda a: a.node_register(name="n3", underlay_ip="255.255.255.255"), 400, "underlay_ip 255.255.255.255 is in the reserved range 240.0.0.0/4 (with the broadcast address): no other node can reach it there"),
    (lambda a: a.node_register(name="n3", underlay_ip="100.64.0.9"), 400, "underlay_ip 100.64.0.9 is inside the mesh prefix 100.64.0.0/16 it would carry"),
    (lambda a: a.node_register(name="n3", wg_public_key="short"), 400, "wg_public_key is not a base64 WireGuard key (44 characters)"),
    (lambda a: a.node_register(name="n3", wg_public_key="!" * 44), 400, "wg_public_key is not a base64 WireGuard key (44 characters)"),
    # an alias of KEY_A: same 32 bytes, last character differs in the 2 bits decoding ignores
    (lambda a: a.node_register(name="n3", wg_public_key=KEY_A[:42] + "h="), 400, "wg_public_key is not a base64 WireGuard key (44 characters)"),
    (lambda a: a.node_register(name="n3", wg_public_key=KEY_A), 409, "public key already belongs to node 'n1'"),
    (lambda a: a.node_register(name="n3", wg_listen_port=70000), 400, "wg_listen_port 70000 is not a UDP port"),
    (lambda a: a.node_remove("n1"), 409, "node 'n1' still hosts 2 NIC(s); detach them first or remove with force"),
    (lambda a: a.node_remove("nope"), 404, "node 'nope' is not registered"),
]
# fmt: on


@pytest.mark.parametrize(("call", "code", "message"), BAD_REQUESTS)
async def test_bad_request_is_refused_and_changes_nothing(api, controller, call, code, message):
    await populate(api)
    before = await store_state(controller)
    with pytest.raises(ApiError) as e:
        await call(api)
    assert (e.value.code, e.value.message) == (code, message)
    assert await store_state(controller) == before


# fmt: off
RAW_REQUESTS = [
    # (endpoint, raw body, code, texts in the message)
    ("network.create", b'{"name":"x","type":"bridge","subnet":"10.5.0.0/24","colour":"red"}', 400, ["unknown field", "colour"]),
    ("nic.attach", b'{"network":"br","node":"n1","vm":"v","ipaddr":"10.0.0.9"}', 400, ["ipaddr"]),
    ("status", b'{"verbose":true}', 400, ["verbose"]),
    ("network.create", b'{"name":7,"type":"bridge","subnet":"10.5.0.0/24"}', 400, ["Expected `str`, got `int`", "$.name"]),
    ("network.create", b'{"name":"x","type":"mesh","subnet":"10.5.0.0/24"}', 400, ["Invalid enum value 'mesh'", "$.type"]),
    ("network.create", b'{"name":"x","type":"overlay","subnet":"10.5.0.0/24","vni":"1"}', 400, ["$.vni"]),
    ("network.create", b'{"name":"x","type":"bridge"}', 400, ["missing required field `subnet`"]),
    ("network.delete", b'{"name":"br","force":"yes"}', 400, ["Expected `bool`", "$.force"]),
    ("network.create", b'{"schema":2,"name":"x","type":"bridge","subnet":"10.5.0.0/24"}', 400, ["schema 2 is not supported"]),
    ("node.register.n3", b'{"schema":0,"name":"n3"}', 400, ["schema 0 is not supported"]),
    # node-scoped: the body must name the node whose subject carries it
    ("node.register.n4", b'{"name":"n3"}', 400, ["node.register for node 'n3' sent on otherix.v1.api.node.register.n4"]),
    ("network.create", b'{"name":"x",', 400, ["invalid network.create request", "truncated"]),
    ("node.register.n3", b"not json at all", 400, ["malformed"]),
    ("network.list", b"[]", 400, ["Expected `object`, got `array`"]),
    # not UTF-8: a refusal like any malformed body, never an internal error
    ("network.create", b'{"name":"\xff","type":"bridge","subnet":"10.5.0.0/24"}', 400, ["invalid network.create request: 'utf-8' codec can't decode byte 0xff"]),
    ("network.list", b"[" * 100_000 + b"]" * 100_000, 400, ["invalid network.list request"]),
]
# fmt: on


@pytest.mark.parametrize(("endpoint", "body", "code", "texts"), RAW_REQUESTS)
async def test_malformed_request_is_refused_and_changes_nothing(
    api, controller, nc, endpoint, body, code, texts
):
    await populate(api)
    before = await store_state(controller)
    reply = await nc.request(naming.api_subject(endpoint), body, timeout=5)
    headers = reply.headers or {}
    assert headers.get("Nats-Service-Error-Code") == str(code)
    message = headers.get("Nats-Service-Error", "")
    for text in texts:
        assert text in message, message
    body_error = msgspec.json.decode(reply.data)  # the ApiError body carries the same message
    assert body_error == {"code": code, "message": message, "schema": SCHEMA_VERSION}
    assert await store_state(controller) == before


async def test_request_with_current_schema_version_is_accepted(api, nc):
    body = b'{"schema":%d,"name":"x","type":"bridge","subnet":"10.5.0.0/24"}' % SCHEMA_VERSION
    reply = await nc.request(naming.api_subject("network.create"), body, timeout=5)
    assert not (reply.headers or {}).get("Nats-Service-Error-Code")
    assert (await api.network_show("x")).network.subnet == "10.5.0.0/24"


async def test_subnet_exhaustion_and_reuse(api):
    await api.node_register(name="n1")
    await api.network_create("tiny", "bridge", "10.2.0.0/30")  # .1 gateway, .2 the only NIC
    only = await api.nic_attach("tiny", "n1", "vm")
    assert only.nic.ip == "10.2.0.2"
    with pytest.raises(ApiError) as e:
        await api.nic_attach("tiny", "n1", "vm2")
    assert e.value.code == 409 and "exhausted" in e.value.message
    await api.nic_detach(only.nic.id)
    assert (await api.nic_attach("tiny", "n1", "vm2")).nic.ip == "10.2.0.2"


# --- persistence across controller and server restarts -------------------------------------------


async def first_snapshot(nc, node: str, timeout: float = 5.0) -> Snapshot:
    """Wait for the node's next HEAD and assemble its state as an agent does (the heartbeat
    repeats the HEAD, so a late subscription is fine)."""
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    assembler, api = Assembler(node), ApiClient(nc)

    async def on_msg(msg):
        snap = await complete(assembler, decode(msg.data, Head), api.section_get)
        if snap is not None and not got.done():
            got.set_result(snap)

    sub = await nc.subscribe(naming.desired_subject(node), cb=on_msg)
    try:
        return await asyncio.wait_for(got, timeout)
    finally:
        await sub.unsubscribe()


def content(snap: Snapshot) -> Snapshot:
    return msgspec.structs.replace(snap, version=0, published_at=0.0)


async def test_intent_and_versions_survive_restarts(nats_server):
    ctl = await start_controller(nats_server)
    api = ApiClient(await nats_server.connect("admin"))
    await api.node_register(
        name="n1", underlay_ip="192.0.2.1", wg_public_key=KEY_A, wg_listen_port=51820
    )
    await api.node_register(
        name="n2", underlay_ip="192.0.2.2", wg_public_key=KEY_B, wg_listen_port=51820
    )
    await api.network_create("br", "bridge", "10.0.0.0/24", egress="nat")
    await api.network_create("ov", "overlay", "10.1.0.0/24")
    await api.nic_attach("br", "n1", "vm1")
    await api.nic_attach("ov", "n1", "vm1")
    await api.nic_attach("ov", "n2", "vm2", ip="10.1.0.77", mac="02:00:00:00:00:77")
    intent = msgspec.json.decode(msgspec.json.encode(ctl.intent), type=Intent)  # a copy
    versions = {s.node.name: s.desired_version for s in (await api.status()).nodes}
    snap_before = await first_snapshot(await nats_server.connect("n1"), "n1")
    await ctl.stop()
    await nats_server.close_clients()

    nats_server.restart()

    ctl = await start_controller(nats_server)
    n1 = await nats_server.connect("n1")
    try:
        api = ApiClient(await nats_server.connect("admin"))
        assert ctl.intent == intent
        assert [i.network.name for i in await api.network_list()] == ["br", "ov"]
        assert len(await api.nic_list()) == 3
        assert [s.node.tunnel_ip for s in await api.node_list()] == ["100.64.0.1", "100.64.0.2"]
        # nothing changed: the same versions (and content) are published again (the nodes'
        # versions are saved in one entry at a clean stop and every few seconds)
        st = await api.status()
        assert {s.node.name: s.desired_version for s in st.nodes} == versions
        snap = await first_snapshot(n1, "n1")
        assert (snap.version, snap.digest) == (snap_before.version, snap_before.digest)
        assert content(snap) == content(snap_before)
        assert snap.published_at > snap_before.published_at

        # a change after the restart moves the version past everything published before, for
        # the nodes it affects only
        await api.nic_attach("br", "n1", "vm3")
        st = await api.status()
        after = {s.node.name: s.desired_version for s in st.nodes}
        assert after["n1"] > versions["n1"] and after["n2"] == versions["n2"]
        snap = await first_snapshot(n1, "n1")
        assert snap.version == after["n1"] and len(snap.taps) == 3
    finally:
        await ctl.stop()


async def test_removed_node_that_returns_never_sees_its_version_go_down(api):
    await api.node_register(name="n1")
    await api.network_create("br", "bridge", "10.0.0.0/24")
    await api.nic_attach("br", "n1", "vm")
    high = (await api.node_list())[0].desired_version
    await api.node_remove("n1", force=True)
    back = await api.node_register(name="n1")
    assert back.desired_version > high  # different content than at `high`, so strictly higher
