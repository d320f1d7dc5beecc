"""The hostile snapshots of issue 8, each refused whole with a message that names what is wrong,
and refused before anything runs: through the agent, a refusal is counted and acked while the
links and nftables subsystems are never touched.

Each of these was accepted (and programmed) before the gate validated snapshots whole, or came
back as "internal error".
"""

import msgspec
import pytest

from agent.assemble import head_for
from agent.runner import Agent, AgentConfig
from agent.validate import Rejected, accept
from schemas.codec import decode, encode
from schemas.desired import FdbEntry, Snapshot
from schemas.messages import Ack
from tests.unit.test_validate import GOOD, NAT_BRIDGE, OVERLAY_BRIDGE, PEER, VXLAN, WG

replace = msgspec.structs.replace
DATA = encode(GOOD)


def fdb(mac: str, dst: str) -> bytes:
    return encode(replace(GOOD, vxlans=(replace(VXLAN, fdb=(*VXLAN.fdb, FdbEntry(mac=mac, dst=dst))),)))  # fmt: skip


def gateway(address: str) -> bytes:
    return encode(replace(GOOD, bridges=(OVERLAY_BRIDGE, replace(NAT_BRIDGE, address=address))))


def nat_subnets(n: int) -> bytes:
    subnets = tuple(f"10.{i // 256 % 256}.{i % 256}.{i // 65536 * 16}/28" for i in range(n))
    return encode(replace(GOOD, nat_subnets=subnets))


