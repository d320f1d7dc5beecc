"""Bulk FDB over a plain rtnetlink socket: append, replace and delete thousands of entries (the
socket's dump is read by ``agent.links.fdb_dump``).

Two kinds of entry go through here: a VXLAN device's own entries (NTF_SELF: MAC → remote tunnel
address, the flood MAC with one entry per dst) and bridge entries on a managed port (NTF_MASTER,
NUD_NOARP = ``static``: MAC → port, never ``permanent``, which the bridge treats as its own
address and delivers up to the host instead of forwarding).

A unicast MAC has exactly one destination, so it is written with NLM_F_CREATE|NLM_F_REPLACE:
one message creates it or moves it, and the MAC is never without an entry. (Appending to an
existing unicast VXLAN entry is silently ignored by the kernel, and a bridge MAC can sit on only
one port, so append-then-delete would leave a hole.) Only flood/multicast MACs are appended.

Why not pyroute2 here: decoding a 10,000-entry AF_BRIDGE dump through its message classes took
0.6 s and one request per entry about 0.8 ms (bench/fdb_apply.py), which made a cold overlay
apply 50x slower than ``bridge -batch`` and a no-op heartbeat cost a second of CPU. FDB messages
are tiny and fixed in shape, so this module packs and parses them with ``struct`` and pipelines
requests in chunks. Only the last request of a chunk asks for an ack: the kernel handles a
chunk's messages in order and reports every failure anyway, so one receive per chunk (not per
entry) tells which entries failed. Everything else stays on pyroute2.
"""

import errno
import socket
import struct
from collections.abc import Iterator, Sequence

RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x400, 0x800
NDA_DST, NDA_LLADDR, NDA_VLAN, NDA_MASTER = 1, 2, 5, 9
NTF_SELF, NTF_MASTER, NTF_EXT_LEARNED = 0x02, 0x04, 0x10
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80

APPEND, REPLACE, DELETE = "append", "replace", "delete"
_OPS = {  # op -> (message type, flags, errnos that mean "already so")
    APPEND: (RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, {errno.EEXIST}),
    REPLACE: (RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, set()),
    DELETE: (RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, {errno.ENOENT}),
}

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTA = struct.Struct("=HH")
# a whole request in one pack: header, ndmsg, NDA_LLADDR (6 bytes + 2 padding)[, NDA_DST]
_REQUEST = struct.Struct("=IHHIIBxxxiHBBHH6sxx")
_REQUEST_DST = struct.Struct("=IHHIIBxxxiHBBHH6sxxHH4s")
_VLAN, _U32 = struct.Struct("=H"), struct.Struct("=I")
_USUAL = struct.Struct("=BxxxiHBBHH6sxxHH4s")  # ndmsg, NDA_LLADDR, one 4-byte attribute
CHUNK = 512  # requests in flight per send: acks (36 bytes each) fit the receive buffer easily


class FdbRecord(tuple):
    """(ifindex, mac, dst or None, NUD state, NTF flags, vlan or 0, bridge ifindex or 0)."""

    __slots__ = ()
    ifindex = property(lambda s: s[0])
    mac = property(lambda s: s[1])
    dst = property(lambda s: s[2])
    state = property(lambda s: s[3])
    flags = property(lambda s: s[4])
    vlan = property(lambda s: s[5])
    permanent = property(lambda s: bool(s[3] & NUD_PERMANENT))
    static = property(lambda s: bool(s[3] & NUD_NOARP))  # "static": set by hand, never aged
    own = property(lambda s: bool(s[4] & NTF_SELF))  # the device's own entry (VXLAN: to a dst)
    # its bridge's entry (MAC → this port): dumps name the bridge in NDA_MASTER, not in the flags
    master = property(lambda s: s[6])


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTA.size + len(payload)
    return _RTA.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def encode_entry(
    seq: int,
    msg_type: int,
    flags: int,
    ifindex: int,
    mac: str,
    dst: str | None,
    master: bool = False,
) -> bytes:
    """One RTM_NEWNEIGH/RTM_DELNEIGH: a VXLAN self entry, or (master) a static bridge entry."""
    state, ntf = (NUD_NOARP, NTF_MASTER) if master else (NUD_PERMANENT, NTF_SELF)
    lladdr = bytes.fromhex(mac.replace(":", ""))
    if len(lladdr) != 6:  # sent as it is, for the kernel to refuse (struct would pad it)
        body = _NDMSG.pack(socket.AF_BRIDGE, ifindex, state, ntf, 0) + _attr(NDA_LLADDR, lladdr)
        body += _attr(NDA_DST, socket.inet_aton(dst)) if dst is not None else b""
        return _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, 0) + body
    if dst is None:
        return _REQUEST.pack(_REQUEST.size, msg_type, flags, seq, 0,
                             socket.AF_BRIDGE, ifindex, state, ntf, 0, 10, NDA_LLADDR, lladdr)  # fmt: skip
    return _REQUEST_DST.pack(_REQUEST_DST.size, msg_type, flags, seq, 0,
                             socket.AF_BRIDGE, ifindex, state, ntf, 0, 10, NDA_LLADDR, lladdr,
                             8, NDA_DST, socket.inet_aton(dst))  # fmt: skip


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of every netlink message in a receive buffer."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, flags, seq, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        yield kind, flags, seq, data[offset + _NLMSG.size : offset + length]
        offset += _align(length)


