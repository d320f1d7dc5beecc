"""The agent's steady state: which heartbeats skip the full reconcile, and which must not.

The decision (``agent.steady.decide``) is a table; the notification filter
(``agent.kernel_events.touches_ours``) is fed crafted netlink datagrams; the agent runs on the
fake kernel with a stand-in for the notifications, and every kernel read is counted.
"""

import asyncio
import socket
import struct

import msgspec
import pytest

from agent.assemble import head_for
from agent.kernel_events import Echoes, fdb_echo, touches_ours
from agent.links.applier import LinkApplier
from agent.links.model import Link, Observed
from agent.runner import Agent, AgentConfig
from agent.steady import FULL, QUIET, SKIP, decide, same_snapshot
from agent.validate import same_content
from agent.wireguard import keys as wgkeys
from agent.wireguard.applier import WireGuardApplier
from controller.compute import snapshot_digest
from schemas.codec import encode
from schemas.desired import Bridge, Tap, WgPeer, WireGuard
from tests.unit.fake_kernel import FakeKernel
from tests.unit.test_subsystems import AGENT_SNAP, BR, TAP, FakeNats, FakeNft

pytestmark = pytest.mark.timeout(20)

SNAP = msgspec.structs.replace(AGENT_SNAP, digest=snapshot_digest(AGENT_SNAP))


def wire(snap) -> bytes:
    """What ``otherix.v1.desired.<node>`` carries: a HEAD, here with its sections attached."""
    return encode(head_for(snap))


RAW = wire(SNAP)

# --- the decision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("same", "clean", "changed", "since", "mode"),
    [
        (True, True, False, 0, SKIP),  # the steady state
        (True, True, False, 118, SKIP),
        (True, True, False, 119, FULL),  # the periodic resync (RESYNC_EVERY = 120)
        (True, True, True, 0, FULL),  # a notification: drift by hand
        (True, False, False, 0, FULL),  # the last heartbeat wrote (or failed): check it took
        (False, True, False, 0, QUIET),  # new content on a quiet kernel: plan against the read
        (False, True, True, 0, FULL),
        (False, False, False, 0, FULL),
        (False, True, False, 119, FULL),
    ],
)
def test_decide(same, clean, changed, since, mode):
    got, why = decide(same_content=same, clean=clean, kernel_changed=changed, since_full=since)
    assert got == mode and why


def test_same_content_by_bytes_or_by_version_and_digest():
    assert not same_content(RAW, None, None)
    assert same_content(RAW, RAW, SNAP)
    restamped = encode(msgspec.structs.replace(SNAP, published_at=123.0))
    assert restamped != RAW and same_content(restamped, RAW, SNAP)
    for changed in (
        msgspec.structs.replace(SNAP, version=SNAP.version + 1),
        msgspec.structs.replace(SNAP, digest="0" * 16),
        msgspec.structs.replace(SNAP, node="n2"),
    ):
        assert not same_content(encode(changed), RAW, SNAP)
    assert not same_content(b"\xff not json", RAW, SNAP)
    # a HEAD: the heartbeat's (no sections attached) has the content of the change's
    head = head_for(SNAP)
    heartbeat = encode(msgspec.structs.replace(head, sections=(), published_at=123.0))
    assert heartbeat != encode(head) and same_content(heartbeat, encode(head), SNAP)
    moved = msgspec.structs.replace(head, version=SNAP.version + 1, sections=())
    assert not same_content(encode(moved), encode(head), SNAP)
    no_digest = msgspec.structs.replace(SNAP, digest="")
    assert not same_content(encode(msgspec.structs.replace(no_digest, published_at=1.0)),
                            encode(no_digest), no_digest)  # fmt: skip


# --- the notification filter --------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    padded = value + b"\0" * (-len(value) % 4)
    return struct.pack("=HH", 4 + len(value), kind) + padded


def _msg(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def link(kind: int, index: int, name: bytes) -> bytes:
    return _msg(kind, struct.pack("=BxHiII", 0, 1, index, 0, 0) + _attr(3, name + b"\0"))


def neigh(family: int, index: int) -> bytes:
    return _msg(28, struct.pack("=BxxxiHBB", family, index, 0x40, 0, 0))


def addr(index: int) -> bytes:
    return _msg(20, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, index))


def nft(table: bytes, msg: int = 6) -> bytes:  # NFT_MSG_NEWRULE
    return _msg(10 << 8 | msg, struct.pack("=BBH", 1, 0, 0) + _attr(1, table + b"\0"))


