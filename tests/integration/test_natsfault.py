"""The fault proxy (lab.natsfault) in front of a real secured nats-server: TLS terminated and
re-originated, nkey identities and permissions still enforced end to end, frame faults seeded and
replayable, connection faults (cut, partition, stall), and the proxy as a process."""

import asyncio
import json
import os
import random
import secrets

import nats
import pytest

from client.bus import files as bus_files
from lab.natsfault import (
    MAX_PAYLOAD,
    FaultProxy,
    FrameEvent,
    Parser,
    ProtocolError,
    control,
    subject_matches,
)
from lab.netns import python_module, spawn, wait_ready
from schemas import naming
from schemas.bus import tls_context
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)

ACK1, HEALTH1 = naming.ack_subject("n1"), naming.health_subject("n1")


@pytest.fixture
async def proxy(nats_server):
    async with FaultProxy(("127.0.0.1", nats_server.port), tls_dir=nats_server.bus_dir) as p:
        yield p


async def via(proxy: FaultProxy, server, identity: str, **kw):
    """A client of ``identity`` connected through the proxy (closed with the server's clients)."""
    options = {"connect_timeout": 5, "reconnect_time_wait": 0.1, "max_reconnect_attempts": -1}
    client = await nats.connect(proxy.url, **server.kwargs(identity), **options | kw)
    server.clients.append(client)
    return client


async def live(publisher, subject: str, seen: asyncio.Queue) -> None:
    """Publish probes on ``subject`` until one arrives in ``seen`` (DESIGN.md: flush() is no
    proof that a subscription is in place); probes are drained."""
    async with asyncio.timeout(10):
        while True:
            await publisher.publish(subject, b"probe")
            try:
                await asyncio.wait_for(seen.get(), 0.2)
                break
            except TimeoutError:
                continue
    await asyncio.sleep(0.2)
    while not seen.empty():
        seen.get_nowait()


async def queue_sub(client, subject: str) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg):
        queue.put_nowait(msg)

    await client.subscribe(subject, cb=on_msg)
    return queue


# --- pure parts ----------------------------------------------------------------------------------


def test_subject_patterns():
    assert subject_matches("otherix.v1.desired.*", "otherix.v1.desired.n1")
    assert subject_matches("otherix.>", "otherix.v1.ack.n1")
    assert not subject_matches("otherix.>", "otherix")
    assert not subject_matches("otherix.v1.desired.*", "otherix.v1.desired.n1.x")
    assert not subject_matches("otherix.v1.desired.n1", "otherix.v1.desired.n10")


def test_parser_splits_pipelined_and_partial_frames():
    wire = (
        b"PUB a.b 5\r\nhello\r\nPING\r\nHPUB c _INBOX.x 12 15\r\nNATS/1.0\r\n\r\nabc\r\n"
        b"MSG d 7 r 2\r\n\r\n\r\n"
    )
    for step in (1, 3, 7, len(wire)):  # every way of cutting the stream gives the same frames
        parser, frames = Parser(), []
        for i in range(0, len(wire), step):
            frames += parser.feed(wire[i : i + step])
        assert [f.op for f in frames] == ["PUB", "PING", "HPUB", "MSG"]
        assert b"".join(f.raw for f in frames) == wire
        hpub, msg = frames[2], frames[3]
        assert (hpub.subject, hpub.reply, hpub.body()) == (
            "c",
            "_INBOX.x",
            (b"NATS/1.0\r\n\r\n", b"abc"),
        )
        assert (msg.reply, msg.body()) == ("r", (b"", b"\r\n"))  # a payload may hold CRLF


def test_parser_takes_only_ascii_digits_as_a_size_and_refuses_a_huge_one():
    frames = Parser().feed(b"PUB a \xc2\xb2\r\nPING\r\n")  # '²' isdigit() but is no size
    assert [f.op for f in frames] == ["PUB", "PING"] and frames[0].head == 0
    assert len(Parser().feed(b"PUB a %d\r\n" % MAX_PAYLOAD)) == 0  # waits for the payload
    with pytest.raises(ProtocolError):
        Parser().feed(b"PUB a %d\r\n" % (MAX_PAYLOAD + 1))


