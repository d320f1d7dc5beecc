"""The FDB half of the links observe: one AF_BRIDGE neighbour dump (RTM_GETNEIGH) on the bulk
FDB socket, parsed straight into the four FDB tables of ``agent.links.model.Observed``.

Which entry goes where (the rules ``agent.links.netlink.observe`` applied to one record per
entry before this module; ``tests/fdb_before.py`` keeps that code as the tests' oracle):

- a device's own entry (NTF_SELF) counts only on a managed VXLAN device: with an IPv4 dst and
  NUD_PERMANENT it is in ``fdb`` (MAC → dst; the all-zero flood MAC once per dst), anything else
  there (no dst, not permanent) is ``learned``. The VNI, port, source VNI and via attributes
  are not read. Other devices' own entries (a tap's addresses) are not ours.
- its bridge's entry (no NTF_SELF) on a managed bridge port and outside any VLAN: ``port_fdb``
  when static (NUD_NOARP), else ``port_learned``; the port's own addresses (NUD_PERMANENT) and
  entries a driver added (NTF_EXT_LEARNED) are not ours.
- everything else (foreign devices, a bridge's own addresses, entries in a VLAN) is skipped.

``parse`` is pure and strict: a truncated or malformed message, an entry on a managed device
without a 6-byte MAC, an error answer, a dump the kernel ended with an error, or one that never
ended raises ``FdbDumpError``; no entry is silently dropped. A dump the kernel marks
inconsistent (NLM_F_DUMP_INTR: the table changed under it) raises ``DumpInterrupted`` once read
to its end; ``read`` then dumps again, up to ``ATTEMPTS`` times, before it reports it.

Why two paths: at 10,000 FDB entries a node holds about 20,000 (each remote MAC once on its
VXLAN device and once as a static entry on the VXLAN port), and a Python loop over them, one
record per entry, cost about 30 ms of CPU per full observe. The kernel fills a dump's datagrams
(up to 32 KiB, about 450 entries) with one device's entries after another, so a run of messages
of one fixed layout (``_LAYOUTS``; checked 32 bits at a time, in every message) is unpacked
with ``struct.iter_unpack`` and sorted a device, state and flags at a time; anything else is
walked message by message. Both apply the rules through ``_Tables.add``. This module only reads.
"""

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import groupby, repeat
from typing import NamedTuple

from agent.links.fdb_socket import (
    NDA_DST,
    NDA_LLADDR,
    NDA_MASTER,
    NDA_VLAN,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NTF_EXT_LEARNED,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RTM_GETNEIGH,
    RTM_NEWNEIGH,
    FdbSocket,
)
from schemas.desired import FdbEntry

NLM_F_DUMP_INTR = 0x10
ATTEMPTS = 3  # dumps in a row the kernel may interrupt before ``read`` reports it
RECV_SIZE = 1 << 20  # the kernel fills a dump's datagrams to at most 32 KiB: room to spare

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")
_ATTR = struct.Struct("=HH")
_VLAN = struct.Struct("=H")


# The fixed layouts of a whole neighbour message the kernel dumps in long runs: header, ndmsg,
# NDA_LLADDR (6 bytes), a 4-byte NDA_DST (a VXLAN entry) or NDA_MASTER (a bridge entry), [one
# more 4-byte attribute, such as a bridge entry's NDA_FLAGS_EXT or a VXLAN entry's NDA_VNI,] and
# a 16-byte one (NDA_CACHEINFO); by message size.
class _Layout(NamedTuple):
    shape: struct.Struct  # what every message of a run shares: length, type, flags, seq, then
    # (length, type) of each attribute
    words: tuple[int, ...]  # where that is, in 32-bit words from the message's start
    entry: struct.Struct  # what may differ: ifindex, state, flags, MAC, dst (or master)


_LAYOUTS = {
    68: _Layout(struct.Struct("=IHHI16xHH8xHH4xHH"), (0, 1, 2, 7, 10, 12),
                struct.Struct("=20xiHB5x6s6x4s20x")),
    76: _Layout(struct.Struct("=IHHI16xHH8xHH4xHH4xHH"), (0, 1, 2, 7, 10, 12, 14),
                struct.Struct("=20xiHB5x6s6x4s28x")),
}  # fmt: skip
_READ = {NDA_LLADDR, NDA_DST, NDA_VLAN}  # the attributes the rules read


