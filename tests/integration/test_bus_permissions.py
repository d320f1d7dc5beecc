"""The bus's permission matrix against a real nats-server with TLS and nkey users (issue 7).

Every refusal is shown next to the same action succeeding with the right identity, so no test
can pass because the bus is down. Identities: ``controller``, ``admin``, ``viewer``,
``node:n1``, ``node:n2``; the controller's side is played by a plain responder here (the real
controller is wired onto the bus later), and by a real ``nats.micro`` service in one test.
"""

import asyncio
import ssl

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from nats.js.api import KeyValueConfig, StorageType

from client.bus import cli, connect_kwargs, files, permissions, pki
from schemas import api, naming
from tests.busauth import (
    BusServer,
    Peer,
    can_publish,
    can_subscribe,
    cannot_publish,
    cannot_subscribe,
    connect_as,
    seed_of,
)

pytestmark = pytest.mark.timeout(60)

BUCKET = "otherix"
MUTATING = tuple(
    dict.fromkeys(
        [*(e for e in api.ENDPOINTS if e not in permissions.READ_ENDPOINTS), "node.rekey"]
    )
)
IDENTITIES = ("controller", "admin", "viewer", "node:n1", "node:n2")


def _serving(bus_dir):
    """A bus directory with nodes n1 and n2, served until the fixture ends."""
    files.init(bus_dir, nodes=("n1", "n2"))
    server = BusServer(bus_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_bus(tmp_path_factory):
    """One server for the read-only matrix (nothing here changes the roster)."""
    yield from _serving(tmp_path_factory.mktemp("bus") / "bus")


@pytest.fixture
def own_bus(tmp_path):
    """A server of its own, for tests that add or revoke identities."""
    yield from _serving(tmp_path / "bus")


@pytest_asyncio.fixture
async def peers(shared_bus):
    """``await peers("node:n1")`` → a connected Peer, one per identity, all closed at the end."""
    opened: dict[str, Peer] = {}

    async def get(who: str) -> Peer:
        if who not in opened:
            opened[who] = await connect_as(shared_bus, who)
        return opened[who]

    try:
        yield get
    finally:
        for peer in opened.values():
            await peer.close()


async def _responder(controller: Peer):
    """The controller's side of the API: answers every otherix.v1.api.> request, as the micro
    service does (queue group, reply into the caller's inbox)."""

    async def reply(msg):
        await msg.respond(b"ok:" + msg.subject.encode())

    return await controller.nc.subscribe(
        naming.api_subject(">"), queue="otherix-controller", cb=reply
    )


async def _request_ok(peer: Peer, subject: str) -> None:
    """A reply proves the request got through and the answer reached the caller's inbox; the
    subscription behind it may lag, so retry a few times before failing."""
    for _ in range(20):
        try:
            msg = await peer.nc.request(subject, b"{}", timeout=0.25)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await asyncio.sleep(0.05)
            continue
        assert msg.data == b"ok:" + subject.encode()
        return
    raise AssertionError(f"{peer.label}: no reply on {subject}")


# --- agents ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject, right, right_subject, publisher, pub_subject",
    [
        ("otherix.v1.desired.n2", "node:n2", None, "controller", None),
        # nobody may watch every node's desired state; n2 gets its own
        (
            "otherix.v1.desired.*",
            "node:n2",
            "otherix.v1.desired.n2",
            "controller",
            "otherix.v1.desired.n2",
        ),
        (
            "otherix.v1.desired.>",
            "node:n2",
            "otherix.v1.desired.n2",
            "controller",
            "otherix.v1.desired.n2",
        ),
        ("otherix.v1.ack.n2", "controller", None, "node:n2", None),
        ("otherix.v1.ack.*", "controller", None, "node:n2", "otherix.v1.ack.n2"),
        ("otherix.v1.health.n2", "viewer", None, "node:n2", None),
        ("otherix.v1.api.>", "controller", None, "admin", "otherix.v1.api.network.create"),
        ("otherix.v1.api.node.register.n2", "controller", None, "node:n2", None),
        (">", "node:n2", "otherix.v1.desired.n2", "controller", "otherix.v1.desired.n2"),
    ],
)
async def test_agent_cannot_subscribe_beyond_its_desired_subject(
    peers, subject, right, right_subject, publisher, pub_subject
):
    # the right identity receives it ...
    await can_subscribe(
        await peers(right), right_subject or subject, await peers(publisher), pub_subject
    )
    # ... n1 is refused, and its own desired state still reaches it
    n1 = await peers("node:n1")
    await cannot_subscribe(n1, subject, await peers(publisher), pub_subject)
    await can_subscribe(n1, naming.desired_subject("n1"), await peers("controller"))