def netconf(index: int) -> bytes:
    return _msg(80, struct.pack("=Bxxx", socket.AF_INET) + _attr(1, struct.pack("=i", index)))


@pytest.mark.parametrize(
    ("data", "ours"),
    [
        (link(16, 7, b"otb1000"), True),
        (link(17, 7, b"otvx1000"), True),
        (link(16, 9, b"eth0"), False),
        (link(16, 5, b"renamed"), True),  # index 5 was ours
        (neigh(7, 5), True),  # an FDB entry on our device
        (neigh(7, 9), False),  # ... on a foreign one
        (neigh(socket.AF_INET, 5), False),  # ARP on our bridge is not state we own
        (addr(5), True),
        (addr(9), False),
        (nft(b"otherix"), True),
        (nft(b"filter"), False),
        (netconf(-1), True),  # net.ipv4.ip_forward
        (netconf(9), False),  # a foreign device's own settings
        (link(16, 9, b"eth0") + nft(b"otherix"), True),  # one datagram, several messages
        (b"\x00" * 8, False),  # truncated: ignored, never a crash
    ],
    ids=["ot link", "ot link deleted", "foreign link", "renamed away", "fdb on ours",
         "fdb on foreign", "arp on ours", "address on ours", "foreign address", "nft ours",
         "nft foreign", "forwarding", "foreign netconf", "two messages", "truncated"],
)  # fmt: skip
def test_touches_ours(data, ours):
    assert touches_ours(data, {5}) is ours


def test_a_new_ot_link_teaches_its_index():
    managed = {5}
    touches_ours(link(16, 11, b"ot0123456789ab"), managed)
    assert managed == {5, 11} and touches_ours(neigh(7, 11), managed)


# captured from a real kernel: the two datagrams ``nft add table inet otherix; add chain inet
# otherix c`` (run as pid 3260) sent to an NFNLGRP_NFTABLES subscriber: NEWTABLE + NEWCHAIN, then
# the transaction's NEWGEN (NFTA_GEN_ID, NFTA_GEN_PROC_PID 3260 big-endian, PROC_NAME "nft")
NFT_COMMIT = bytes.fromhex(
    "3c000000000a000001000000bc0c0000010000020c0001006f7468657269780008000300000000010c0004000000"
    "00000000000108000200000000003c000000030a000402000000bc0c0000010000020c0001006f74686572697800"
    "06000300630000000c00020000000000000000010800060000000000"
)
NFT_NEWGEN = bytes.fromhex(
    "2c0000000f0a000001000000bc0c00000000000208000100000000020800020000000cbc080003006e667400"
)


@pytest.mark.parametrize(
    ("pids", "ours"),
    [(set(), True), ({3260}, False), ({3261}, True), ({17, 3260}, False)],
    ids=["no nft of ours", "our nft", "another process", "one of ours"],
)
def test_an_nft_commit_is_an_echo_only_when_its_newgen_names_our_nft(pids, ours):
    echoes = Echoes(nft_pids=frozenset(pids))
    first = touches_ours(NFT_COMMIT, set(), echoes)  # its NEWGEN comes in the next datagram
    assert touches_ours(NFT_NEWGEN, set(), echoes) or first is ours
    assert not echoes.nft_pending


def test_an_nft_commit_without_its_newgen_is_news():
    echoes = Echoes(nft_pids=frozenset({3260}))
    assert not touches_ours(NFT_COMMIT, set(), echoes) and echoes.nft_pending  # drain: news
    assert not touches_ours(NFT_NEWGEN.replace(b"\x0c\xbc", b"\x0c\xbd"), set(), Echoes())


def test_events_of_devices_we_wrote_are_echoes_and_nothing_else():
    managed = {5}
    echoes = Echoes(devices=frozenset({b"ot0000000000a1"}), indexes={3})
    assert not touches_ours(link(16, 11, b"ot0000000000a1"), managed, echoes)  # by name: learnt
    assert echoes.indexes == {3, 11} and managed == {5, 11}
    for event in (
        neigh(7, 11),
        addr(11),
        netconf(11),
        neigh(7, 3),
        link(17, 11, b"ot0000000000a1"),
    ):
        assert not touches_ours(event, managed, echoes)
    assert touches_ours(link(16, 11, b"renamed"), managed, echoes)  # not as we wrote it
    assert touches_ours(neigh(7, 5), managed, echoes)  # another port
    assert touches_ours(netconf(-1), managed, echoes)
    assert touches_ours(link(16, 12, b"ot0000000000b2"), managed, echoes)


