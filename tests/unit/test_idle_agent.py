"""What an idle agent does between heartbeats, and what it no longer pays for: the health loop
refreshes stale drop counters with the counters-only read (``NftApplier.read_drops``, not both
``nft -j list table``), the netlink counter dump's answer is parsed like ``nft``'s listings, and
wireguard-go's supervisor does not knock on the UAPI socket when a read just got an answer."""

import asyncio
import struct
import time

import pytest

from agent import runner
from agent.nft import counters
from agent.nft.rules import Counter
from agent.wireguard import keys as wgkeys
from agent.wireguard.applier import UapiReads, WireGuardApplier, observed_health, peer_health
from agent.wireguard.plan import parse_get
from schemas.codec import decode
from schemas.desired import WireGuard
from schemas.messages import Health
from tests.unit.test_steady import RAW, agent_on_fakes, converge

pytestmark = pytest.mark.timeout(20)


async def test_stale_drop_counters_are_refreshed_by_the_counters_read_before_a_report(
    tmp_path, monkeypatch
):
    agent, _, nft, _ = agent_on_fakes(tmp_path)
    await converge(agent)
    await agent.handle(RAW)  # skipped: no counters read
    reads: list[str] = []

    async def read_drops():
        reads.append("counters")
        nft.drops, nft.drops_at = {"vxlan_guard": 7}, time.monotonic()
        return nft.drops

    monkeypatch.setattr(nft, "read_drops", read_drops)
    runs = len(nft.runs)
    nft.drops_at = time.monotonic() - runner.DROPS_MAX_AGE - 0.1  # older than allowed
    reported, publish = asyncio.Event(), agent.nc.publish

    async def publish_noted(subject: str, data: bytes) -> None:
        await publish(subject, data)
        if "health" in subject:
            reported.set()

    monkeypatch.setattr(agent.nc, "publish", publish_noted)
    loop = asyncio.create_task(agent._health_loop())
    try:
        await asyncio.wait_for(reported.wait(), 5)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    health = decode(agent.nc.published[-1][1], Health)
    assert reads == ["counters"] and health.drops == {"vxlan_guard": 7}
    assert len(nft.runs) == runs  # no nft process for a report


def _nlmsg(kind: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body


def _counter_obj(family: int, table: str, name: str, packets: int, octets: int, kind=1) -> bytes:
    data = counters._attr(counters.NFTA_COUNTER_BYTES, struct.pack(">Q", octets))
    data += counters._attr(counters.NFTA_COUNTER_PACKETS, struct.pack(">Q", packets))
    body = struct.pack("=BBH", family, 0, 0)
    body += counters._attr(counters.NFTA_OBJ_TABLE, table.encode() + b"\0")
    body += counters._attr(counters.NFTA_OBJ_NAME, name.encode() + b"\0")
    body += counters._attr(counters.NFTA_OBJ_TYPE, struct.pack(">I", kind))
    body += counters._attr(counters.NFTA_OBJ_DATA | 0x8000, data)  # NLA_F_NESTED
    return _nlmsg(counters.NFNL_SUBSYS_NFTABLES << 8 | counters.NFT_MSG_NEWOBJ, body)


def test_the_counter_dump_is_read_like_the_nft_listings():
    inet, bridge = 1, 7
    first = _counter_obj(bridge, "otherix", "port_security_mac", 4, 400)
    first += _counter_obj(inet, "otherix", "vxlan_guard", 3, 150)
    second = _counter_obj(inet, "other", "vxlan_guard", 99, 1)  # a foreign table: not ours
    second += _counter_obj(inet, "otherix", "quota", 1, 1, kind=2)  # not a counter
    found, done = counters.parse([first, second])
    assert not done
    found, done = counters.parse([first, second, _nlmsg(counters.NLMSG_DONE, b"\0" * 4)])
    assert done and found == {
        "port_security_mac": Counter(4, 400),
        "vxlan_guard": Counter(3, 150),
    }
    # the same name in both tables: the bridge one wins, as in ``parse_observed`` (inet first)
    both = _counter_obj(bridge, "otherix", "x", 2, 2) + _counter_obj(inet, "otherix", "x", 1, 1)
    assert counters.parse([both, _nlmsg(3, b"\0" * 4)])[0] == {"x": Counter(2, 2)}
    with pytest.raises(OSError):
        counters.parse([_nlmsg(counters.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16)])


class Daemon:
    def __init__(self):
        self.knocks = 0

    async def alive(self) -> bool:
        self.knocks += 1
        return True


async def test_the_supervisor_does_not_knock_when_a_read_just_got_an_answer():
    wg = WireGuardApplier(
        None, private_key=wgkeys.generate_private_key(), backend="userspace", check_interval=0.05
    )  # type: ignore[arg-type]
    daemon = Daemon()
    wg._backend = daemon  # type: ignore[assignment]
    wg._last = WireGuard(name="otwg0", address="100.64.0.1/16", listen_port=51820, mtu=1440)
    supervisor = asyncio.create_task(wg._supervise())
    try:
        for _ in range(8):  # heartbeats' reads answered all along
            wg._answered_at = time.monotonic()
            await asyncio.sleep(0.03)
        assert daemon.knocks == 0
        for _ in range(4):  # reads further apart (heartbeats late): no knock either
            wg._answered_at = time.monotonic()
            await asyncio.sleep(0.09)
        assert daemon.knocks == 0
        await asyncio.sleep(0.3)  # no reads: the supervisor checks on its own
        assert daemon.knocks >= 2
    finally:
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)