@pytest.mark.parametrize("node", ["n1", "n2"])
async def test_agent_cannot_publish_desired_state(peers, node):
    """Not even its own: only the controller writes desired state."""
    await cannot_publish(
        await peers("node:n1"),
        naming.desired_subject(node),
        watcher=await peers(f"node:{node}"),
        allowed=await peers("controller"),
    )


@pytest.mark.parametrize("subject_of", [naming.ack_subject, naming.health_subject])
async def test_agent_cannot_report_as_another_node(peers, subject_of):
    controller = await peers("controller")
    await can_publish(await peers("node:n1"), subject_of("n1"), watcher=controller)
    await cannot_publish(
        await peers("node:n1"), subject_of("n2"), watcher=controller, allowed=await peers("node:n2")
    )


async def test_agent_registers_only_itself(peers):
    controller = await peers("controller")
    n1 = await peers("node:n1")
    await can_publish(n1, naming.node_api_subject("node.register", "n1"), watcher=controller)
    await cannot_publish(
        n1,
        naming.node_api_subject("node.register", "n2"),
        watcher=controller,
        allowed=await peers("node:n2"),
    )


@pytest.mark.parametrize("endpoint", [*MUTATING, *permissions.READ_ENDPOINTS])
async def test_agent_cannot_call_operator_endpoints(peers, endpoint):
    """Mutating calls (and the unscoped node.register) are the admin's; reads are operators'."""
    await cannot_publish(
        await peers("node:n1"),
        naming.api_subject(endpoint),
        watcher=await peers("controller"),
        allowed=await peers("admin"),
    )


@pytest.mark.parametrize("snoop", ["node:n1", "viewer", "admin"])
async def test_no_one_reads_another_identitys_replies(shared_bus, peers, snoop):
    """Each identity subscribes only under its own inbox prefix, so replies to the admin (or to
    n2, or the viewer) cannot be snooped, while their own request/reply works."""
    roster = files.load_roster(shared_bus.dir)
    spy = await peers(snoop)
    await _responder(await peers("controller"))
    victim = "viewer" if snoop == "admin" else "admin"
    calls = [(await peers(victim), naming.api_subject("status"))]
    calls.append((await peers("node:n2"), naming.node_api_subject("node.register", "n2")))
    for foreign in [
        "_INBOX.>",
        "_INBOX.*",
        f"_INBOX.{getattr(roster, victim)}.>",
        f"_INBOX.{roster.nodes['n2']}.>",
        f"_INBOX.{roster.controller}.>",
    ]:
        sub = await spy.nc.subscribe(foreign)
        await spy.wait_denied("subscription", foreign)
        for caller, subject in calls:
            await _request_ok(caller, subject)
        await spy.nc.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.2)


async def test_agent_without_its_inbox_prefix_gets_no_replies(shared_bus, peers):
    """The default ``_INBOX`` prefix is not allowed: clients must use ``connect_kwargs``."""
    await _responder(await peers("controller"))
    subject = naming.node_api_subject("node.register", "n1")
    await _request_ok(await peers("node:n1"), subject)
    kwargs = connect_kwargs(seed_of(shared_bus.dir, "node:n1"), shared_bus.dir / files.CA_CERT)
    del kwargs["inbox_prefix"]
    bare = await Peer("n1-default-inbox").connect(shared_bus.url, **kwargs)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await bare.nc.request(subject, b"{}", timeout=0.5)
        await bare.wait_error("Permissions Violation", "Subscription", "_INBOX.")
    finally:
        await bare.close()


