"""``agent.links.fdb_dump.parse`` and ``read`` on bytes: a dump captured from a real kernel,
synthetic dumps for what the kernel here cannot make (VLAN entries, older layouts, interrupted
dumps, errors), and cut or damaged ones. Wherever the code before it (``tests/fdb_before.py``)
must agree, both get the same bytes and are compared."""

import errno
import random
import socket
import struct

import pytest

from agent.links import fdb_dump
from agent.links.fdb_dump import DumpInterrupted, FdbDumpError, parse
from agent.links.fdb_socket import (
    NDA_DST,
    NDA_LLADDR,
    NDA_MASTER,
    NDA_VLAN,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    NTF_EXT_LEARNED,
    NTF_MASTER,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RTM_NEWNEIGH,
    FdbSocket,
)
from schemas.desired import FdbEntry
from tests import fdb_before

# captured with tests/netns/test_fdb_dump.py's ``build`` (BULK = 0) on Linux 6.18: every kind of
# entry that kernel makes on bridges and VXLAN devices, as two datagrams (2,900 and 20 bytes)
SEQ = 42
VXLANS = {3: "otvx1000", 6: "otvx1001", 9: "otvx1002"}
PORTS = {3: "otvx1000", 4: "ot0000000000a1", 6: "otvx1001", 8: "ot0000000000a2"}
CAPTURED = bytes.fromhex(
    "280000001c0002002a000000f30900000700000002000000800002000a0002003333000000010000280000001c000200"
    "2a000000f30900000700000002000000800002000a00020001005e00006a0000280000001c0002002a000000f3090000"
    "0700000002000000800002000a00020033330000006a0000280000001c0002002a000000f30900000700000002000000"
    "800002000a00020001005e00000100004c0000001c0002002a000000f30900000700000002000000800000000a000200"
    "0200000003090000080009000200000008000f00000000001400030000000000b0000000b0000000000000004c000000"
    "1c0002002a000000f30900000700000003000000400000000a0002000200000003010000080009000200000008000f00"
    "000000001400030000000000b0000000b0000000000000004c0000001c0002002a000000f30900000700000003000000"
    "800000000a000200baee3b1a63520000080009000200000008000f00000000001400030000000000ea000000ea000000"
    "00000000440000001c0002002a000000f30900000700000003000000420002010a000200020000000106000008000100"
    "644000061400030000000000b0000000b000000000000000440000001c0002002a000000f30900000700000003000000"
    "020002010a000200020000000105000008000100644000051400030000000000b0000000b00000000000000044000000"
    "1c0002002a000000f30900000700000003000000c00002010a0002000200000001090000080001006440000914000300"
    "00000000b0000000b0000000000000004c0000001c0002002a000000f30900000700000003000000c00002010a000200"
    "02000000010400000800010064400004080008000b0000001400030000000000b0000000b0000000000000004c000000"
    "1c0002002a000000f30900000700000003000000c00002010a0002000200000001030000080001006440000306000600"
    "12b600001400030000000000b0000000b0000000000000004c0000001c0002002a000000f30900000700000003000000"
    "c00002010a0002000200000001020000080001006440000308000700881300001400030000000000b0000000b0000000"
    "00000000440000001c0002002a000000f30900000700000003000000c00002010a000200020000000101000008000100"
    "644000021400030000000000b0000000b000000000000000440000001c0002002a000000f30900000700000003000000"
    "c00002010a0002000000000000000000080001006440000214000300000000009a000000b00000000000000044000000"
    "1c0002002a000000f30900000700000003000000c00002010a0002000000000000000000080001006440000314000300"
    "000000009a000000b0000000000000004c0000001c0002002a000000f30900000700000004000000800000000a000200"
    "0200000003060000080009000200000008000f00000000001400030000000000b0000000b0000000000000004c000000"
    "1c0002002a000000f30900000700000004000000020010000a0002000200000003050000080009000200000008000f00"
    "000000001400030000000000b0000000b0000000000000004c0000001c0002002a000000f30900000700000004000000"
    "400040000a0002000200000003070000080009000200000008000f00000000001400030000000000b0000000b0000000"
    "000000004c0000001c0002002a000000f30900000700000004000000400000000a000200020000000302000008000900"
    "0200000008000f00000000001400030000000000b0000000b0000000000000004c0000001c0002002a000000f3090000"
    "0700000004000000800000000a000200562b5179f6bf0000080009000200000008000f00000000001400030000000000"
    "e9000000e900000000000000280000001c0002002a000000f30900000700000004000000800002000a00020002000000"
    "03080000280000001c0002002a000000f30900000700000004000000800002000a000200333300000001000028000000"
    "1c0002002a000000f30900000700000004000000800002000a00020001005e0000010000280000001c0002002a000000"
    "f30900000700000005000000800002000a0002003333000000010000280000001c0002002a000000f309000007000000"
    "05000000800002000a00020001005e00006a0000280000001c0002002a000000f3090000070000000500000080000200"
    "0a00020033330000006a0000280000001c0002002a000000f30900000700000005000000800002000a00020001005e00"
    "000100004c0000001c0002002a000000f30900000700000006000000400000000a000200020000000402000008000900"
    "0500000008000f00000000001400030000000000af000000af000000000000004c0000001c0002002a000000f3090000"
    "0700000006000000800000000a00020032b690e110db0000080009000500000008000f00000000001400030000000000"
    "db000000db00000000000000440000001c0002002a000000f30900000700000006000000c00002010a00020002000000"
    "0401000008000100644000071400030000000000b0000000b000000000000000280000001c0002002a000000f3090000"
    "0700000007000000800002000a0002003333000000010000280000001c0002002a000000f30900000700000007000000"
    "800002000a00020001005e00000100004c0000001c0002002a000000f30900000700000008000000020000000a000200"
    "0200000004050000080009000500000008000f000000000014000300000000009f0000009f000000000000004c000000"
    "1c0002002a000000f30900000700000008000000400000000a0002000200000004030000080009000500000008000f00"
    "000000001400030000000000af000000af000000000000004c0000001c0002002a000000f30900000700000008000000"
    "800000000a0002001eb6a04500a50000080009000500000008000f00000000001400030000000000d3000000d3000000"
    "00000000280000001c0002002a000000f30900000700000008000000800002000a000200333300000001000028000000"
    "1c0002002a000000f30900000700000008000000800002000a00020001005e0000010000440000001c0002002a000000"
    "f30900000700000009000000c00002010a000200020000000201000008000100644000021400030000000000b0000000"
    "b000000000000000280000001c0002002a000000f3090000070000000a000000800002000a0002003333000000010000"
    "280000001c0002002a000000f3090000070000000a000000800002000a00020001005e00006a0000280000001c000200"
    "2a000000f3090000070000000a000000800002000a00020033330000006a0000280000001c0002002a000000f3090000"
    "070000000a000000800002000a00020001005e0000010000280000001c0002002a000000f3090000070000000b000000"
    "800002000a0002003333000000010000280000001c0002002a000000f3090000070000000b000000800002000a000200"
    "01005e00000100004c0000001c0002002a000000f3090000070000000c000000400000000a0002000200000009010000"
    "080009000a00000008000f00000000001400030000000000af000000af000000000000004c0000001c0002002a000000"
    "f3090000070000000c000000800000000a000200eeb13dbd51f50000080009000a00000008000f000000000014000300"
    "00000000d1000000d100000000000000280000001c0002002a000000f3090000070000000c000000800002000a000200"
    "3333000000010000280000001c0002002a000000f3090000070000000c000000800002000a00020001005e0000010000"
    "440000001c0002002a000000f3090000070000000d000000c00002010a00020002000000090200000800010064400002"
    "1400030000000000af000000af0000000000000014000000030002002a000000f309000000000000"
)
DATAGRAMS = [CAPTURED[:2900], CAPTURED[2900:]]
FLOOD = "00:00:00:00:00:00"
EXPECTED = (
    {
        "otvx1000": {(FLOOD, "100.64.0.2"), (FLOOD, "100.64.0.3"),
                     ("02:00:00:00:01:01", "100.64.0.2"), ("02:00:00:00:01:02", "100.64.0.3"),
                     ("02:00:00:00:01:03", "100.64.0.3"), ("02:00:00:00:01:04", "100.64.0.4"),
                     ("02:00:00:00:01:09", "100.64.0.9")},
        "otvx1001": {("02:00:00:00:04:01", "100.64.0.7")},
        "otvx1002": {("02:00:00:00:02:01", "100.64.0.2")},
    },
    {"otvx1000": {"02:00:00:00:01:05", "02:00:00:00:01:06"}, "otvx1001": set(),
     "otvx1002": set()},
    {"otvx1000": {"02:00:00:00:03:01"}, "ot0000000000a1": {"02:00:00:00:03:02",
     "02:00:00:00:03:07"}, "otvx1001": {"02:00:00:00:04:02"},
     "ot0000000000a2": {"02:00:00:00:04:03"}},
    {"otvx1000": set(), "ot0000000000a1": set(), "otvx1001": set(),
     "ot0000000000a2": {"02:00:00:00:04:05"}},
)  # fmt: skip