def bridge_event(up: bool, mtu: int, master: int | None = None, family: int = 0) -> bytes:
    attrs = _attr(3, b"otn0a0b0c0d\0") + _attr(4, struct.pack("=I", mtu))
    attrs += _attr(10, struct.pack("=I", master)) if master else b""
    return _msg(16, struct.pack("=BxHiII", family, 1, 3, int(up), 0) + attrs)


def test_a_bridge_announced_as_we_know_it_is_not_news():
    """The kernel's deferred operstate news of a bridge after a port came or went."""
    bridges = {3: (b"otn0a0b0c0d", True, 1500)}
    assert not touches_ours(bridge_event(True, 1500), {3}, None, bridges)
    assert touches_ours(bridge_event(False, 1500), {3}, None, bridges)  # downed
    assert touches_ours(bridge_event(True, 1400), {3}, None, bridges)  # MTU changed
    assert touches_ours(bridge_event(True, 1500, master=9), {3}, None, bridges)  # enslaved
    assert touches_ours(bridge_event(True, 1500, family=7), {3}, None, bridges)  # bridge info
    assert touches_ours(bridge_event(True, 1500), {3})  # not known


# --- the agent ----------------------------------------------------------------------------------


class Events:
    """Stands in for ``KernelEvents``: ``changed`` is what the next ``drain`` says."""

    def __init__(self):
        self.changed = False
        self.drains = 0

    def drain(self, echoes=None) -> bool:
        self.drains += 1
        changed, self.changed = self.changed, False
        return changed

    def know(self, indexes, bridges=None) -> None:
        pass

    def close(self) -> None:
        pass


class CountingKernel(FakeKernel):
    def __init__(self):
        super().__init__()
        self.observes = 0

    async def observe(self):
        self.observes += 1
        return await super().observe()


def agent_on_fakes(tmp_path, events=None):
    kernel, nft, events = CountingKernel(), FakeNft(), events or Events()
    config = AgentConfig(node="n1", state_dir=tmp_path)
    agent = Agent(FakeNats(), config, LinkApplier(kernel), nft, events=events)  # type: ignore[arg-type]
    return agent, kernel, nft, events


async def converge(agent) -> None:
    assert (await agent.handle(RAW)).changes > 0  # cold
    assert (await agent.handle(RAW)).changes == 0  # the heartbeat after a write checks it


async def test_unchanged_heartbeats_read_and_write_nothing(tmp_path):
    agent, kernel, nft, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    observes, writes, runs = kernel.observes, kernel.writes, len(nft.runs)
    for _ in range(5):
        ack = await agent.handle(RAW)
        assert ack.ok and ack.changes == 0 and ack.version == SNAP.version
    assert (kernel.observes, kernel.writes, len(nft.runs)) == (observes, writes, runs)
    health = await agent.health()
    assert (health.heartbeats_skipped, health.heartbeats_reconciled) == (5, 2)


async def test_a_notification_makes_the_next_heartbeat_repair_drift(tmp_path):
    agent, kernel, nft, events = agent_on_fakes(tmp_path)
    await converge(agent)
    await agent.handle(RAW)
    kernel.links[TAP] = msgspec.structs.replace(kernel.links[TAP], mtu=1300)  # by hand
    nft.rules = None  # ... and a flushed table
    events.changed = True
    ack = await agent.handle(RAW)
    assert ack.ok and ack.changes == 2  # the MTU and one nft transaction
    assert kernel.links[TAP].mtu == 1390 and nft.rules


async def test_without_notifications_every_heartbeat_reads_the_kernel(tmp_path):
    kernel, nft = CountingKernel(), FakeNft()
    agent = Agent(FakeNats(), AgentConfig(node="n1", state_dir=tmp_path), LinkApplier(kernel), nft)  # type: ignore[arg-type]
    await converge(agent)
    before = kernel.observes
    for _ in range(3):
        await agent.handle(RAW)
    assert kernel.observes == before + 3


async def test_the_safety_net_reads_the_kernel_every_resync_heartbeats(tmp_path, monkeypatch):
    monkeypatch.setattr("agent.runner.decide", _decide_every(4))
    agent, kernel, _, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    before = kernel.observes
    for _ in range(8):
        await agent.handle(RAW)
    assert kernel.observes == before + 2


def _decide_every(k):
    return lambda **kw: decide(**kw, resync_every=k)