class FdbDumpError(OSError):
    """The FDB dump failed, or its answer cannot be read whole."""


class DumpInterrupted(FdbDumpError):
    """The kernel marked the dump inconsistent (NLM_F_DUMP_INTR): read it again."""

    def __init__(self) -> None:
        super().__init__(errno.EINTR, "fdb dump interrupted: the table changed while dumped")


class FdbTables(NamedTuple):
    """``Observed``'s FDB fields: every managed VXLAN device (``fdb``, ``learned``) and bridge
    port (``port_fdb``, ``port_learned``) by name, with what was found on it."""

    fdb: dict[str, frozenset[FdbEntry]]
    learned: dict[str, frozenset[str]]
    port_fdb: dict[str, frozenset[str]]
    port_learned: dict[str, frozenset[str]]


_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, ifindex, flags, change


def request(seq: int, port: int = 0) -> bytes:
    """The dump request: every AF_BRIDGE neighbour entry (bridge FDBs, VXLAN FDBs), or only
    those of bridge port ``port`` (an ifinfomsg header naming it, which the kernel filters on,
    as ``bridge fdb show brport``)."""
    if port:
        body = _IFINFOMSG.pack(socket.AF_BRIDGE, 0, port, 0, 0)
    else:
        body = _NDMSG.pack(socket.AF_BRIDGE, 0, 0, 0, 0)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSG.pack(_NLMSG.size + len(body), RTM_GETNEIGH, flags, seq, 0) + body


def read(
    fdb: FdbSocket, vxlans: Mapping[int, str], ports: Mapping[int, str], port: int = 0
) -> FdbTables:
    """Dump on ``fdb``'s socket (every entry, or bridge port ``port``'s) and ``parse``. A dump
    the kernel interrupted, or refused because another was still running on the socket
    (EBUSY), is asked again; after any failure the socket is read empty, so no dump is left
    running to refuse the next one."""
    for attempt in range(1, ATTEMPTS + 1):
        seq = fdb.next_seq()
        fdb.sock.send(request(seq, port))
        try:
            return parse(_datagrams(fdb.sock), seq, vxlans, ports)
        except OSError as e:
            _finish(fdb.sock)
            if e.errno not in (errno.EINTR, errno.EBUSY) or attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _finish(sock: socket.socket) -> None:
    """Read whatever the socket holds, and any dump still running on it, to the end."""
    while True:
        try:
            sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)  # a running dump refills on each read
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise


def _datagrams(sock: socket.socket) -> Iterator[bytes]:
    while True:
        data, _, flags, _ = sock.recvmsg(RECV_SIZE)
        if flags & socket.MSG_TRUNC:
            raise FdbDumpError(errno.EMSGSIZE, f"fdb dump: a datagram over {RECV_SIZE} bytes")
        yield data


def parse(
    datagrams: Iterable[bytes],
    seq: int,
    vxlans: Mapping[int, str],
    ports: Mapping[int, str],
) -> FdbTables:
    """Pure: the answer to dump ``seq`` (datagrams as received, up to its NLMSG_DONE) → the FDB
    tables of the managed VXLAN devices and bridge ports (ifindex → name; a VXLAN device is
    usually a port too). Messages of other sequence numbers (stale answers) are skipped."""
    tables = _Tables(vxlans, ports)
    interrupted = False
    for data in datagrams:
        ended, marked = _datagram(data, seq, tables)
        interrupted |= marked
        if ended:
            break
    else:
        raise FdbDumpError(errno.EPROTO, "fdb dump: the answer ended without NLMSG_DONE")
    if interrupted:
        raise DumpInterrupted()
    return tables.frozen()