# --- operators -------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", permissions.READ_ENDPOINTS)
async def test_viewer_calls_read_endpoints(peers, endpoint):
    await _responder(await peers("controller"))
    await _request_ok(await peers("viewer"), naming.api_subject(endpoint))


@pytest.mark.parametrize(
    "subject",
    [naming.api_subject(e) for e in MUTATING]
    + [naming.node_api_subject("node.register", "n1"), naming.api_subject("status.extra")],
)
async def test_viewer_cannot_mutate(peers, subject):
    admin, viewer = await peers("admin"), await peers("viewer")
    await _responder(await peers("controller"))
    await _request_ok(admin, subject)  # a real round trip through the controller's side
    with pytest.raises(nats.errors.TimeoutError):
        await viewer.nc.request(subject, b"{}", timeout=0.3)
    await viewer.wait_denied("publish", subject)


@pytest.mark.parametrize("subject_of", [naming.ack_subject, naming.health_subject])
@pytest.mark.parametrize("operator", ["viewer", "admin"])
async def test_operators_watch_acks_and_health(peers, operator, subject_of):
    await can_subscribe(
        await peers(operator), subject_of("*"), await peers("node:n1"), subject_of("n1")
    )


@pytest.mark.parametrize("operator", ["viewer", "admin"])
@pytest.mark.parametrize(
    "subject, watcher, allowed",
    [
        ("otherix.v1.desired.n1", "node:n1", "controller"),
        ("otherix.v1.ack.n1", "controller", "node:n1"),
        ("otherix.v1.health.n1", "controller", "node:n1"),
    ],
)
async def test_operators_cannot_forge_desired_state_acks_or_health(
    peers, operator, subject, watcher, allowed
):
    await cannot_publish(
        await peers(operator), subject, watcher=await peers(watcher), allowed=await peers(allowed)
    )


@pytest.mark.parametrize(
    "subject, watcher, allowed",
    [
        ("otherix.v1.ack.n1", "controller", "node:n1"),
        ("otherix.v1.health.n1", "viewer", "node:n1"),
        ("otherix.v1.api.network.create", "controller", "admin"),
    ],
)
async def test_controller_cannot_forge_reports_or_calls(peers, subject, watcher, allowed):
    """Its publish rights are desired state, the intent bucket and replies, nothing else."""
    await cannot_publish(
        await peers("controller"),
        subject,
        watcher=await peers(watcher),
        allowed=await peers(allowed),
    )


async def test_a_reply_in_flight_survives_a_reload(shared_bus, peers):
    """Adding or revoking a node reloads the server, which would forget allow_responses grants: the
    controller's reply to a request it received before the reload must still get through."""
    controller, admin = await peers("controller"), await peers("admin")
    received = asyncio.Queue()

    async def hold(msg):
        await received.put(msg)

    await controller.nc.subscribe(naming.api_subject("status"), cb=hold, queue="hold")

    async def ask():
        for _ in range(50):  # until the subscription is live (no flush() as proof)
            try:
                return await admin.nc.request(naming.api_subject("status"), b"{}", timeout=5)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        raise AssertionError("the controller's subscription never went live")

    reply = asyncio.ensure_future(ask())
    msg = await asyncio.wait_for(received.get(), 5)
    await shared_bus.reload()
    await msg.respond(b"after the reload")
    assert (await reply).data == b"after the reload"


@pytest.mark.parametrize("who", ["admin", "viewer", "node:n1"])
async def test_operators_and_agents_cannot_subscribe_desired_state(peers, who):
    if who == "node:n1":
        subject, right = naming.desired_subject("n2"), "node:n2"
    else:
        subject, right = naming.desired_subject("n1"), "node:n1"
    controller = await peers("controller")
    await can_subscribe(await peers(right), subject, controller)
    await cannot_subscribe(await peers(who), subject, controller)