async def test_new_content_on_a_quiet_kernel_is_planned_without_reading_it(tmp_path):
    agent, kernel, nft, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    await agent.handle(RAW)
    tap2 = Tap(name="ot0123456789ac", bridge=BR, mtu=1390)
    new = msgspec.structs.replace(SNAP, version=SNAP.version + 1, taps=(*SNAP.taps, tap2))
    new = msgspec.structs.replace(new, digest=snapshot_digest(new))
    observes, runs = kernel.observes, len(nft.runs)
    ack = await agent.handle(wire(new))
    assert ack.ok and ack.changes > 0 and tap2.name in kernel.links
    assert kernel.observes == observes  # no dump: the kernel was as last read
    assert len(nft.runs) > runs  # one load
    # the tap written was read back (links.plan.settle): the heartbeat after reads nothing whole
    assert (await agent.handle(wire(new))).changes == 0
    assert kernel.observes == observes and agent.counters["skipped"]


async def test_a_failed_heartbeat_is_retried_in_full(tmp_path):
    agent, kernel, _, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    bigger = msgspec.structs.replace(SNAP, version=SNAP.version + 1,
                                     bridges=(Bridge(name=BR, mtu=1390), Bridge(name="otb2000", mtu=1390)))  # fmt: skip
    bigger = msgspec.structs.replace(bigger, digest=snapshot_digest(bigger))
    kernel.fail[("CreateBridge", "otb2000")] = 16  # EBUSY
    assert not (await agent.handle(wire(bigger))).ok
    observes = kernel.observes
    assert not (await agent.handle(wire(bigger))).ok
    assert kernel.observes == observes + 1  # not skipped: the same content failed before
    del kernel.fail[("CreateBridge", "otb2000")]
    assert (await agent.handle(wire(bigger))).ok and "otb2000" in kernel.links


# --- WireGuard: no notifications, one UAPI read compared as bytes -------------------------------


def uapi_answer(private: str, peers, shuffle: bool = False, counters: int = 0) -> bytes:
    lines = [f"private_key={wgkeys.b64_to_hex(wgkeys.clamp(private))}", "listen_port=51820"]
    blocks = [
        [f"public_key={wgkeys.b64_to_hex(p.public_key)}", f"endpoint={p.endpoint}",
         f"last_handshake_time_sec={counters}", f"rx_bytes={counters * 100}",
         *(f"allowed_ip={a}" for a in p.allowed_ips)]
        for p in peers
    ]  # fmt: skip
    for block in reversed(blocks) if shuffle else blocks:
        lines += block
    return ("\n".join(lines) + "\nerrno=0\n\n").encode()


def wireguard_device(count: int) -> tuple[str, tuple[WgPeer, ...], WireGuard, Observed]:
    """A private key, ``count`` peers, the desired device holding them and a link dump with its
    link up: what a WireGuard check starts from."""
    private = wgkeys.generate_private_key()
    peers = tuple(
        WgPeer(public_key=wgkeys.public_key(wgkeys.hex_to_b64(f"{i + 1:064x}")),
               endpoint=f"198.18.0.{i + 2}:51820", allowed_ips=(f"100.64.0.{i + 2}/32",))
        for i in range(count)
    )  # fmt: skip
    desired = WireGuard(name="otwg0", address="100.64.0.1/16", listen_port=51820, mtu=1440,
                        peers=peers)  # fmt: skip
    link = Link(name="otwg0", kind="", mtu=1440, up=True, addresses=frozenset({"100.64.0.1/16"}))
    return private, peers, desired, Observed(links={"otwg0": link})


async def test_wireguard_check_reconciles_only_when_the_device_changed(tmp_path):
    private, peers, desired, seen = wireguard_device(3)
    answer = [uapi_answer(private, peers)]

    async def uapi(reader, writer):
        if await reader.read(64):  # wireguard-go's socket; "alive" probes send nothing
            writer.write(answer[0])
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(uapi, path=str(tmp_path / "otwg0.sock"))
    wg = WireGuardApplier(None, private_key=private, backend="userspace", run_dir=tmp_path)  # type: ignore[arg-type]
    reconciles = []

    async def reconcile(*args, **kwargs):  # what a full reconcile reads, without its writes
        reconciles.append(args)
        return await wg.apply(wg.plan(desired, await wg.observe(seen)))

    wg.reconcile = reconcile  # type: ignore[method-assign]
    try:
        assert (await wg.check(desired, seen)).writes == 0 and len(reconciles) == 1  # no record
        # the same device: peers in another order, counters and handshakes moved on
        answer[0] = uapi_answer(private, peers, shuffle=True, counters=7)
        for _ in range(3):
            assert (await wg.check(desired, seen)).writes == 0
        assert len(reconciles) == 1
        answer[0] = uapi_answer(private, peers[:2])  # a peer removed by hand
        assert (await wg.check(desired, seen)).writes == 1  # put back
        assert len(reconciles) == 2
    finally:
        await wg.close()
        server.close()