class _Tables:
    """The four tables being filled, and the rules (``add``)."""

    def __init__(self, vxlans: Mapping[int, str], ports: Mapping[int, str]):
        self.vxlans, self.ports = vxlans, ports
        self.wanted = vxlans.keys() | ports.keys()
        self.ips = _Addresses()
        self.fdb: dict[str, set[FdbEntry]] = {name: set() for name in vxlans.values()}
        self.learned: dict[str, set[str]] = {name: set() for name in vxlans.values()}
        self.port_fdb: dict[str, set[str]] = {name: set() for name in ports.values()}
        self.port_learned: dict[str, set[str]] = {name: set() for name in ports.values()}

    def add(
        self,
        ifindex: int,
        state: int,
        flags: int,
        vlan: int,
        macs: Sequence[bytes],
        dsts: Sequence[bytes] | None,
    ) -> None:
        """Entries alike but for their MAC (6 bytes) and IPv4 dst (4 bytes each, or None for
        entries without one), on one device."""
        if flags & NTF_SELF:  # a device's own entry: only a VXLAN device's are ours
            name = self.vxlans.get(ifindex)
            if name is None:
                return
            if dsts is not None and state & NUD_PERMANENT:
                ips = map(self.ips.__getitem__, dsts)
                self.fdb[name].update(map(_entry, map(bytes.hex, macs, repeat(":")), ips))
            else:
                self.learned[name].update(map(bytes.hex, macs, repeat(":")))
        elif not vlan:  # its bridge's entry: MAC -> this port
            name = self.ports.get(ifindex)
            if name is None or state & NUD_PERMANENT or flags & NTF_EXT_LEARNED:
                return  # not a managed port; the port's own address, or a driver's: not ours
            table = self.port_fdb if state & NUD_NOARP else self.port_learned
            table[name].update(map(bytes.hex, macs, repeat(":")))

    def frozen(self) -> FdbTables:
        return FdbTables(
            fdb={name: frozenset(e) for name, e in self.fdb.items()},
            learned={name: frozenset(e) for name, e in self.learned.items()},
            port_fdb={name: frozenset(e) for name, e in self.port_fdb.items()},
            port_learned={name: frozenset(e) for name, e in self.port_learned.items()},
        )


class _Addresses(dict[bytes, str]):
    """IPv4 addresses as text, each formatted once (a few dozen tunnel addresses per dump)."""

    def __missing__(self, packed: bytes) -> str:
        text = self[packed] = socket.inet_ntoa(packed)
        return text


def _entry(mac: str, dst: str) -> FdbEntry:
    return FdbEntry(mac=mac, dst=dst)


def _datagram(data: bytes, seq: int, tables: _Tables) -> tuple[bool, bool]:
    """One datagram into ``tables``: (the dump ended, some message was marked interrupted).
    Runs of one fixed layout go through ``_run``; the rest, message by message."""
    offset, n, interrupted = 0, len(data), False
    while offset < n:
        stop = _run_end(data, offset)
        if stop > offset and _run(data[offset:stop], seq, tables):
            offset = stop
            continue
        stop = max(stop, offset + 1)  # the run's messages one by one, or else one message
        while offset < stop:
            offset, ended, marked = _message(data, offset, seq, tables)
            interrupted |= marked
            if ended:
                return True, interrupted
    return False, interrupted