async def test_admin_calls_every_endpoint_of_a_micro_service(peers):
    """The real ``nats.micro`` service under the controller's identity: queue group, $SRV and
    replies into callers' inboxes all pass; the admin reaches every endpoint."""
    controller, admin = await peers("controller"), await peers("admin")
    service = await nats.micro.add_service(
        controller.nc, name="otherix-networking", version="1.0.0", queue_group="otherix-controller"
    )
    try:

        async def echo(req):
            await req.respond(b"ok:" + req.subject.encode())

        subjects = [naming.api_subject(e) for e in api.ENDPOINTS]
        subjects += [naming.node_api_subject(e, "n1") for e in permissions.NODE_SCOPED_ENDPOINTS]
        for subject in subjects:
            await service.add_endpoint(
                name=subject.replace(".", "-"), subject=subject, handler=echo
            )
        for subject in subjects:
            await _request_ok(admin, subject)
        assert not controller.errors
    finally:
        await service.stop()


# --- JetStream: the controller's alone -------------------------------------------------------


@pytest_asyncio.fixture
async def intent_bucket(peers):
    """The intent bucket, created and written by the controller (the positive half of every
    $JS/$KV refusal below), removed at the end so tests do not see each other's keys."""
    js = (await peers("controller")).nc.jetstream(timeout=5)
    kv = await js.create_key_value(
        KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.MEMORY)
    )
    await kv.put("nodes.n1", b"original")
    assert (await kv.get("nodes.n1")).value == b"original"
    try:
        yield kv
    finally:
        await js.delete_key_value(BUCKET)


async def test_controller_uses_the_intent_bucket(peers, intent_bucket):
    await intent_bucket.put("nodes.n2", b"v1")
    await intent_bucket.delete("nodes.n2")
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await intent_bucket.get("nodes.n2")
    watcher = await intent_bucket.watchall()
    try:
        entry = await watcher.updates(timeout=5)
        assert entry is not None
    finally:
        await watcher.stop()
    js = (await peers("controller")).nc.jetstream(timeout=5)
    info = await js.stream_info(f"KV_{BUCKET}", subjects_filter=f"$KV.{BUCKET}.>")
    assert f"$KV.{BUCKET}.nodes.n1" in (info.state.subjects or {})
    assert not (await peers("controller")).errors


@pytest.mark.parametrize("who", ["admin", "viewer", "node:n1"])
async def test_nobody_else_touches_jetstream(peers, intent_bucket, who):
    peer = await peers(who)
    js = peer.nc.jetstream(timeout=0.5)
    with pytest.raises(nats.errors.TimeoutError):  # the request is dropped, no reply comes
        await js.key_value(BUCKET)
    await peer.wait_denied("publish", f"$JS.API.STREAM.INFO.KV_{BUCKET}")
    for subject in [f"$JS.API.STREAM.DELETE.KV_{BUCKET}", f"$JS.API.STREAM.PURGE.KV_{BUCKET}"]:
        await peer.nc.publish(subject, b"")
        await peer.wait_denied("publish", subject)
    await peer.nc.publish(f"$KV.{BUCKET}.nodes.n1", b"forged")
    await peer.wait_denied("publish", f"$KV.{BUCKET}.nodes.n1")
    await peer.nc.subscribe(f"$KV.{BUCKET}.>")
    await peer.wait_denied("subscription", f"$KV.{BUCKET}.>")
    # the controller's bucket and value are untouched, and it can still write
    assert (await intent_bucket.get("nodes.n1")).value == b"original"
    await intent_bucket.put("nodes.n1", b"updated")
    assert (await intent_bucket.get("nodes.n1")).value == b"updated"


@pytest.mark.parametrize("who", ["admin", "viewer", "node:n1"])
async def test_nobody_else_creates_a_bucket(peers, who):
    peer = await peers(who)
    with pytest.raises(nats.errors.TimeoutError):
        await peer.nc.jetstream(timeout=0.5).create_key_value(
            KeyValueConfig(bucket="stolen", storage=StorageType.MEMORY)
        )
    await peer.wait_denied("publish", "$JS.API.STREAM.CREATE.KV_stolen")
    js = (await peers("controller")).nc.jetstream(timeout=5)
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info("KV_stolen")


