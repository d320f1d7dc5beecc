"""Our named nftables counters (the drop reasons) read straight from the kernel: one netlink dump
of the counter objects of the tables named ``otherix`` (every family), on a NETFILTER socket.

Health reports the drop counters every few seconds; ``nft -j list table`` twice (a process
each, the whole tables parsed as JSON) cost about 20 ms of CPU for that, while this dump takes
well under a millisecond. It answers what ``agent.nft.rules.parse_observed`` finds in the
listings: name → (packets, bytes), the ``bridge`` table's counter winning over an ``inet`` one
of the same name (listings are read inet first). It only reads; ``parse`` is pure.
"""

import errno
import os
import socket
import struct

from agent.kernel_events import attributes, messages
from agent.netlink_thread import made_in
from agent.nft.rules import FAMILIES, TABLE, Counter

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
FAMILY_NUMBERS = {"inet": 1, "bridge": 7}  # NFPROTO_*
TIMEOUT = 2.0

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, unused)
_RTA = struct.Struct("=HH")
_U32BE = struct.Struct(">I")
_U64BE = struct.Struct(">Q")
_ERR = struct.Struct("=i")


def _attr(kind: int, value: bytes) -> bytes:
    data = _RTA.pack(_RTA.size + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def request(seq: int = 1) -> bytes:
    """The dump request: counter objects of every table named ``otherix``, any family."""
    body = _NFGEN.pack(0, 0, 0)  # NFPROTO_UNSPEC: every family
    body += _attr(NFTA_OBJ_TABLE, TABLE.encode() + b"\0")
    body += _attr(NFTA_OBJ_TYPE, _U32BE.pack(NFT_OBJECT_COUNTER))
    kind = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETOBJ
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse(datagrams: list[bytes]) -> tuple[dict[str, Counter], bool]:
    """Pure: the dump's answer → (name → Counter, whether the dump ended). An error answer or
    a malformed one raises OSError."""
    per_family: dict[int, dict[str, Counter]] = {}
    done = False
    for data in datagrams:
        done = _parse_into(per_family, data) or done
        if done:
            break
    return _merge(per_family), done


def _parse_into(per_family: dict[int, dict[str, Counter]], data: bytes) -> bool:
    """One datagram's counters into ``per_family``; True at the end of the dump."""
    try:
        return _parse_datagram(per_family, data)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise OSError(f"nftables counter dump malformed: {e}") from None


def _parse_datagram(per_family: dict[int, dict[str, Counter]], data: bytes) -> bool:
    for kind, flags, body, end in messages(data):
        if flags & NLM_F_DUMP_INTR:  # the tables changed during the dump: its figures are mixed
            raise OSError(errno.EINTR, "nftables counter dump interrupted; read again")
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            # a dump that failed part-way ends with NLMSG_DONE carrying the error
            if kind == NLMSG_ERROR and end - body < _ERR.size:
                raise OSError("nftables counter dump malformed: a short error message")
            code = -_ERR.unpack_from(data, body)[0] if end - body >= _ERR.size else 0
            if code:
                raise OSError(code, f"nftables counter dump: {os.strerror(code)}")
            if kind == NLMSG_DONE:
                return True
            continue
        if kind != NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWOBJ:
            continue
        family = data[body]
        attrs = dict(attributes(data, body + _NFGEN.size, end))
        if attrs.get(NFTA_OBJ_TABLE, b"").rstrip(b"\0") != TABLE.encode():
            continue
        if _U32BE.unpack(attrs.get(NFTA_OBJ_TYPE, b"\0\0\0\0"))[0] != NFT_OBJECT_COUNTER:
            continue
        name = attrs.get(NFTA_OBJ_NAME, b"").rstrip(b"\0").decode()
        nested = attrs.get(NFTA_OBJ_DATA, b"")
        values = dict(attributes(nested, 0, len(nested)))
        packets = values.get(NFTA_COUNTER_PACKETS)
        octets = values.get(NFTA_COUNTER_BYTES)
        per_family.setdefault(family, {})[name] = Counter(
            _U64BE.unpack(packets)[0] if packets and len(packets) == 8 else 0,
            _U64BE.unpack(octets)[0] if octets and len(octets) == 8 else 0,
        )
    return False


def _merge(per_family: dict[int, dict[str, Counter]]) -> dict[str, Counter]:
    """In the order the ``nft`` listings are read (``FAMILIES``): a later family wins."""
    out: dict[str, Counter] = {}
    for family in FAMILIES:
        out.update(per_family.get(FAMILY_NUMBERS[family], {}))
    return out


def read(netns: str | None = None) -> dict[str, Counter]:
    """Our named counters now (empty when neither table exists). ``netns``: read in that
    namespace (``agent.netlink_thread.made_in``)."""
    return made_in(netns, _read, "nft-counters")


def _read() -> dict[str, Counter]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_NETFILTER) as sock:  # fmt: skip
        sock.settimeout(TIMEOUT)
        sock.bind((0, 0))
        sock.send(request())
        per_family: dict[int, dict[str, Counter]] = {}
        while not _parse_into(per_family, sock.recv(65536)):
            pass
        return _merge(per_family)