def _run_end(data: bytes, offset: int) -> int:
    """Where the run of messages of one ``_LAYOUTS`` size from ``offset`` seems to end (judged
    by their lengths' low bytes; ``_run`` checks every field), or ``offset`` when none starts."""
    if len(data) - offset < _U32.size:
        return offset
    (size,) = _U32.unpack_from(data, offset)
    if size not in _LAYOUTS:
        return offset
    lows = data[offset::size]
    count = min(len(lows) - len(lows.lstrip(bytes((size,)))), (len(data) - offset) // size)
    return offset + count * size


def _run(data: bytes, seq: int, tables: _Tables) -> bool:
    """Messages of one size in ``_LAYOUTS``, filling ``data``: when each is an entry of this
    dump in that layout, without NLM_F_DUMP_INTR, they are added run by run of one device,
    state and flags, and True. Else False, and nothing was added."""
    size = _U32.unpack_from(data)[0]
    layout, count = _LAYOUTS[size], len(data) // size
    words = memoryview(data).cast("I")
    for word in layout.words:  # each the same in every message: compared 32 bits at a time
        column = words[word :: size // 4].tobytes()
        if column != column[:4] * count:
            return False
    length, kind, flags, msg_seq, l1, t1, l2, t2, *rest = layout.shape.unpack_from(data)
    if (length, kind, flags, msg_seq, l1, t1, l2) != (
        size, RTM_NEWNEIGH, NLM_F_MULTI, seq, 10, NDA_LLADDR, 8,
    ) or t2 not in (NDA_DST, NDA_MASTER):  # fmt: skip
        return False
    if size == 76 and (rest[0] != 8 or rest[1] in _READ) or rest[-2] != 20:
        return False
    ifindexes, states, ntfs, macs, values = zip(*layout.entry.iter_unpack(data), strict=True)
    dsts = values if t2 == NDA_DST else None
    if all(c.count(c[0]) == count for c in (ifindexes, states, ntfs)):  # the usual: one run
        tables.add(ifindexes[0], states[0], ntfs[0], 0, macs, dsts)
        return True
    start = 0
    for (ifindex, state, ntf), group in groupby(zip(ifindexes, states, ntfs, strict=True)):
        stop = start + len(list(group))
        tables.add(ifindex, state, ntf, 0, macs[start:stop], dsts and dsts[start:stop])
        start = stop
    return True


def _message(data: bytes, offset: int, seq: int, tables: _Tables) -> tuple[int, bool, bool]:
    """The message at ``offset`` into ``tables``: (the next one's offset, the dump ended, it
    was marked interrupted)."""
    n = len(data)
    if n - offset < _NLMSG.size:
        raise _malformed(f"{n - offset} bytes left over after the last message")
    length, kind, flags, msg_seq, _ = _NLMSG.unpack_from(data, offset)
    start, end = offset + _NLMSG.size, offset + length
    if length < _NLMSG.size or end > n:
        raise _malformed(f"a message of {length} bytes at {offset} of a {n}-byte datagram")
    following = (end + 3) & ~3
    if msg_seq != seq:
        return following, False, False  # a stale answer to an earlier request on this socket
    interrupted = bool(flags & NLM_F_DUMP_INTR)
    if kind == RTM_NEWNEIGH:
        if end - start < _NDMSG.size:
            raise _malformed(f"a neighbour message of {length} bytes")
        _, ifindex, state, ntf, _ = _NDMSG.unpack_from(data, start)
        mac, dst, vlan = _attributes(data, start + _NDMSG.size, end)
        if ifindex in tables.wanted:
            if mac is None:
                raise _malformed(f"an entry on ifindex {ifindex} without a 6-byte MAC")
            tables.add(ifindex, state, ntf, vlan, (mac,), None if dst is None else (dst,))
    elif kind == NLMSG_DONE or kind == NLMSG_ERROR:
        # a dump that failed part-way ends with NLMSG_DONE carrying the error
        if end - start < _ERR.size:
            if kind == NLMSG_ERROR:
                raise _malformed(f"an error message of {length} bytes")
            code = 0
        else:
            code = -_ERR.unpack_from(data, start)[0]
        if code:
            raise FdbDumpError(code, f"fdb dump: {os.strerror(code)}")
        return following, kind == NLMSG_DONE, interrupted
    return following, False, interrupted


def _attributes(data: bytes, offset: int, end: int) -> tuple[bytes | None, bytes | None, int]:
    """The MAC (6 bytes), IPv4 dst (4) and VLAN among the attributes in ``data[offset:end]``; a
    later attribute of a kind wins, one of another size is not read. Raises when malformed."""
    mac = dst = None
    vlan = 0
    while offset < end:
        if end - offset < _ATTR.size:
            raise _malformed(f"{end - offset} bytes left over after the last attribute")
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            raise _malformed(f"an attribute of {length} bytes in a {end - offset}-byte rest")
        if kind == NDA_LLADDR and length == 10:
            mac = data[offset + 4 : offset + 10]
        elif kind == NDA_DST and length == 8:
            dst = data[offset + 4 : offset + 8]
        elif kind == NDA_VLAN and length == 6:
            (vlan,) = _VLAN.unpack_from(data, offset + 4)
        offset += (length + 3) & ~3
    return mac, dst, vlan


def _malformed(what: str) -> FdbDumpError:
    return FdbDumpError(errno.EPROTO, f"fdb dump malformed: {what}")