# --- connecting ------------------------------------------------------------------------------


async def test_no_identity_cannot_connect(shared_bus):
    ca = shared_bus.dir / files.CA_CERT
    ok = await Peer("viewer").connect(
        shared_bus.url, **connect_kwargs(seed_of(shared_bus.dir, "viewer"), ca)
    )
    await ok.close()
    with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):
        await Peer("anonymous").connect(shared_bus.url, **connect_kwargs(None, ca))


async def test_unknown_key_cannot_connect(shared_bus, tmp_path):
    ca = shared_bus.dir / files.CA_CERT
    ok = await Peer("n1").connect(
        shared_bus.url, **connect_kwargs(seed_of(shared_bus.dir, "node:n1"), ca)
    )
    await ok.close()
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(pki.new_user_seed())
    with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):
        await Peer("stranger").connect(shared_bus.url, **connect_kwargs(stranger, ca))


async def test_client_that_does_not_trust_the_ca_cannot_connect(shared_bus, tmp_path):
    seed = seed_of(shared_bus.dir, "admin")
    ok = await Peer("admin").connect(
        shared_bus.url, **connect_kwargs(seed, shared_bus.dir / files.CA_CERT)
    )
    await ok.close()
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(pki.new_ca()[0])
    for ca in [other_ca, None]:  # another CA, and the system's default trust store
        kwargs = connect_kwargs(seed, other_ca) if ca else connect_kwargs(seed, None)
        if ca is None:
            kwargs["tls"] = ssl.create_default_context()
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
            await Peer("distrustful").connect(shared_bus.url, **kwargs)


async def test_server_name_must_match_the_certificate(shared_bus):
    kwargs = connect_kwargs(seed_of(shared_bus.dir, "admin"), shared_bus.dir / files.CA_CERT)
    ok = await Peer("admin").connect(shared_bus.url, tls_hostname="localhost", **kwargs)
    await ok.close()
    with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
        await Peer("admin").connect(shared_bus.url, tls_hostname="nats.example", **kwargs)


async def test_renewed_certificate_is_served_after_reload(own_bus):
    server = own_bus
    kwargs = connect_kwargs(seed_of(server.dir, "admin"), server.dir / files.CA_CERT)
    with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
        await Peer("admin").connect(server.url, tls_hostname="nats.example", **kwargs)
    before = server.reloads()
    cli.main(
        ["renew-cert", str(server.dir), "--host", "nats.example", "--reload-pid", str(server.pid)]
    )
    await server.wait_reloaded(before)
    peer = await Peer("admin").connect(server.url, tls_hostname="nats.example", **kwargs)
    await peer.close()


async def test_client_without_tls_cannot_connect(shared_bus):
    kwargs = connect_kwargs(seed_of(shared_bus.dir, "admin"), None)
    with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
        await Peer("plaintext").connect(shared_bus.url, **kwargs)


# --- roster changes at runtime ---------------------------------------------------------------


async def test_revoked_node_is_refused_and_cut_off_without_a_restart(own_bus, tmp_path):
    server, pid = own_bus, own_bus.pid
    ca = server.dir / files.CA_CERT
    kept = tmp_path / "n2-kept.nk"  # a revoked node still has its seed
    kept.write_bytes(seed_of(server.dir, "node:n2").read_bytes())
    n2_kwargs = connect_kwargs(kept, ca)
    controller, n1 = await connect_as(server, "controller"), await connect_as(server, "node:n1")
    n2 = await Peer("node:n2").connect(server.url, **n2_kwargs)
    try:
        await can_subscribe(n2, naming.desired_subject("n2"), controller)

        files.revoke_node(server.dir, "n2")
        assert not seed_of(server.dir, "node:n2").exists()
        await server.reload()

        await asyncio.wait_for(n2.closed.wait(), timeout=5)  # the live connection is cut
        with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):
            await Peer("node:n2 again").connect(server.url, **n2_kwargs)
        assert server.pid == pid and server.proc.poll() is None
        await can_subscribe(n1, naming.desired_subject("n1"), controller)  # others unaffected
    finally:
        for peer in (controller, n1, n2):
            await peer.close()


