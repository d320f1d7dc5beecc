"""Kernel notifications that tell the agent its managed state may have drifted.

Two non-blocking netlink sockets in the node's namespace, subscribed to multicast groups:
rtnetlink (links, IPv4 addresses, bridge/VXLAN FDB entries, IPv4 netconf — the forwarding
switch) and nfnetlink's nftables group. ``drain()`` reads whatever queued since the last call,
synchronously, and answers whether any of it touched what we own: a link named ``ot…`` (or one
whose ifindex we know as managed), an address or AF_BRIDGE neighbour entry on such a link (or
on any port of such a bridge: an entry of ours moved to a foreign port names that port), any
IPv4 netconf change, or anything in an nftables table named ``otherix``. A receive buffer that
overflowed (ENOBUFS: events were lost) counts as a change. The kernel queues an event before the
write that caused it returns, so a drift made before ``drain()`` is always seen by it; there is
no thread and no callback on any event loop (pyroute2's async sockets do not run on uvloop, and
plain sockets read with ``recv`` need neither).

It never decides what to do about a change (``agent.steady`` does) and never writes anything.
Our own writes echo here too, and the kernel stamps rtnetlink notifications with no sender
(portid 0), so the agent names what it just wrote (``Echoes``, ``drain(echoes)``): the events
of FDB entries written (an add with its dst and state, a delete), the devices it created,
changed or deleted (a tap and its bridge: every event of theirs, the reader then reads them
back, and checks the MACs they announced), and the ``nft`` processes it ran: the kernel
ends each nftables transaction's events with NFT_MSG_NEWGEN naming the process that committed
it (NFTA_GEN_PROC_PID), so the events of our table before a NEWGEN of ours are echoes, and any
other commit touching it is news (the pid is the global one: an agent in a PID namespace sees
its own loads as news, checked by hand). Any other event still counts. WireGuard (wireguard-go's UAPI,
and the kernel module) has no notifications.
"""

import errno
import logging
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.netlink_thread import made_in

log = logging.getLogger(__name__)


NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_NETCONF = 1, 3, 5, 24
NFNLGRP_NFTABLES = 7
SO_RCVBUFFORCE = 33  # not in the socket module
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_NEWNETCONF, RTM_DELNETCONF = 28, 29, 80, 81
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFTA_GEN_PROC_PID = 15, 2
AF_BRIDGE = 7
IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 3, 4, 10
IFF_UP = 0x1
NDA_DST, NDA_LLADDR, NDA_MASTER = 1, 2, 9
NETCONFA_IFINDEX, NETCONFA_IFINDEX_ALL = 1, -1
TABLE_ATTR = 1  # NFTA_{TABLE_NAME,CHAIN_TABLE,RULE_TABLE,SET_TABLE,SET_ELEM_LIST_TABLE,OBJ_TABLE}
OUR_TABLE = b"otherix\0"
PREFIX = b"ot"
RCVBUF = 4 * 2**20

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_NDMSG = struct.Struct("=BxxxiH")  # family, ifindex, state
_NDMSG_SIZE = 12  # with state, flags, type
_RTA = struct.Struct("=HH")
_S32 = struct.Struct("=i")
_BE32 = struct.Struct(">I")
_U32 = struct.Struct("=I")
BridgeState = tuple[bytes, bool, int]  # name, administratively up, MTU


def _u32(value: bytes | None) -> int | None:
    return _U32.unpack(value)[0] if value is not None and len(value) == 4 else None


@dataclass
class Echoes:
    """What the agent's own writes of one reconcile announce (not news), and what reading their
    events taught. ``fdb``: the events of the FDB entries written, as ``fdb_echo`` keys them (an
    entry added is announced with its dst and state, one deleted by its dst, or by its MAC alone
    when the write named no dst), so someone else deleting an entry just added, or setting it to
    another dst, is still news; ``devices``: names
    of links written (a tap created, changed or deleted, and its bridge), whose every link,
    address, AF_BRIDGE neighbour and netconf event is an echo: the caller reads them back after
    the drain, so whatever happened to them before it is seen there (a new device's ifindex is
    learnt from its first link event, which comes before any other of it); ``nft_pids``: the
    ``nft`` processes whose commits are ours."""

    fdb: frozenset[tuple[int, int, bytes, bytes, int]] = frozenset()
    devices: frozenset[bytes] = frozenset()
    nft_pids: frozenset[int] = frozenset()
    indexes: set[int] = field(default_factory=set)  # of ``devices``, as their events name them
    nft_pending: bool = False  # events of our table whose transaction's NEWGEN has not come
    # MACs of the entries announced on the devices written: ours on a tap, the kernel's own (a
    # bridge's address follows its ports' as taps come and go), or one of another port's moved
    # there by someone else (``bridge fdb replace MAC dev <written device>``: that port's loss
    # is in no read-back), which the caller tells apart by the MAC
    macs: set[bytes] = field(default_factory=set)