def as_sets(tables) -> tuple:
    fdb, *rest = tables
    return ({k: {(e.mac, e.dst) for e in v} for k, v in fdb.items()}, *rest)


def test_captured_dump_sorted_as_before():
    tables = parse(DATAGRAMS, SEQ, VXLANS, PORTS)
    assert tuple(tables) == fdb_before.tables(DATAGRAMS, SEQ, VXLANS, PORTS)
    assert as_sets(tables) == EXPECTED
    assert all(isinstance(v, frozenset) for table in tables for v in table.values())


def test_captured_dump_in_one_datagram_or_one_message_each():
    whole = parse([CAPTURED], SEQ, VXLANS, PORTS)
    assert parse(messages(CAPTURED), SEQ, VXLANS, PORTS) == whole
    assert whole == parse(DATAGRAMS, SEQ, VXLANS, PORTS)


def test_nothing_managed_and_a_device_without_entries():
    assert parse(DATAGRAMS, SEQ, {}, {}) == ({}, {}, {}, {})
    assert parse([done()], SEQ, {3: "otvx1000"}, {5: "ot0a"}) == (
        {"otvx1000": frozenset()}, {"otvx1000": frozenset()},
        {"ot0a": frozenset()}, {"ot0a": frozenset()},
    )  # fmt: skip