async def test_node_added_at_runtime_can_connect_after_reload(own_bus):
    server, pid = own_bus, own_bus.pid
    seed = files.add_node(server.dir, "n3")
    kwargs = connect_kwargs(seed, server.dir / files.CA_CERT)
    with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):  # not before the reload
        await Peer("node:n3").connect(server.url, **kwargs)
    before = server.reloads()
    cli.main(["render", str(server.dir), "--reload-pid", str(pid)])  # as an operator would
    await server.wait_reloaded(before)
    controller, n1 = await connect_as(server, "controller"), await connect_as(server, "node:n1")
    n3 = await Peer("node:n3").connect(server.url, **kwargs)
    try:
        await can_subscribe(n3, naming.desired_subject("n3"), controller)
        await can_publish(n3, naming.ack_subject("n3"), watcher=controller)
        await cannot_publish(n3, naming.ack_subject("n1"), watcher=controller, allowed=n1)
        assert server.pid == pid
    finally:
        for peer in (controller, n1, n3):
            await peer.close()


async def test_extra_configuration_keeps_users_and_tls(tmp_path):
    """The lab's and tests' settings (here max_payload) layer over the bus configuration."""
    files.init(tmp_path / "bus", nodes=("n1",))
    server = BusServer(tmp_path / "bus", extra="max_payload: 65536")
    server.start()
    try:
        controller = await connect_as(server, "controller")
        n1 = await connect_as(server, "node:n1")
        assert controller.nc.max_payload == 65536
        await can_subscribe(n1, naming.desired_subject("n1"), controller)
        with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):
            await Peer("anonymous").connect(
                server.url, **connect_kwargs(None, tmp_path / "bus" / files.CA_CERT)
            )
        for peer in (controller, n1):
            await peer.close()
    finally:
        server.stop()


def test_every_identity_in_the_roster_has_a_seed_file(shared_bus):
    roster = files.load_roster(shared_bus.dir)
    for who in IDENTITIES:
        seed = seed_of(shared_bus.dir, who).read_bytes()
        label = who.removeprefix("node:")
        expected = roster.nodes[label] if who.startswith("node:") else getattr(roster, who)
        assert pki.public_key(seed) == expected
    assert msgspec.json.decode((shared_bus.dir / files.ROSTER).read_bytes())["bucket"] == BUCKET


async def test_a_proxy_cannot_strip_tls(shared_bus):
    """A man in the middle answers in clear with an INFO that does not ask for TLS (the
    downgrade that let a proxy relay a signed CONNECT, found by review). TLS comes first on
    both sides, so the client's first bytes are a TLS ClientHello, never a CONNECT in clear;
    the same identity straight to the server connects."""
    first_bytes: list[bytes] = []

    async def downgrading_proxy(reader, writer):
        writer.write(b'INFO {"server_id":"mitm","nonce":"abc","auth_required":true}\r\n')
        await writer.drain()
        first_bytes.append(await reader.read(64))
        writer.close()

    proxy = await asyncio.start_server(downgrading_proxy, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    kwargs = connect_kwargs(seed_of(shared_bus.dir, "controller"), shared_bus.dir / files.CA_CERT)
    try:
        with pytest.raises((nats.errors.NoServersError, OSError)):
            await nats.connect(
                f"nats://127.0.0.1:{port}", **kwargs, connect_timeout=3, allow_reconnect=False
            )
    finally:
        proxy.close()
    assert first_bytes and first_bytes[0][:1] == b"\x16"  # a TLS handshake record
    assert b"CONNECT" not in first_bytes[0]
    direct = await nats.connect(shared_bus.url, **kwargs, connect_timeout=3)
    try:
        assert direct.is_connected and direct.connected_url.port == shared_bus.port
    finally:
        await direct.close()