def fates(proxy: FaultProxy, order: list[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """(identity, subject) → the fate of each of its frames, in its own order."""
    out: dict[tuple[str, str], list[str]] = {}
    for identity, subject in order:
        rule, jitter = proxy.decide(identity, "to_server", subject)
        fate = "passed" if rule is None else f"{rule.action} {jitter:.6f}"
        out.setdefault((identity, subject), []).append(fate)
    return out


def test_decisions_replay_per_subject_however_publishers_interleave():
    streams = [("n1", ACK1), ("n2", naming.ack_subject("n2")), ("n1", HEALTH1)]
    in_turn = [s for s in streams for _ in range(100)]
    mixed = in_turn[:]
    random.Random(7).shuffle(mixed)  # another interleaving, each stream's own order kept
    runs = []
    for order in (in_turn, mixed):
        proxy = FaultProxy(("127.0.0.1", 1), seed=42)
        proxy.add_rule("delay", "otherix.v1.ack.*", p=0.3, jitter=1.0)
        proxy.add_rule("drop", ">", p=0.5)
        runs.append(fates(proxy, order))
    assert runs[0] == runs[1]
    assert {f.split()[0] for fs in runs[0].values() for f in fs} == {"passed", "delay", "drop"}


# --- through the proxy ---------------------------------------------------------------------------


async def test_pub_sub_and_request_reply_with_tls_and_identities(nats_server, proxy):
    events: list[FrameEvent] = []
    proxy.observe(events.append)
    controller = await via(proxy, nats_server, "controller")
    admin = await via(proxy, nats_server, "admin")
    n1 = await via(proxy, nats_server, "n1")

    async def answer(msg):
        await msg.respond(b"pong:" + msg.data)

    await controller.subscribe(naming.api_subject("test"), cb=answer)
    async with asyncio.timeout(10):
        while True:  # request/reply through the proxy, both ways TLS
            try:
                reply = await admin.request(naming.api_subject("test"), b"hi", timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.05)  # the responder's subscription is not in place yet
    assert reply.data == b"pong:hi"

    desired = await queue_sub(n1, naming.desired_subject("n1"))
    await live(controller, naming.desired_subject("n1"), desired)
    await controller.publish(naming.desired_subject("n1"), b"state")
    assert (await asyncio.wait_for(desired.get(), 5)).data == b"state"
    by_op = {(e.identity, e.direction, e.op, e.subject) for e in events}
    assert ("controller", "to_server", "PUB", naming.desired_subject("n1")) in by_op
    assert ("n1", "to_client", "MSG", naming.desired_subject("n1")) in by_op
    assert {"controller", "admin", "n1"} <= set(proxy.stats()["connections"])

    # the server still enforces n1's permissions: it may not publish desired state
    errors: asyncio.Queue = asyncio.Queue()

    async def on_error(e):
        errors.put_nowait(str(e))

    forger = await via(proxy, nats_server, "n1", error_cb=on_error)
    await forger.publish(naming.desired_subject("n2"), b"forged")
    await forger.flush()
    assert "permissions violation" in (await asyncio.wait_for(errors.get(), 5)).lower()


async def drop_run(nats_server, seed: int) -> tuple[set[int], int, set[int], set[int]]:
    """200 acks from n1 through a proxy dropping 30 % of them; (lost, rule's count, observed
    as dropped, health messages received)."""
    async with FaultProxy(
        ("127.0.0.1", nats_server.port), tls_dir=nats_server.bus_dir, seed=seed
    ) as proxy:
        observed = set()
        proxy.observe(lambda e: e.fate == "dropped" and observed.add(int(e.payload)))
        admin = await nats_server.connect("admin")  # the test's own view: straight to the server
        acks, healths = await queue_sub(admin, ACK1), await queue_sub(admin, HEALTH1)
        n1 = await via(proxy, nats_server, "n1")
        await live(n1, HEALTH1, healths)
        rule = proxy.add_rule("drop", ACK1, direction="to_server", p=0.3)
        for i in range(200):
            await n1.publish(ACK1, str(i).encode())
            await n1.publish(HEALTH1, str(i).encode())
        await n1.publish(HEALTH1, b"end")  # same connection: arrives after every ack
        got, health = set(), set()
        async with asyncio.timeout(10):
            while (msg := await healths.get()).data != b"end":
                health.add(int(msg.data))
        while not acks.empty():
            got.add(int(acks.get_nowait().data))
        await n1.close()
        await admin.close()
        return set(range(200)) - got, rule.dropped, observed, health


async def test_drop_by_subject_replays_with_the_same_seed(nats_server):
    lost, counted, observed, health = await drop_run(nats_server, seed=42)
    assert 30 <= len(lost) <= 90, len(lost)  # p=0.3 of 200: 60 ± 4.5 sigma
    assert counted == len(lost) and observed == lost
    assert health == set(range(200))  # another subject is left alone
    again, *_ = await drop_run(nats_server, seed=42)
    assert again == lost  # the same frames under the same seed
    other, *_ = await drop_run(nats_server, seed=43)
    assert other != lost


async def two_publishers(nats_server, interleaved: bool) -> dict[str, set[int]]:
    """n1 and n2 each publish 100 acks through a proxy dropping 30 % of acks, one after the
    other or interleaved; subject → the numbers dropped."""
    acks = [naming.ack_subject(n) for n in ("n1", "n2")]
    async with FaultProxy(
        ("127.0.0.1", nats_server.port), tls_dir=nats_server.bus_dir, seed=42
    ) as proxy:
        dropped: dict[str, set[int]] = {a: set() for a in acks}
        proxy.observe(lambda e: e.fate == "dropped" and dropped[e.subject].add(int(e.payload)))
        nodes = [await via(proxy, nats_server, n) for n in ("n1", "n2")]
        proxy.add_rule("drop", "otherix.v1.ack.*", direction="to_server", p=0.3)
        if interleaved:
            for i in range(100):
                for node, subject in zip(nodes, acks, strict=True):
                    await node.publish(subject, str(i).encode())
                    await node.flush()  # the proxy sees them in this order
        else:
            for node, subject in zip(nodes, acks, strict=True):
                for i in range(100):
                    await node.publish(subject, str(i).encode())
                await node.flush()
        for node in nodes:
            await node.close()
        return dropped


async def test_two_publishers_interleaving_differently_get_the_same_fates(nats_server):
    one_after_the_other = await two_publishers(nats_server, interleaved=False)
    interleaved = await two_publishers(nats_server, interleaved=True)
    assert all(15 <= len(d) <= 45 for d in interleaved.values()), interleaved
    assert interleaved == one_after_the_other


async def test_a_frame_declaring_a_huge_payload_closes_its_connection(nats_server, proxy):
    ctx = tls_context(nats_server.bus_dir / bus_files.CA_CERT)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=ctx, server_hostname="127.0.0.1"
    )
    writer.write(b"PUB x %d\r\n" % (MAX_PAYLOAD + 1))
    await writer.drain()
    async with asyncio.timeout(5):
        while await reader.read(65536):  # the server's INFO, then the end
            pass
    writer.close()


async def test_duplicate_to_client_delivers_copies(nats_server, proxy):
    admin = await via(proxy, nats_server, "admin")
    acks = await queue_sub(admin, ACK1)
    n1 = await nats_server.connect("n1")
    await live(n1, ACK1, acks)
    rule = proxy.add_rule("duplicate", ACK1, direction="to_client", identity="admin", copies=2)
    for i in range(5):
        await n1.publish(ACK1, str(i).encode())
    got = [int((await asyncio.wait_for(acks.get(), 5)).data) for _ in range(15)]
    assert got == [i for i in range(5) for _ in range(3)]
    assert (rule.matched, rule.duplicated) == (5, 5)


async def test_delay_reorders(nats_server, proxy):
    admin = await nats_server.connect("admin")
    acks = await queue_sub(admin, ACK1)
    n1 = await via(proxy, nats_server, "n1")
    await live(n1, ACK1, acks)
    delivered: list[int] = []  # the order the proxy wrote them on
    proxy.observe_delivered(lambda e: delivered.append(int(e.payload)))
    proxy.add_rule("delay", ACK1, delay=1.0, jitter=0.1, count=1)
    for i in range(5):
        await n1.publish(ACK1, str(i).encode())
    got = [int((await asyncio.wait_for(acks.get(), 5)).data) for _ in range(5)]
    assert got == [1, 2, 3, 4, 0] == delivered
    assert proxy.stats()["rules"][0]["delayed"] == 1


async def test_headers_and_a_large_payload_pass_byte_exact(nats_server, proxy):
    events: list[FrameEvent] = []
    proxy.observe(events.append)
    controller = await via(proxy, nats_server, "controller")
    n1 = await via(proxy, nats_server, "n1")
    subject = naming.desired_subject("n1")
    desired = await queue_sub(n1, subject)
    await live(controller, subject, desired)
    big = os.urandom(1_000_000)
    payloads = [big, b"", b"\r\nMSG x 1 2\r\n", big[::-1]]  # pipelined, one frame mimics another
    for i, data in enumerate(payloads):
        await controller.publish(subject, data, headers={"Otherix-Seq": str(i)})
    for i, data in enumerate(payloads):
        msg = await asyncio.wait_for(desired.get(), 10)
        assert msg.data == data and msg.headers == {"Otherix-Seq": str(i)}
    seen = [e for e in events if e.op in ("HPUB", "HMSG") and e.subject == subject]
    assert [e.payload for e in seen if e.op == "HPUB"] == payloads
    assert [e.payload for e in seen if e.op == "HMSG"] == payloads
    assert b"Otherix-Seq: 3" in seen[-1].headers


async def test_cut_partition_and_heal(nats_server, proxy):
    reconnected: asyncio.Queue = asyncio.Queue()

    async def on_reconnect():
        reconnected.put_nowait(True)

    n1 = await via(proxy, nats_server, "n1", reconnected_cb=on_reconnect)
    admin = await nats_server.connect("admin")
    acks = await queue_sub(admin, ACK1)
    await live(n1, ACK1, acks)

    assert proxy.cut("n1") == 1
    await asyncio.wait_for(reconnected.get(), 5)  # a cut connection comes back at once

    assert proxy.partition("n1") == 1
    await asyncio.sleep(1.5)  # many reconnect attempts (every 0.1 s), each refused
    assert reconnected.empty() and "n1" not in proxy.stats()["connections"]
    proxy.heal("n1")
    await asyncio.wait_for(reconnected.get(), 5)
    await live(n1, ACK1, acks)


async def test_stall_holds_traffic_and_loses_nothing(nats_server, proxy):
    n1 = await via(proxy, nats_server, "n1")
    admin = await nats_server.connect("admin")
    acks = await queue_sub(admin, ACK1)
    await live(n1, ACK1, acks)
    proxy.stall("n1")
    for i in range(3):
        await n1.publish(ACK1, str(i).encode())
    await asyncio.sleep(0.7)
    assert acks.empty()
    proxy.unstall("n1")
    got = [int((await asyncio.wait_for(acks.get(), 5)).data) for _ in range(3)]
    assert got == [0, 1, 2]


async def test_a_restarted_server_is_reached_again_through_the_proxy(nats_server, proxy):
    reconnected: asyncio.Queue = asyncio.Queue()

    async def on_reconnect():
        reconnected.put_nowait(True)

    n1 = await via(proxy, nats_server, "n1", reconnected_cb=on_reconnect)
    admin = await nats_server.connect("admin")
    acks = await queue_sub(admin, ACK1)
    await live(n1, ACK1, acks)
    nats_server.restart()  # the proxy closes n1's connection; n1 comes back through it
    await asyncio.wait_for(reconnected.get(), 10)
    await live(n1, ACK1, acks)
    assert proxy.stats()["connections"] == ["n1"]


async def test_plaintext_mode_names_identities(open_nats_server):
    async with FaultProxy(("127.0.0.1", open_nats_server.port)) as proxy:
        agent = await nats.connect(proxy.url, name="otherix-agent-n1")
        admin = await nats.connect(open_nats_server.url)
        try:
            acks = await queue_sub(admin, ACK1)
            proxy.add_rule("drop", ACK1, identity="n1")
            await agent.publish(ACK1, b"x")
            await agent.publish(HEALTH1, b"y")
            await agent.flush()
            await asyncio.sleep(0.3)
            assert acks.empty() and proxy.rules[0].dropped == 1
            assert proxy.stats()["connections"] == ["n1"]
        finally:
            await agent.close()
            await admin.close()


async def test_the_proxy_as_a_process(nats_server, tmp_path):
    port, sock = free_port(), tmp_path / f"c{secrets.token_hex(2)}.sock"
    ready = tmp_path / "ready"
    argv = python_module(
        "lab.natsfault", "--listen", str(port), "--upstream", f"127.0.0.1:{nats_server.port}",
        "--tls-dir", str(nats_server.bus_dir), "--control", str(sock), "--seed", "5",
        "--ready-file", str(ready),
    )  # fmt: skip
    proc = await spawn(argv, state_dir=tmp_path, name="natsfault")
    try:
        await wait_ready(proc, ready, 10.0, tmp_path / "natsfault.log")
        answer = await control(sock, {"cmd": "add_rule", "action": "drop", "subject": ACK1})
        assert answer["ok"] and answer["rule"] == 0
        bad = await control(sock, {"cmd": "add_rule", "action": "explode"})
        assert not bad["ok"] and "explode" in bad["error"]
        n1 = await nats.connect(f"nats://127.0.0.1:{port}", **nats_server.kwargs("n1"))
        nats_server.clients.append(n1)
        admin = await nats_server.connect("admin")
        healths, acks = await queue_sub(admin, HEALTH1), await queue_sub(admin, ACK1)
        await live(n1, HEALTH1, healths)
        await n1.publish(ACK1, b"lost")
        await n1.publish(HEALTH1, b"end")
        assert (await asyncio.wait_for(healths.get(), 5)).data == b"end" and acks.empty()
        stats = await control(sock, {"cmd": "stats"})
        assert stats["seed"] == 5 and stats["rules"][0]["dropped"] == 1
        assert stats["connections"] == ["n1"]
        assert (await control(sock, {"cmd": "clear"}))["ok"]
        assert json.dumps((await control(sock, {"cmd": "stats"}))["rules"]) == "[]"
    finally:
        proc.terminate()
        await proc.wait()