INVALID = "invalid snapshot version 5: "
# fmt: off
HOSTILE = {
    "non-ASCII bridge name": (DATA.replace(b'"otb1000"', '"otéé"'.encode()), INVALID + "bridges[0]: name 'otéé' is not ASCII"),
    "non-ASCII tap name": (DATA.replace(b'"ot000000000003"', '"ot00000000000é"'.encode()), INVALID + "taps[1]: name 'ot00000000000é' is not ASCII"),
    "FDB broadcast MAC": (fdb("ff:ff:ff:ff:ff:ff", "100.64.0.2"), INVALID + "vxlan otvx1000: fdb mac 'ff:ff:ff:ff:ff:ff' is a broadcast or multicast MAC; it must be unicast (00:00:00:00:00:00 floods)"),
    "FDB IPv4 multicast MAC": (fdb("01:00:5e:00:00:01", "100.64.0.2"), INVALID + "vxlan otvx1000: fdb mac '01:00:5e:00:00:01' is a broadcast or multicast MAC; it must be unicast (00:00:00:00:00:00 floods)"),
    "FDB IPv6 multicast MAC": (fdb("33:33:00:00:00:01", "100.64.0.2"), INVALID + "vxlan otvx1000: fdb mac '33:33:00:00:00:01' is a broadcast or multicast MAC; it must be unicast (00:00:00:00:00:00 floods)"),
    "FDB to the broadcast address": (fdb("00:00:00:00:00:00", "255.255.255.255"), INVALID + "vxlan otvx1000: fdb dst '255.255.255.255' is outside the mesh prefix 100.64.0.0/16"),
    "FDB to a multicast group": (fdb("02:00:00:00:00:09", "224.0.0.1"), INVALID + "vxlan otvx1000: fdb dst '224.0.0.1' is outside the mesh prefix 100.64.0.0/16"),
    "NAT subnet 0.0.0.0/0": (encode(replace(GOOD, nat_subnets=("0.0.0.0/0",))), INVALID + "snapshot: nat_subnets '0.0.0.0/0' is the whole IPv4 space"),
    "bridge address 0.0.0.0/0": (gateway("0.0.0.0/0"), INVALID + "bridge otn094a367b: address '0.0.0.0/0' is the whole IPv4 space"),
    "bridge address: another node's underlay /32": (gateway("198.18.0.12/32"), INVALID + "bridge otn094a367b: address '198.18.0.12/32' overlaps the infrastructure prefix 198.18.0.0/24"),
    "bridge address: another node's tunnel /32": (gateway("100.64.0.2/32"), INVALID + "bridge otn094a367b: address '100.64.0.2/32' overlaps the mesh prefix 100.64.0.0/16"),
    "bridge address: some other host's /32": (gateway("10.0.0.7/32"), INVALID + "bridge otn094a367b: address '10.0.0.7/32' has a prefix outside /8../30 (a gateway with room for NICs)"),
    "WireGuard allowed_ips 0.0.0.0/0": (encode(replace(GOOD, wireguard=replace(WG, peers=(replace(PEER, allowed_ips=("0.0.0.0/0",)),)))), INVALID + "wireguard otwg0 peers[0]: allowed_ips '0.0.0.0/0' is outside the mesh prefix 100.64.0.0/16"),
    "VXLAN port 70000": (encode(replace(GOOD, vxlans=(replace(VXLAN, port=70000),))), INVALID + "vxlan otvx1000: port 70000 is not a UDP port (1-65535)"),
    "50,000 NAT subnets in 851 KB": (nat_subnets(50_000), INVALID + "nat_subnets has 50000 entries, more than the limit of 1024"),
    "non-UTF-8 bytes in a string": (DATA.replace(b'"node":"n1"', b'"node":"n\xff1"'), "malformed snapshot: not UTF-8 text at byte 10 (invalid start byte)"),
    "non-UTF-8 bytes in a field the agent skips": (DATA[:-1] + b',"note":"\xc3\x28"}', f"malformed snapshot: not UTF-8 text at byte {len(DATA) + 8} (invalid continuation byte)"),
    "non-UTF-8 bytes only": (b"\xff\xfe\xfd", "malformed snapshot: not UTF-8 text at byte 0 (invalid start byte)"),
    "200,000-deep JSON": (b"[" * 200_000 + b"]" * 200_000, "malformed snapshot: Expected `object`, got `array`"),
    "200,000-deep JSON in a field the agent skips": (DATA[:-1] + b',"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "malformed snapshot: JSON nested too deeply to decode"),
    "200,000-deep JSON in a list the agent reads": (DATA.replace(b'"taps":[', b'"taps":' + b"[" * 200_000 + b"]" * 199_999 + b",[", 1), "malformed snapshot: JSON nested too deeply to decode"),
}
# fmt: on


def test_the_50000_subnet_snapshot_passes_the_size_cap():
    """Like the issue's (902 KB), it is under the size cap: the list's cap refuses it."""
    assert len(HOSTILE["50,000 NAT subnets in 851 KB"][0]) == 851_389


@pytest.mark.parametrize(("data", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_snapshot_refused_with_a_clear_message(data, message):
    with pytest.raises(Rejected) as e:
        accept(data, "n1", 0)
    assert str(e.value) == message


def test_vxlan_only_via_is_not_a_field_a_snapshot_can_set():
    """The guard's interface is the agent's choice: the old field is skipped like any unknown
    one (rolling upgrades), so neither "eth0" (guard inverted) nor null (guard removed) lands."""
    for value in (b'"eth0"', b"null"):
        snap = accept(DATA[:-1] + b',"vxlan_only_via":' + value + b"}", "n1", 0)
        assert snap == GOOD and not hasattr(snap, "vxlan_only_via")


def as_head(agent: Agent, data: bytes) -> bytes:
    """What the wire carries since snapshot schema 3: a HEAD, its sections held by the agent as
    if fetched, assembling into the snapshot. Bytes that are not even a snapshot are sent as is:
    the HEAD's gate refuses them the same way."""
    try:
        data.decode()
        snap = decode(data, Snapshot)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return data
    head = head_for(snap)
    for section in head.sections:
        assert agent.assembler.offer(section)
    return encode(msgspec.structs.replace(head, sections=()))


class Untouchable:
    """A subsystem that fails the test if the agent so much as looks at it."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        raise AssertionError(f"{self.name}.{attr} used")


class Acks:
    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))


def untouchable_agent(tmp_path) -> Agent:
    config = AgentConfig(node="n1", state_dir=tmp_path)
    return Agent(Acks(), config, Untouchable("links"), Untouchable("nft"))  # type: ignore[arg-type]


# an assembled snapshot lists bridges by name: the hostile one comes second there
ASSEMBLED = {**HOSTILE, "non-ASCII bridge name": (HOSTILE["non-ASCII bridge name"][0], INVALID + "bridges[1]: name 'otéé' is not ASCII")}  # fmt: skip


@pytest.mark.parametrize(("data", "message"), ASSEMBLED.values(), ids=ASSEMBLED.keys())
async def test_hostile_snapshot_is_counted_and_acked_and_touches_nothing(tmp_path, data, message):
    agent = untouchable_agent(tmp_path)
    ack = await agent.handle(as_head(agent, data))
    assert (ack.ok, ack.error, ack.applied_version) == (False, message, 0)
    assert agent.counters["rejected"] == 1 and agent.counters["applied"] == 0
    assert decode(agent.nc.published[-1][1], Ack) == ack


async def test_the_untouchable_agent_would_notice_an_apply(tmp_path):
    """So the test above cannot pass by accident: a good snapshot does reach the subsystems."""
    with pytest.raises(AssertionError, match="links.observe used"):
        agent = untouchable_agent(tmp_path)
        await agent.handle(as_head(agent, DATA))