def test_health_reads_the_peers_of_a_uapi_answer_as_parse_get_does():
    keys = [f"{i + 1:064x}" for i in range(3)]
    answer = (
        f"private_key={'a' * 64}\nlisten_port=51820\n"
        f"public_key={keys[0]}\nendpoint=198.18.0.2:51820\nlast_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=500000000\ntx_bytes=12\nrx_bytes=34\n"
        "persistent_keepalive_interval=0\nprotocol_version=1\nallowed_ip=100.64.0.2/32\n"
        f"public_key={keys[1]}\nendpoint=[fd00::0:1]:51820\nlast_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\nallowed_ip=100.64.0.3/32\n"
        f"public_key={keys[2]}\nallowed_ip=100.64.0.4/32\nallowed_ip=10.0.0.0/8\n"
        "errno=0\n\n"
    ).encode()
    nodes = {wgkeys.hex_to_b64(keys[0]): "n2"}
    expected = observed_health(parse_get(answer.decode()).peers, nodes)  # the whole parse's
    assert peer_health(answer, nodes) == expected
    assert (
        expected[0].latest_handshake == 1700000000.5 and expected[1].endpoint == "[fd00::1]:51820"
    )
    assert peer_health(b"private_key=" + b"a" * 64 + b"\nerrno=0\n\n", {}) == []


class FakeUapi:
    """wireguard-go's UAPI socket as far as reads go: any number of ``get=1`` per connection."""

    def __init__(self, path, answer: bytes = b"private_key=00\nlisten_port=1\nerrno=0\n\n"):
        self.path, self.answer, self.connections, self.server = path, answer, 0, None
        self.stall = False
        self.tasks: list[asyncio.Task] = []

    async def start(self):
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self):  # as the daemon exits: its connections go with it
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.connections += 1
        self.tasks.append(asyncio.current_task())
        try:
            while (await reader.readuntil(b"\n\n")) == b"get=1\n\n":
                if self.stall:
                    writer.write(self.answer[:5])  # half an answer, then nothing
                    await writer.drain()
                    await asyncio.sleep(3600)
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def test_uapi_reads_keep_one_connection_and_replace_a_broken_one(tmp_path):
    path = tmp_path / "otwg0.sock"
    uapi, reads = FakeUapi(path), UapiReads()
    await uapi.start()
    try:
        for _ in range(5):
            assert await reads.get(path) == uapi.answer
        assert uapi.connections == 1
        await uapi.stop()  # the daemon restarts: a new socket at the same path
        path.unlink()
        uapi = FakeUapi(path)
        await uapi.start()
        assert await reads.get(path) == uapi.answer and uapi.connections == 1
        uapi.stall = True  # cut off mid-answer: that connection is never read again
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await reads.get(path)
        uapi.stall = False
        assert await reads.get(path) == uapi.answer and uapi.connections == 2  # afresh
    finally:
        reads.close()
        await uapi.stop()
    assert await reads.get(path) is None  # no daemon: no answer, no error
