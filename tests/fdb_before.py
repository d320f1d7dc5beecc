"""The oracle for ``agent.links.fdb_dump``: the FDB half of the links observe as it was before it
(``FdbSocket.dump`` then the sorting loop of ``agent.links.netlink.observe``, commit eaceafa),
kept verbatim but for reading datagrams someone else received. Tests feed both the same bytes
(and the same kernel) and compare."""

import struct
from collections.abc import Iterable, Mapping

from agent.links.fdb_socket import (
    _NDMSG,
    _NLMSG,
    NLMSG_DONE,
    NLMSG_ERROR,
    NTF_EXT_LEARNED,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RTM_NEWNEIGH,
    FdbRecord,
    parse_neigh,
)
from schemas.desired import FdbEntry


def dump(datagrams: Iterable[bytes], seq: int, ifindexes: Iterable[int]) -> list[FdbRecord]:
    """``FdbSocket.dump``'s receive loop over ``datagrams``."""
    wanted = set(ifindexes)
    records = []
    header, ndmsg = _NLMSG.unpack_from, _NDMSG.unpack_from
    for data in datagrams:
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _flags, msg_seq, _ = header(data, offset)
            if length < _NLMSG.size:
                break
            if msg_seq == seq:
                if kind == NLMSG_DONE:
                    return records
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                    raise OSError(code, "fdb dump")
                if kind == RTM_NEWNEIGH and ndmsg(data, offset + _NLMSG.size)[1] in wanted:
                    records.append(parse_neigh(data, offset + _NLMSG.size, offset + length))
            offset += (length + 3) & ~3
    raise AssertionError("the old loop would have waited for more")


def tables(
    datagrams: Iterable[bytes], seq: int, vxlans: Mapping[int, str], ports: Mapping[int, str]
) -> tuple[dict, dict, dict, dict]:
    """(fdb, learned, port_fdb, port_learned) as the old observe built them."""
    fdb: dict[int, set[FdbEntry]] = {i: set() for i in vxlans}
    learned: dict[int, set[str]] = {i: set() for i in vxlans}
    port_fdb: dict[int, set[str]] = {i: set() for i in ports}
    port_learned: dict[int, set[str]] = {i: set() for i in ports}
    if vxlans or ports:
        for index, mac, dst, state, flags, vlan, _bridge in dump(
            datagrams, seq, vxlans.keys() | ports.keys()
        ):
            if mac is None:
                continue
            if flags & NTF_SELF:  # a device's own entry: only a VXLAN device's are ours
                if index not in vxlans:
                    continue
                if dst and state & NUD_PERMANENT:
                    fdb[index].add(FdbEntry(mac=mac, dst=dst))
                else:
                    learned[index].add(mac)
            elif index in ports and not vlan:  # its bridge's entry: MAC -> this port
                if state & NUD_PERMANENT or flags & NTF_EXT_LEARNED:
                    continue  # the port's own address, or a driver's: not ours to touch
                if state & NUD_NOARP:
                    port_fdb[index].add(mac)
                else:
                    port_learned[index].add(mac)
    return (
        {vxlans[i]: frozenset(e) for i, e in fdb.items()},
        {vxlans[i]: frozenset(e) for i, e in learned.items()},
        {ports[i]: frozenset(e) for i, e in port_fdb.items()},
        {ports[i]: frozenset(e) for i, e in port_learned.items()},
    )