async def test_an_assembled_snapshot_is_compared_by_version_and_digest(tmp_path):
    """After the per-node head message lands, snapshots may be assembled from several
    messages: no raw bytes to compare, the digest decides."""
    assert same_snapshot(SNAP, SNAP) and not same_snapshot(SNAP, None)
    assert not same_snapshot(msgspec.structs.replace(SNAP, digest=""), SNAP)
    assert not same_snapshot(msgspec.structs.replace(SNAP, version=SNAP.version + 1), SNAP)
    agent, kernel, _, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    observes = kernel.observes
    for _ in range(3):
        assert (await agent.apply_snapshot(msgspec.structs.replace(SNAP))).changes == 0
    assert kernel.observes == observes and agent.counters["skipped"] == 3


async def test_an_unchanged_heartbeats_head_is_neither_assembled_nor_validated(
    tmp_path, monkeypatch
):
    """The heartbeat's HEAD (no sections attached, another timestamp) has the content last
    reconciled: skipped on node, version and digest, before any assembly or validation."""
    agent, kernel, _, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    beat = encode(msgspec.structs.replace(head_for(SNAP), sections=(), published_at=9.0))
    agent.assembler = None  # type: ignore[assignment]  # anything that assembles fails

    def no_validation(*args, **kwargs):
        raise AssertionError("validated again")

    monkeypatch.setattr("agent.runner.check_snapshot", no_validation)
    observes = kernel.observes
    for _ in range(3):
        ack = await agent.handle(beat)
        assert ack.ok and ack.version == SNAP.version and ack.digest == SNAP.digest
    assert kernel.observes == observes and agent.counters["skipped"] == 3


def fdb_event(kind: int, index: int, mac: bytes, state: int, dst=b"", master=0) -> bytes:
    attrs = _attr(2, mac) + (_attr(1, dst) if dst else b"")
    attrs += _attr(9, struct.pack("=I", master)) if master else b""
    return _msg(kind, struct.pack("=BxxxiHBB", 7, index, state, 0, 0) + attrs)


MAC, DST = bytes.fromhex("020000000002"), socket.inet_aton("100.64.0.2")


def test_an_entry_on_a_foreign_port_of_our_bridge_is_news():
    """A move of one of ours to a port not ours is one event naming that port (review19)."""
    assert touches_ours(fdb_event(28, 9, MAC, 0x40, master=5), {5})
    assert not touches_ours(fdb_event(28, 9, MAC, 0x40, master=8), {5})  # a foreign bridge


def test_an_fdb_echo_is_the_event_of_the_write_itself():
    """The events of an add (its dst and state) and of a delete are echoes; someone else's
    delete of an entry just added, or its move to another dst, is news (review19)."""
    managed = {5}
    added = Echoes(fdb=frozenset({fdb_echo(True, 5, MAC, DST, 0x80)}))
    assert not touches_ours(fdb_event(28, 5, MAC, 0x80, DST), managed, added)
    assert touches_ours(fdb_event(29, 5, MAC, 0x80, DST), managed, added)  # deleted
    other = socket.inet_aton("100.64.0.9")
    assert touches_ours(fdb_event(28, 5, MAC, 0x80, other), managed, added)  # another dst
    assert touches_ours(fdb_event(28, 5, MAC, 0x02, DST), managed, added)  # learned, not ours
    deleted = Echoes(fdb=frozenset({fdb_echo(False, 5, MAC, DST)}))
    assert not touches_ours(fdb_event(29, 5, MAC, 0x80, DST), managed, deleted)
    assert touches_ours(fdb_event(28, 5, MAC, 0x80, DST), managed, deleted)  # added again
    learned = Echoes(fdb=frozenset({fdb_echo(False, 5, MAC)}))  # a delete without a dst
    assert not touches_ours(fdb_event(29, 5, MAC, 0x02, other), managed, learned)


def test_the_macs_announced_on_written_devices_are_noted():
    echoes = Echoes(devices=frozenset({b"ot0000000000a1"}), indexes={3})
    assert not touches_ours(fdb_event(28, 3, MAC, 0x40), {3}, echoes)
    assert echoes.macs == {MAC}