def test_a_dump_cut_anywhere_raises_never_drops():
    for cut in range(len(CAPTURED)):
        with pytest.raises(FdbDumpError):
            parse([CAPTURED[:cut]], SEQ, VXLANS, PORTS)
        if cut % 4 == 0 and cut not in boundaries(CAPTURED):  # a message cut, then the end
            with pytest.raises(FdbDumpError, match="malformed"):
                parse([CAPTURED[:cut], done()], SEQ, VXLANS, PORTS)


# --- synthetic messages, laid out as the kernel lays them out ---------------------------------

VX, TAP, BOTH, BRIDGE, FOREIGN = 11, 12, 13, 14, 15  # BOTH: a VXLAN device on a bridge
MANAGED_VXLANS = {VX: "otvx1", BOTH: "otvx2"}
MANAGED_PORTS = {TAP: "ot0tap", BOTH: "otvx2"}
NDA_CACHEINFO, NDA_VNI, NDA_FLAGS_EXT = 3, 7, 15
NTF_STICKY = 0x40
NUD_REACHABLE, NUD_STALE = 0x02, 0x04


def nlmsg(kind: int, body: bytes, seq: int = SEQ, flags: int = NLM_F_MULTI) -> bytes:
    data = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 4242) + body
    return data + bytes(-len(data) % 4)


def attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + bytes(-len(data) % 4)


def neigh(ifindex, state, ntf, mac="02:00:00:00:00:01", dst=None, master=None, vlan=None,
          more=(), seq=SEQ, flags=NLM_F_MULTI, cacheinfo=bytes(16)) -> bytes:  # fmt: skip
    """An RTM_NEWNEIGH in the kernel's order: NDA_LLADDR, NDA_DST or NDA_MASTER, ``more``
    (e.g. NDA_FLAGS_EXT or NDA_VNI), NDA_CACHEINFO, NDA_VLAN."""
    body = struct.pack("=BxxxiHBB", socket.AF_BRIDGE, ifindex, state, ntf, 0)
    if mac is not None:
        body += attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
    if dst is not None:
        body += attr(NDA_DST, socket.inet_aton(dst))
    if master is not None:
        body += attr(NDA_MASTER, struct.pack("=I", master))
    body += b"".join(more) + attr(NDA_CACHEINFO, cacheinfo)
    if vlan is not None:
        body += attr(NDA_VLAN, struct.pack("=H", vlan))
    return nlmsg(RTM_NEWNEIGH, body, seq, flags)


def done(seq: int = SEQ, code: int = 0) -> bytes:
    return nlmsg(NLMSG_DONE, struct.pack("=i", -code), seq, NLM_F_MULTI)