def parse_neigh(data: bytes, start: int = 0, end: int | None = None) -> FdbRecord:
    """An ndmsg and its attributes, from ``data[start:end]`` (no copy of a dump's buffer)."""
    end = len(data) if end is None else end
    mac = dst = None
    vlan = master = 0
    if end - start >= _USUAL.size:
        # the kernel's usual layout: NDA_LLADDR, then NDA_DST (VXLAN) or NDA_MASTER (bridge)
        _f, ifindex, state, flags, _t, l1, t1, lladdr, l2, t2, value = _USUAL.unpack_from(
            data, start
        )
        if (l1, t1, l2) == (10, NDA_LLADDR, 8) and t2 in (NDA_DST, NDA_MASTER):
            mac = lladdr.hex(":")
            if t2 == NDA_DST:
                dst = socket.inet_ntoa(value)
            else:
                (master,) = _U32.unpack(value)
            offset = start + _USUAL.size
        else:
            offset = start + _NDMSG.size
    else:
        _f, ifindex, state, flags, _t = _NDMSG.unpack_from(data, start)
        offset = start + _NDMSG.size
    last = end - _RTA.size
    while offset <= last:  # a dump parses thousands of these: kept flat on purpose
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size:
            break
        if kind == NDA_LLADDR and length == 10:
            mac = data[offset + 4 : offset + 10].hex(":")
        elif kind == NDA_DST and length == 8:
            dst = socket.inet_ntoa(data[offset + 4 : offset + 8])
        elif kind == NDA_MASTER and length == 8:
            (master,) = _U32.unpack_from(data, offset + 4)
        elif kind == NDA_VLAN and length == 6:
            (vlan,) = _VLAN.unpack_from(data, offset + 4)
        offset += (length + 3) & ~3
    return FdbRecord((ifindex, mac, dst, state, flags, vlan, master))


class FdbSocket:
    """A blocking rtnetlink socket used from the netlink thread only."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def change(
        self,
        op: str,
        entries: Sequence[tuple[int, str, str | None]],
        master: bool = False,
    ) -> list[tuple[int, int]]:
        """Apply ``op`` to (ifindex, mac, dst) entries; returns (position, errno) of failures.

        ``append`` adds a destination (flood MACs), ``replace`` creates or moves an entry in one
        message, ``delete`` removes one. ``master`` entries are static bridge entries on the
        port ``ifindex`` (dst None). Appending an existing entry and deleting a missing one
        count as success (idempotent).
        """
        msg_type, flags, fine = _OPS[op]
        quiet = flags & ~NLM_F_ACK  # failures are reported without NLM_F_ACK, successes not
        failures = []
        for start in range(0, len(entries), CHUNK):
            stop = min(start + CHUNK, len(entries))
            first_seq = self.seq + 1
            out = bytearray()
            for position in range(start, stop):
                ifindex, mac, dst = entries[position]
                seq = self.next_seq()
                out += encode_entry(
                    seq,
                    msg_type,
                    flags if position == stop - 1 else quiet,
                    ifindex,
                    mac,
                    dst,
                    master,
                )
            self.sock.send(bytes(out))
            last_seq, done = self.seq, False
            while not done:
                for kind, _f, seq, payload in parse_messages(self.sock.recv(1 << 20)):
                    position = start + ((seq - first_seq) & 0xFFFFFFFF)
                    if kind != NLMSG_ERROR or not start <= position < stop:
                        continue  # not ours (a stale answer from an earlier request)
                    code = -struct.unpack_from("=i", payload)[0]
                    if code and code not in fine:
                        failures.append((position, code))
                    done |= seq == last_seq
        return failures