def fdb_echo(added: bool, index: int, mac: bytes, dst: bytes = b"", state: int = 0) -> tuple:
    """The key of an FDB entry's event in ``Echoes.fdb``: (message type, ifindex, MAC, dst's
    bytes or b"" for none, NUD state; 0 for a delete, whose state the write does not fix). A
    delete written without a dst (a learned entry's) is announced with whichever dst it had:
    keyed with b"", it matches any."""
    return (RTM_NEWNEIGH if added else RTM_DELNEIGH), index, mac, dst, state if added else 0


def messages(data: bytes):
    """(type, flags, body offset, end) of each netlink message of one datagram, read in place;
    a message with an impossible length ends the walk."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, flags, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield kind, flags, offset + _NLMSG.size, min(offset + length, len(data))
        offset += (length + 3) & ~3


def attributes(data: bytes, offset: int, end: int):
    """(type, value) of each netlink attribute in data[offset:end]."""
    while offset + 4 <= end:
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def touches_ours(
    data: bytes,
    managed: set[int],
    echoes: Echoes | None = None,
    bridges: Mapping[int, BridgeState] = {},
) -> bool:
    """Pure but for what it learns: does any message of one datagram (rtnetlink or nftables)
    touch our state? ``managed``: ifindexes of our devices; link events add ``ot…`` devices to
    it. ``echoes``: what the agent itself just wrote (``Echoes``): their events are not news;
    the ifindexes of its ``devices`` and a transaction of our table still waiting for its
    NEWGEN are noted in it (one transaction's events may span datagrams). ``bridges``: our
    bridges by ifindex as last known; a link event that announces one just so (the kernel's
    deferred operstate news after a port came or went) is not news either."""
    echoes = echoes if echoes is not None else Echoes()
    ours = False
    for kind, _, body, end in messages(data):
        if kind >> 8 == NFNL_SUBSYS_NFTABLES:  # nfgenmsg (4 bytes), then the attributes
            attrs = attributes(data, body + 4, end)
            if kind & 0xFF == NFT_MSG_NEWGEN:  # the end of one transaction's events
                if echoes.nft_pending:
                    pid = next((v for t, v in attrs if t == NFTA_GEN_PROC_PID and len(v) == 4), b"")
                    ours |= not pid or _BE32.unpack(pid)[0] not in echoes.nft_pids
                echoes.nft_pending = False
            elif any(t == TABLE_ATTR and v == OUR_TABLE for t, v in attrs):
                if echoes.nft_pids:  # ours or not: its NEWGEN says who committed it
                    echoes.nft_pending = True
                else:
                    ours = True
        elif kind in (RTM_NEWLINK, RTM_DELLINK) and end - body >= _IFINFO.size:
            family, _, index, flags, _ = _IFINFO.unpack_from(data, body)
            attrs = dict(attributes(data, body + _IFINFO.size, end))
            name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0")
            if (
                kind == RTM_NEWLINK
                and family == socket.AF_UNSPEC
                and IFLA_MASTER not in attrs
                and (known := bridges.get(index)) is not None
                and known == (name, bool(flags & IFF_UP), _u32(attrs.get(IFLA_MTU)))
            ):
                continue  # a bridge of ours, announced as we know it
            if name in echoes.devices:  # written by us, read back after the drain
                echoes.indexes.add(index)
                managed.add(index)
            elif name.startswith(PREFIX):
                managed.add(index)
                ours = True
            elif index in managed:  # renamed away from ot…, or deleted
                ours = True
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and end - body >= _IFADDR.size:
            index = _IFADDR.unpack_from(data, body)[4]
            ours |= index in managed and index not in echoes.indexes
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and end - body >= _NDMSG_SIZE:
            family, index, state = _NDMSG.unpack_from(data, body)
            if family != AF_BRIDGE:
                continue  # ARP entries are not ours
            attrs = dict(attributes(data, body + _NDMSG_SIZE, end))
            mac = attrs.get(NDA_LLADDR, b"")
            if index in echoes.indexes:
                echoes.macs.add(mac)
            # an entry on any port of our bridges: one of ours moved to a port not ours is
            # announced by this one event, naming that port
            elif index in managed or _u32(attrs.get(NDA_MASTER)) in managed:
                added = kind == RTM_NEWNEIGH
                dst = attrs.get(NDA_DST, b"")
                ours |= fdb_echo(added, index, mac, dst, state) not in echoes.fdb and (
                    added or fdb_echo(added, index, mac) not in echoes.fdb
                )
        elif kind in (RTM_NEWNETCONF, RTM_DELNETCONF):  # netconfmsg: family, 3 bytes pad
            for t, v in attributes(data, body + 4, end):
                if t == NETCONFA_IFINDEX and len(v) == 4:
                    index = _S32.unpack(v)[0]  # "all" is where IPv4 forwarding is switched
                    if index == NETCONFA_IFINDEX_ALL:
                        ours = True
                    elif index in managed and index not in echoes.indexes:
                        ours = True
    return ours


class KernelEvents:
    """The two subscribed sockets; ``drain()`` says whether our state may have changed."""

    def __init__(self, sockets: Iterable[socket.socket]):
        self._sockets = list(sockets)
        self.managed: set[int] = set()  # ifindexes of our devices, from the last full observe
        self.bridges: dict[int, BridgeState] = {}  # our bridges as last known
        self.overflows = 0

    @classmethod
    def open(cls, netns: str | None = None) -> "KernelEvents":
        """Subscribe in ``netns`` (a socket keeps the namespace it was made in; a short-lived
        thread enters it, so no other thread ever changes namespace)."""
        return cls(made_in(netns, _subscribe, "kernel-events-open"))

    @classmethod
    def try_open(cls, netns: str | None = None) -> "KernelEvents | None":
        """``open``, or None with a warning: the agent then reconciles fully every heartbeat."""
        try:
            return cls.open(netns)
        except OSError as e:
            log.warning("no kernel notifications (%s): every heartbeat is a full reconcile", e)
            return None

    def know(self, indexes: Iterable[int], bridges: Mapping[int, BridgeState] = {}) -> None:
        """The ifindexes of our devices as just observed (replaces the previous set), and our
        bridges' states (see ``touches_ours``)."""
        self.managed = {i for i in indexes if i}
        self.bridges = dict(bridges)

    def drain(self, echoes: Echoes | None = None) -> bool:
        """Read every queued event now; True if any touched our state (or some were lost).
        ``echoes``: what the agent just wrote itself (see ``touches_ours``); an nftables
        transaction of our table whose NEWGEN was not read counts as news."""
        echoes = echoes if echoes is not None else Echoes()
        changed = False
        for sock in self._sockets:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    self.overflows += 1  # events were lost: assume the worst
                    changed = True
                    continue
                # parsed even once changed: link events teach new ot… ifindexes
                changed = touches_ours(data, self.managed, echoes, self.bridges) or changed
        return changed or echoes.nft_pending

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []


class NoDrift:
    """For an in-memory kernel (hollow agents in benches): nothing changes behind the agent."""

    def drain(self, echoes: Echoes | None = None) -> bool:
        return False

    def know(self, indexes: Iterable[int], bridges: Mapping[int, BridgeState] = {}) -> None:
        pass

    def close(self) -> None:
        pass


def _subscribe() -> list[socket.socket]:
    route = _socket(NETLINK_ROUTE, (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_IFADDR,
                                    RTNLGRP_IPV4_NETCONF))  # fmt: skip
    try:
        nft = _socket(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))
    except BaseException:
        route.close()
        raise
    return [route, nft]


def _socket(protocol: int, groups: tuple[int, ...]) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        try:  # root may go past net.core.rmem_max: a burst of our own writes fits
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