def error(seq: int = SEQ, code: int = errno.EINVAL) -> bytes:
    return nlmsg(NLMSG_ERROR, struct.pack("=i", -code) + bytes(16), seq, 0)


def boundaries(data: bytes) -> list[int]:
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += (struct.unpack_from("=I", data, offset)[0] + 3) & ~3
    return offsets + [len(data)]


def messages(data: bytes) -> list[bytes]:
    cuts = boundaries(data)
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def both(datagrams: list[bytes]) -> tuple:
    """The new parse and the old code's tables of the same datagrams, asserted equal."""
    new = tuple(parse(datagrams, SEQ, MANAGED_VXLANS, MANAGED_PORTS))
    assert new == fdb_before.tables(datagrams, SEQ, MANAGED_VXLANS, MANAGED_PORTS)
    return new


def test_each_rule():
    dump = b"".join([
        neigh(VX, NUD_PERMANENT, NTF_SELF, FLOOD, dst="10.0.0.2"),
        neigh(VX, NUD_PERMANENT, NTF_SELF, FLOOD, dst="10.0.0.3"),
        neigh(VX, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:01", dst="10.0.0.2"),
        neigh(VX, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:02", dst="10.0.0.3",
              more=[attr(NDA_VNI, struct.pack("=I", 5000))]),  # the VNI is not read
        neigh(VX, NUD_REACHABLE, NTF_SELF, "02:00:00:00:00:03", dst="10.0.0.2"),  # learned
        neigh(VX, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:04"),  # no dst: learned
        neigh(VX, NUD_NOARP, NTF_SELF, "02:00:00:00:00:05", dst="10.0.0.2"),  # static: learned
        neigh(BOTH, NUD_NOARP, 0, "02:00:00:00:00:06", master=BRIDGE,
              more=[attr(NDA_FLAGS_EXT, bytes(4))]),  # its bridge's static entry on the port
        neigh(BOTH, NUD_PERMANENT, 0, "02:00:00:00:00:07", master=BRIDGE),  # its own address
        neigh(TAP, NUD_NOARP, NTF_STICKY, "02:00:00:00:00:08", master=BRIDGE),
        neigh(TAP, NUD_REACHABLE, 0, "02:00:00:00:00:09", master=BRIDGE),  # learned
        neigh(TAP, NUD_STALE, 0, "02:00:00:00:00:0a", master=BRIDGE),  # learned, aging
        neigh(TAP, NUD_NOARP, NTF_EXT_LEARNED, "02:00:00:00:00:0b", master=BRIDGE),  # a driver's
        neigh(TAP, NUD_NOARP, 0, "02:00:00:00:00:0c", master=BRIDGE, vlan=7),  # in a VLAN
        neigh(TAP, NUD_NOARP, 0, "02:00:00:00:00:0d", master=BRIDGE, vlan=0),  # VLAN 0: none
        neigh(TAP, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:0e"),  # the tap's own list
        neigh(TAP, NUD_NOARP, NTF_MASTER, "02:00:00:00:00:0f", master=BRIDGE),
        neigh(BRIDGE, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:10"),  # the bridge's own
        neigh(FOREIGN, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:11", dst="10.0.0.2"),
        neigh(FOREIGN, NUD_PERMANENT, NTF_SELF, None),  # not ours: no MAC is fine
        done(),
    ])  # fmt: skip
    fdb, learned, port_fdb, port_learned = both([dump])
    assert fdb == {
        "otvx1": {FdbEntry(mac=FLOOD, dst="10.0.0.2"), FdbEntry(mac=FLOOD, dst="10.0.0.3"),
                  FdbEntry(mac="02:00:00:00:00:01", dst="10.0.0.2"),
                  FdbEntry(mac="02:00:00:00:00:02", dst="10.0.0.3")},
        "otvx2": set(),
    }  # fmt: skip
    assert learned == {
        "otvx1": {"02:00:00:00:00:03", "02:00:00:00:00:04", "02:00:00:00:00:05"},
        "otvx2": set(),
    }
    assert port_fdb == {
        "ot0tap": {"02:00:00:00:00:08", "02:00:00:00:00:0d", "02:00:00:00:00:0f"},
        "otvx2": {"02:00:00:00:00:06"},
    }
    assert port_learned == {
        "ot0tap": {"02:00:00:00:00:09", "02:00:00:00:00:0a"},
        "otvx2": set(),
    }


def random_dump(rng: random.Random) -> list[bytes]:
    """Runs of entries alike (as the kernel dumps a device's table) in every layout, the odd
    entry of another state in a run, stale answers, a duplicated dst; cut into datagrams at
    random message boundaries."""
    out = []
    for _ in range(rng.randrange(1, 12)):
        ifindex = rng.choice([VX, TAP, BOTH, BRIDGE, FOREIGN])
        state = rng.choice([NUD_PERMANENT, NUD_NOARP, NUD_REACHABLE, NUD_STALE])
        ntf = rng.choice([NTF_SELF, 0, 0, NTF_EXT_LEARNED, NTF_STICKY, NTF_SELF | NTF_STICKY])
        shape = rng.choice(["vxlan", "vxlan", "vxlan vni", "bridge", "bridge", "bridge old",
                            "bridge vlan", "bridge old vlan", "own", "no dst",
                            "two dsts"])  # fmt: skip
        seq = SEQ if rng.random() < 0.9 else SEQ - 1
        for _ in range(rng.choice([1, 2, 5, 60, 300])):
            mac = f"02:00:00:{rng.randrange(4):02x}:{rng.randrange(256):02x}:01"
            if rng.random() < 0.05:
                mac = FLOOD
            dst = f"10.0.{rng.randrange(2)}.{rng.randrange(1, 9)}"
            odd = rng.random() < 0.02
            s = NUD_PERMANENT if odd else state
            i = rng.choice([VX, TAP, BOTH]) if rng.random() < 0.01 else ifindex
            out.append(shaped(shape, i, s, ntf, mac, dst, seq, rng))
    if rng.random() < 0.2:
        out.append(done(SEQ - 1))  # a stale dump's end
    out.append(done())
    cuts = sorted(rng.sample(range(1, len(out)), min(len(out) - 1, rng.randrange(8))))
    return [b"".join(out[a:b]) for a, b in zip([0, *cuts], [*cuts, len(out)], strict=True)]


def shaped(shape, ifindex, state, ntf, mac, dst, seq, rng) -> bytes:
    ext, vni = attr(NDA_FLAGS_EXT, bytes(4)), attr(NDA_VNI, struct.pack("=I", 5))
    entry = (ifindex, state, ntf, mac)
    match shape:
        case "vxlan":
            return neigh(*entry, dst=dst, seq=seq)
        case "vxlan vni":
            return neigh(*entry, dst=dst, more=[vni], seq=seq)
        case "bridge":
            return neigh(*entry, master=BRIDGE, more=[ext], seq=seq)
        case "bridge old":  # before NDA_FLAGS_EXT
            return neigh(*entry, master=BRIDGE, seq=seq)
        case "bridge vlan":
            return neigh(*entry, master=BRIDGE, more=[ext], vlan=rng.choice([0, 1, 7]), seq=seq)
        case "bridge old vlan":  # 76 bytes too, with NDA_VLAN last
            return neigh(*entry, master=BRIDGE, vlan=rng.choice([0, 1, 7]), seq=seq)
        case "own":
            return neigh(*entry, seq=seq)
        case "no dst":
            return neigh(*entry, more=[vni], seq=seq)
        case "two dsts":  # a later NDA_DST wins
            return neigh(*entry, dst=dst, more=[attr(NDA_DST, bytes(4))], seq=seq)
    raise AssertionError(shape)


def test_a_run_is_read_by_its_attribute_headers_not_by_look_alikes():
    """76 bytes with NDA_VLAN last (a bridge entry in a VLAN, before NDA_FLAGS_EXT), where the
    cache info's ``used`` field (20) reads like the 20-byte attribute of the other layout."""
    run = [neigh(TAP, NUD_NOARP, 0, f"02:00:00:00:00:{i:02x}", master=BRIDGE, vlan=7,
                 cacheinfo=struct.pack("=IIII", 0, 20, 0, 0)) for i in range(50)]  # fmt: skip
    assert {len(m) for m in run} == {76}
    assert both([b"".join(run) + done()])[2] == {"ot0tap": set(), "otvx2": set()}


def test_random_dumps_sorted_as_before():
    rng = random.Random(20261128)
    for _ in range(300):
        both(random_dump(rng))


# --- what the code before it got wrong ----------------------------------------------------------


def test_a_dump_ended_with_an_error_raises():
    """The kernel ends a dump that failed part-way with NLMSG_DONE carrying the error; the old
    code returned the entries read so far, as if that were the whole table."""
    dump = [neigh(VX, NUD_PERMANENT, NTF_SELF, dst="10.0.0.2") + done(code=errno.EMSGSIZE)]
    with pytest.raises(FdbDumpError) as e:
        parse(dump, SEQ, MANAGED_VXLANS, MANAGED_PORTS)
    assert e.value.errno == errno.EMSGSIZE


def test_an_error_answer_raises_with_its_errno():
    with pytest.raises(FdbDumpError) as e:
        parse([error(code=errno.EBUSY)], SEQ, MANAGED_VXLANS, MANAGED_PORTS)
    assert e.value.errno == errno.EBUSY


def test_an_interrupted_dump_raises_once_read_to_its_end():
    """NLM_F_DUMP_INTR: the table changed while dumped, so the entries are a mix of before and
    after; the old code took them as they were."""
    intr = NLM_F_MULTI | fdb_dump.NLM_F_DUMP_INTR
    for marked in (0, 1, 150):
        run = [neigh(VX, NUD_PERMANENT, NTF_SELF, f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
                     dst="10.0.0.2", flags=intr if i == marked else NLM_F_MULTI)
               for i in range(300)]  # fmt: skip
        datagrams = [b"".join(run[:200]), b"".join(run[200:]) + done()]
        with pytest.raises(DumpInterrupted) as e:
            parse(datagrams, SEQ, MANAGED_VXLANS, MANAGED_PORTS)
        assert e.value.errno == errno.EINTR


@pytest.mark.parametrize(
    "bad",
    [
        neigh(VX, NUD_PERMANENT, NTF_SELF, None, dst="10.0.0.2"),  # no MAC
        nlmsg(RTM_NEWNEIGH, struct.pack("=BxxxiHBB", 7, VX, NUD_PERMANENT, NTF_SELF, 0)
              + attr(NDA_LLADDR, bytes(4)) + attr(NDA_DST, bytes(4))),  # a 4-byte MAC
        nlmsg(RTM_NEWNEIGH, struct.pack("=BxxxiHBB", 7, TAP, NUD_NOARP, 0, 0)
              + attr(NDA_LLADDR, bytes(8))),  # an 8-byte one
    ],
    ids=["no MAC", "4-byte MAC", "8-byte MAC"],
)  # fmt: skip
def test_an_entry_of_ours_without_a_mac_raises(bad):
    """The old code skipped it: an entry of ours the agent would never see."""
    with pytest.raises(FdbDumpError, match="without a 6-byte MAC"):
        parse([bad + done()], SEQ, MANAGED_VXLANS, MANAGED_PORTS)


GOOD = neigh(VX, NUD_PERMANENT, NTF_SELF, dst="10.0.0.2")


@pytest.mark.parametrize(
    "bad",
    [
        GOOD[:-4],  # the message says more bytes than the datagram has
        struct.pack("=IHHII", 12, RTM_NEWNEIGH, 2, SEQ, 0),  # shorter than its own header
        GOOD[:8],  # not even a header left
        nlmsg(RTM_NEWNEIGH, bytes(8)),  # shorter than an ndmsg
        GOOD[:28] + struct.pack("=HH", 2, NDA_LLADDR) + GOOD[32:],  # an attribute under 4
        nlmsg(RTM_NEWNEIGH, GOOD[16:28] + struct.pack("=HH", 40, NDA_LLADDR) + bytes(8)),
        GOOD + b"\0\0",  # bytes left after the last message
        nlmsg(NLMSG_ERROR, b"\0\0"),  # an error message without its errno
    ],
    ids=["cut", "short header", "header cut", "short ndmsg", "short attribute",
         "attribute overruns", "leftover", "short error"],
)  # fmt: skip
def test_malformed_raises_never_skips(bad):
    with pytest.raises(FdbDumpError, match="malformed"):
        parse([bad + done()], SEQ, MANAGED_VXLANS, MANAGED_PORTS)


def test_a_dump_without_its_end_raises():
    with pytest.raises(FdbDumpError, match="without NLMSG_DONE"):
        parse([GOOD, done(SEQ - 1)], SEQ, MANAGED_VXLANS, MANAGED_PORTS)


def test_stale_answers_of_earlier_requests_are_skipped():
    stale = neigh(VX, NUD_PERMANENT, NTF_SELF, "02:00:00:00:00:99", dst="10.0.0.9", seq=SEQ - 1)
    datagrams = [stale + error(SEQ - 1) + done(SEQ - 1), GOOD + done()]
    fdb = parse(datagrams, SEQ, MANAGED_VXLANS, MANAGED_PORTS).fdb
    assert fdb["otvx1"] == {FdbEntry(mac="02:00:00:00:00:01", dst="10.0.0.2")}


# --- read: the socket side ------------------------------------------------------------------------


class DumpingSocket:
    """Answers each dump request with the next of ``answers``: a function of the request's seq
    giving datagrams (or exceptions to raise on receipt)."""

    def __init__(self, *answers):
        self.answers, self.queue, self.requests = list(answers), [], []

    def send(self, data: bytes) -> None:
        seq = struct.unpack_from("=IHHI", data)[3]
        self.requests.append(seq)
        self.queue += self.answers.pop(0)(seq)

    def recvmsg(self, size: int):
        item = self.queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        data, flags = item if isinstance(item, tuple) else (item, 0)
        return data[:size], [], flags, None

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.queue:
            raise BlockingIOError
        return self.recvmsg(size)[0]


def reading(*answers) -> tuple[FdbSocket, DumpingSocket]:
    fdb = FdbSocket.__new__(FdbSocket)
    fdb.sock, fdb.seq = DumpingSocket(*answers), 0
    return fdb, fdb.sock


def clean(seq: int) -> list[bytes]:
    return [neigh(VX, NUD_PERMANENT, NTF_SELF, dst="10.0.0.2", seq=seq), done(seq)]


def interrupted(seq: int) -> list[bytes]:
    intr = NLM_F_MULTI | fdb_dump.NLM_F_DUMP_INTR
    return [neigh(VX, NUD_PERMANENT, NTF_SELF, dst="10.0.0.3", seq=seq, flags=intr), done(seq)]


def test_read_dumps_again_when_interrupted():
    fdb, sock = reading(interrupted, interrupted, clean)
    tables = fdb_dump.read(fdb, MANAGED_VXLANS, MANAGED_PORTS)
    assert tables.fdb["otvx1"] == {FdbEntry(mac="02:00:00:00:00:01", dst="10.0.0.2")}
    assert sock.requests == [1, 2, 3] and sock.queue == []


def test_read_reports_a_dump_interrupted_every_time():
    fdb, sock = reading(*[interrupted] * fdb_dump.ATTEMPTS)
    with pytest.raises(DumpInterrupted):
        fdb_dump.read(fdb, MANAGED_VXLANS, MANAGED_PORTS)
    assert len(sock.requests) == fdb_dump.ATTEMPTS and sock.queue == []


def test_read_waits_out_a_dump_still_running_and_asks_again():
    """EBUSY: a dump an earlier read left part-read is still running on the socket."""
    left = [neigh(VX, NUD_PERMANENT, NTF_SELF, dst="10.0.0.9", seq=99), done(99)]
    fdb, sock = reading(lambda seq: [left[0], error(seq, errno.EBUSY), left[1]], clean)
    tables = fdb_dump.read(fdb, MANAGED_VXLANS, MANAGED_PORTS)
    assert tables.fdb["otvx1"] == {FdbEntry(mac="02:00:00:00:00:01", dst="10.0.0.2")}
    assert sock.requests == [1, 2]


def test_read_leaves_nothing_behind_after_an_error():
    bad = [GOOD[:-4]]  # malformed, then the rest of the dump the kernel still sends
    fdb, sock = reading(lambda seq: [*bad, *clean(seq)])
    with pytest.raises(FdbDumpError, match="malformed"):
        fdb_dump.read(fdb, MANAGED_VXLANS, MANAGED_PORTS)
    assert sock.queue == []


def test_read_reports_a_datagram_larger_than_its_buffer():
    fdb, _ = reading(lambda seq: [(GOOD, socket.MSG_TRUNC), done(seq)])
    with pytest.raises(FdbDumpError) as e:
        fdb_dump.read(fdb, MANAGED_VXLANS, MANAGED_PORTS)
    assert e.value.errno == errno.EMSGSIZE


def test_read_passes_on_a_receive_error():
    fdb, _ = reading(lambda seq: [OSError(errno.ENOBUFS, "No buffer space available")])
    with pytest.raises(OSError) as e:
        fdb_dump.read(fdb, MANAGED_VXLANS, MANAGED_PORTS)
    assert e.value.errno == errno.ENOBUFS
