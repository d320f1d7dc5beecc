"""Findings of the review of the mesh change path and the idle agent, held as tests: the health
device count and the change-path counters after a join, the kept UAPI read connection (a
replaced socket file, a stuck daemon), and the counter dump's error and malformed answers."""

import asyncio
import struct
import time
from pathlib import Path

import msgspec
import pytest

from agent.nft import counters
from agent.runner import Agent
from agent.wireguard import applier
from agent.wireguard.applier import UapiReads
from schemas.codec import encode
from schemas.wire import PeerItem
from tests.unit.test_fdb_change import key
from tests.unit.test_mesh_change import Controller, agent

replace = msgspec.structs.replace
JOINED = PeerItem(
    node="n6", public_key=key(6), endpoint="198.18.0.6:51820", allowed_ips=("100.64.0.6/32",)
)


async def _settled(tmp_path: Path) -> tuple[Agent, Controller]:
    a, c = agent(Agent, tmp_path / "a"), Controller()
    for section in c.head.sections:
        a.assembler.offer(section)
    assert (await a.handle(encode(replace(c.head, sections=())))).ok
    return a, c


async def test_health_counts_every_device_after_a_join_by_the_change_path(tmp_path):
    a, c = await _settled(tmp_path)
    assert (await a.handle(encode(replace(c.head, sections=())))).ok  # settled: quiet next
    before = a.devices
    assert (await a.handle(encode(c.step([JOINED], [], [], [])))).ok
    assert a.counters["mesh_changes"] == 1  # by the change path: links were not planned
    assert before > 1 and a.devices == before == (await a.health()).devices


async def test_a_join_planned_whole_is_not_counted_as_a_change_path_one(tmp_path):
    a, c = await _settled(tmp_path)  # the first HEAD wrote: the next one is planned whole
    full = a.counters["reconciled"]
    assert (await a.handle(encode(c.step([JOINED], [], [], [])))).ok
    assert a.counters["reconciled"] == full + 1 and a.counters["mesh_changes"] == 0


# --- the kept UAPI read connection -------------------------------------------------------------

ANSWER = b"private_key=" + b"11" * 32 + b"\nlisten_port=51820\nerrno=0\n\n"


async def _daemon(path: Path, answer: bytes = ANSWER, answers: int = 1 << 30):
    """A UAPI socket answering ``get=1``, ``answers`` times, then silent (a stuck daemon)."""

    async def handle(reader, writer):
        nonlocal answers
        try:
            while (line := await reader.readline()) and line == b"get=1\n":
                await reader.readline()
                answers -= 1
                if answers < 0:
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, str(path))


async def test_a_replaced_socket_file_is_not_read_over_the_old_connection(tmp_path):
    """The old daemon still answers on the kept connection, but its socket file is gone: reads
    must fail as writes (which connect anew) do, so the supervisor restarts it."""
    path = tmp_path / "otwg0.sock"
    old = await _daemon(path)
    reads = UapiReads()
    assert await reads.get(path) == ANSWER
    path.unlink()
    assert await reads.get(path) is None
    new = await _daemon(path, ANSWER.replace(b"51820", b"51821"))  # a new daemon, a new file
    assert (await reads.get(path)).endswith(b"listen_port=51821\nerrno=0\n\n")
    old.close()
    new.close()
    reads.close()


async def test_a_stuck_daemon_costs_one_timeout_not_two(tmp_path, monkeypatch):
    monkeypatch.setattr(applier, "UAPI_TIMEOUT", 0.3)
    path = tmp_path / "otwg0.sock"
    server = await _daemon(path, answers=1)
    reads = UapiReads()
    assert await reads.get(path) == ANSWER  # a kept connection, then the daemon is stuck
    started = time.monotonic()
    assert await reads.get(path) is None
    took = time.monotonic() - started
    server.close()
    assert took < 0.55, f"{took:.2f} s: the timed-out read was retried"  # not a timing claim:
    # one timeout is 0.3 s, a retry would make it 0.6 s whatever the machine's load


async def test_a_daemon_restarted_between_reads_is_read_afresh(tmp_path):
    path = tmp_path / "otwg0.sock"
    first = await _daemon(path)
    reads = UapiReads()
    assert await reads.get(path) == ANSWER
    first.close()
    path.unlink()
    second = await _daemon(path, ANSWER.replace(b"51820", b"51821"))
    assert (await reads.get(path)).endswith(b"listen_port=51821\nerrno=0\n\n")
    second.close()
    reads.close()


# --- the counter dump ---------------------------------------------------------------------------

NEWOBJ = counters.NFNL_SUBSYS_NFTABLES << 8 | counters.NFT_MSG_NEWOBJ


def _msg(kind: int, body: bytes, flags: int = 0) -> bytes:
    header = counters._NLMSG.pack(counters._NLMSG.size + len(body), kind, flags, 1, 0)
    return header + body + b"\0" * (-len(body) % 4)


def _counter(family: int, name: str, packets: int, octets: int) -> bytes:
    c = counters
    body = c._NFGEN.pack(family, 0, 0)
    body += c._attr(c.NFTA_OBJ_TABLE, c.TABLE.encode() + b"\0")
    body += c._attr(c.NFTA_OBJ_NAME, name.encode() + b"\0")
    body += c._attr(c.NFTA_OBJ_TYPE, c._U32BE.pack(c.NFT_OBJECT_COUNTER))
    values = c._attr(c.NFTA_COUNTER_BYTES, c._U64BE.pack(octets))
    values += c._attr(c.NFTA_COUNTER_PACKETS, c._U64BE.pack(packets))
    return _msg(NEWOBJ, body + c._attr(c.NFTA_OBJ_DATA | 0x8000, values))


def _done(error: int = 0) -> bytes:
    return _msg(counters.NLMSG_DONE, struct.pack("=i", error))


def test_a_dump_over_several_datagrams_merges_families_as_the_listings_do():
    dump = [_counter(1, "a", 1, 10) + _counter(7, "a", 2, 20), _counter(1, "b", 3, 30), _done()]
    assert counters.parse(dump) == (
        {"a": counters.Counter(2, 20), "b": counters.Counter(3, 30)},
        True,
    )
    assert counters.parse(dump[:2])[1] is False  # not ended until NLMSG_DONE


@pytest.mark.parametrize(
    "answer, says",
    [
        ([_counter(1, "a", 1, 10), _done(-4)], "Interrupted"),  # a dump that failed part-way
        ([_msg(NEWOBJ, _counter(1, "a", 1, 1)[16:], flags=0x10), _done()], "interrupted"),
        ([counters._NLMSG.pack(16, NEWOBJ, 0, 1, 0)], "malformed"),  # a header alone
        ([counters._NLMSG.pack(18, counters.NLMSG_ERROR, 0, 1, 0) + b"\0\0"], "malformed"),
    ],
)
def test_an_error_or_malformed_dump_is_an_error_never_figures(answer, says):
    with pytest.raises(OSError, match=says):
        counters.parse(answer)


def test_reading_in_a_namespace_that_does_not_exist_creates_none():
    with pytest.raises(FileNotFoundError):
        counters.read("otherix-no-such-namespace")
    assert not Path("/run/netns/otherix-no-such-namespace").exists()
