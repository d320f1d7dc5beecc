"""``agent.links.fdb_dump`` against the real kernel, in a throwaway namespace: the links observe
fills the FDB tables exactly as the code before it did (``tests/fdb_before.py``) for every kind
of entry the kernel makes on bridges and VXLAN devices, over a dump of many datagrams."""

import secrets
import socket
import subprocess
import time

import pytest

from agent.links import fdb_dump
from agent.links.fdb_socket import NLMSG_DONE, FdbSocket, parse_messages
from agent.links.netlink import NetlinkLinks
from agent.netlink_thread import NetlinkThread, made_in
from schemas.desired import FdbEntry
from tests import fdb_before

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

TAP, VETH, STRAY_VX = "ot0000000000a1", "ot0000000000a2", "otvx1002"
BULK = 1_500  # remote MACs per overlay: the dump spans many datagrams

# every kind of AF_BRIDGE entry the kernel here accepts, with where the observe must put it
# ("-": reported nowhere); flood entries, learned ones, static ones, the ports' own addresses
ENTRIES = [
    ("00:00:00:00:00:00 dev otvx1000 dst 100.64.0.2 self permanent", "fdb"),
    ("00:00:00:00:00:00 dev otvx1000 dst 100.64.0.3 self permanent", "fdb"),
    ("02:00:00:00:01:01 dev otvx1000 dst 100.64.0.2 self permanent", "fdb"),
    ("02:00:00:00:01:02 dev otvx1000 dst 100.64.0.3 vni 5000 self permanent", "fdb"),
    ("02:00:00:00:01:03 dev otvx1000 dst 100.64.0.3 port 4790 self permanent", "fdb"),
    ("02:00:00:00:01:04 dev otvx1000 dst 100.64.0.4 via eth10 self permanent", "fdb"),
    ("02:00:00:00:01:09 dev otvx1000 dst 100.64.0.9 src_vni 77 self permanent", "fdb"),
    ("02:00:00:00:01:05 dev otvx1000 dst 100.64.0.5 self dynamic", "learned"),
    ("02:00:00:00:01:06 dev otvx1000 dst 100.64.0.6 self static", "learned"),
    ("02:00:00:00:02:01 dev otvx1002 dst 100.64.0.2 self permanent", "fdb"),  # not a port
    ("02:00:00:00:03:01 dev otvx1000 master static", "port_fdb"),
    (f"02:00:00:00:03:02 dev {TAP} master static", "port_fdb"),
    (f"02:00:00:00:03:07 dev {TAP} master static sticky", "port_fdb"),
    (f"02:00:00:00:03:05 dev {TAP} master extern_learn", "-"),
    (f"02:00:00:00:03:06 dev {TAP} master permanent", "-"),
    (f"02:00:00:00:03:08 dev {TAP} self permanent", "-"),  # a tap's own address list
    ("02:00:00:00:03:09 dev otb1000 self permanent", "-"),  # the bridge's own
    ("02:00:00:00:04:01 dev otvx1001 dst 100.64.0.7 self permanent", "fdb"),
    ("02:00:00:00:04:02 dev otvx1001 master static", "port_fdb"),
    (f"02:00:00:00:04:03 dev {VETH} master static", "port_fdb"),
    ("02:00:00:00:09:01 dev eth9 master static", "-"),  # a foreign bridge's
    ("02:00:00:00:09:02 dev vx9 dst 100.64.0.2 self permanent", "-"),  # a foreign VXLAN's
]
LEARNED_ON_VETH = "02:00:00:00:04:05"  # the bridge learns it from a frame (port_learned)


def sh(ns: str, *argv: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                          text=True, timeout=20, input=stdin).stdout  # fmt: skip


def build(ns: str) -> None:
    """Two overlays (bridge, VXLAN port, a tap or veth port), a VXLAN device on no bridge, a
    foreign bridge and VXLAN; ``ENTRIES``, ``BULK`` remote MACs per overlay, a learned one."""
    sh(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")  # no chatter to learn from
    script = f"""
        link add otb1000 type bridge
        link add otvx1000 type vxlan id 1000 local 100.64.0.1 dstport 4789 nolearning
        link set otvx1000 master otb1000
        tuntap add mode tap name {TAP}
        link set {TAP} master otb1000
        link add otb1001 type bridge
        link add otvx1001 type vxlan id 1001 local 100.64.0.1 dstport 4789 nolearning
        link set otvx1001 master otb1001
        link add {VETH} type veth peer name eth11
        link set {VETH} master otb1001
        link add {STRAY_VX} type vxlan id 1002 local 100.64.0.1 dstport 4789 nolearning
        link add br9 type bridge
        link add eth9 type veth peer name eth10
        link set eth9 master br9
        link add vx9 type vxlan id 9 local 100.64.0.1 dstport 4789 nolearning
    """
    devices = "otb1000 otvx1000 {0} otb1001 otvx1001 {1} eth11 {2} br9 eth9 eth10 vx9"
    script += "".join(f"link set {d} up\n" for d in devices.format(TAP, VETH, STRAY_VX).split())
    sh(ns, "ip", "-batch", "-", stdin=script)
    batch = [f"fdb append {entry}" for entry, _ in ENTRIES]
    for k in (0, 1):
        for i in range(BULK):
            mac = f"02:{k:02x}:10:00:{i >> 8:02x}:{i & 255:02x}"
            batch += [f"fdb add {mac} dev otvx100{k} dst 100.64.1.{i % 50 + 2} self permanent",
                      f"fdb add {mac} dev otvx100{k} master static"]  # fmt: skip
    sh(ns, "bridge", "-batch", "-", stdin="\n".join(batch) + "\n")
    # ethertype 0x88b5 (local experimental): an empty IPv4 frame is dropped before learning
    frame = bytes.fromhex("ffffffffffff" + LEARNED_ON_VETH.replace(":", "") + "88b5") + bytes(46)
    deadline = time.monotonic() + 10
    while LEARNED_ON_VETH not in sh(ns, "bridge", "fdb", "show", "dev", VETH):
        assert time.monotonic() < deadline, "the bridge never learned the frame's source"
        made_in(ns, lambda: _send(frame), "send-frame")
        time.sleep(0.1)


def _send(frame: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind(("eth11", 0))
        s.send(frame)


@pytest.fixture(scope="module")
def ns():
    name = "otfd-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        build(name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.fixture
def raw(ns):
    sock = made_in(ns, FdbSocket, "fdb-socket")
    try:
        yield sock
    finally:
        sock.close()


def dump(sock: FdbSocket) -> tuple[int, list[bytes]]:
    """One dump's datagrams as the kernel sent them, up to NLMSG_DONE, and its seq."""
    seq = sock.next_seq()
    sock.sock.send(fdb_dump.request(seq))
    datagrams = []
    while not datagrams or not _ends(datagrams[-1], seq):
        datagrams.append(sock.sock.recv(1 << 20))
    return seq, datagrams


def _ends(data: bytes, seq: int) -> bool:
    return any(k == NLMSG_DONE and s == seq for k, _, s, _ in parse_messages(data))


async def observed(ns: str):
    thread = NetlinkThread(netns=ns)
    thread.start()
    try:
        return await NetlinkLinks(thread).observe()
    finally:
        thread.stop()


async def test_observe_fills_the_fdb_tables_as_before(ns, raw):
    seen = await observed(ns)
    vxlans = {link.index: n for n, link in seen.links.items() if link.kind == "vxlan"}
    ports = {link.index: n for n, link in seen.links.items() if link.master is not None}
    seq, datagrams = dump(raw)
    assert len(datagrams) > 3  # several datagrams, so runs cross their edges
    before = fdb_before.tables(datagrams, seq, vxlans, ports)
    assert (seen.fdb, seen.learned, seen.port_fdb, seen.port_learned) == before
    # the same bytes through the new parse, too
    assert tuple(fdb_dump.parse(datagrams, seq, vxlans, ports)) == before
    # and not vacuously: each kind of entry where it belongs, and nowhere else
    for entry, table in ENTRIES:
        mac, _, device, *rest = entry.split()
        dst = rest[1] if rest[0] == "dst" else None
        assert places(seen, device, mac, dst) == ({table} - {"-"}), entry
    assert places(seen, VETH, LEARNED_ON_VETH, None) == {"port_learned"}
    assert len(seen.fdb["otvx1000"]) == 7 + BULK and len(seen.port_fdb["otvx1001"]) == 1 + BULK
    assert FdbEntry(mac="00:00:00:00:00:00", dst="100.64.0.3") in seen.fdb["otvx1000"]
    assert set(seen.fdb) == {"otvx1000", "otvx1001", STRAY_VX}
    assert set(seen.port_fdb) == {"otvx1000", "otvx1001", TAP, VETH}


def places(seen, device: str, mac: str, dst: str | None) -> set[str]:
    """The FDB tables of ``seen`` that hold ``mac`` (with ``dst``, if given) on ``device``."""
    found = {
        t
        for t in ("learned", "port_fdb", "port_learned")
        if mac in getattr(seen, t).get(device, ())
    }
    if any(e.mac == mac and dst in (None, e.dst) for e in seen.fdb.get(device, ())):
        found.add("fdb")
    return found


async def test_a_dump_left_unread_is_skipped_by_the_next(ns, raw):
    """A read that stopped part-way leaves its dump running on the socket, and the kernel
    refuses the next dump there (EBUSY; the code before raised it, at every heartbeat while that
    dump lasted): the read reads the old dump out (another seq: skipped) and asks again."""
    seen = await observed(ns)
    vxlans = {link.index: n for n, link in seen.links.items() if link.kind == "vxlan"}
    ports = {link.index: n for n, link in seen.links.items() if link.master is not None}
    expected = (seen.fdb, seen.learned, seen.port_fdb, seen.port_learned)
    raw.sock.send(fdb_dump.request(raw.next_seq()))
    raw.sock.recv(1 << 20)  # one datagram read, the rest of that dump left behind
    assert tuple(fdb_dump.read(raw, vxlans, ports)) == expected
    assert tuple(fdb_dump.read(raw, vxlans, ports)) == expected


async def test_a_port_filtered_dump_is_that_port_s_entries_alone(ns, raw):
    """The read-back's dump (``observe_devices``): the kernel filters it to the port (every
    entry it sends is on that port), it holds what the whole dump has on that port, and were a
    kernel to ignore the filter, the parse still takes that port's entries only."""
    seen = await observed(ns)
    ports = {link.index: n for n, link in seen.links.items() if link.master is not None}
    assert set(ports.values()) == {TAP, VETH, "otvx1000", "otvx1001"}
    for index, name in ports.items():
        seq = raw.next_seq()
        raw.sock.send(fdb_dump.request(seq, port=index))
        sent: list[int] = []
        done = False
        while not done:
            for kind, _, s, payload in parse_messages(raw.sock.recv(1 << 20)):
                done |= kind == NLMSG_DONE and s == seq
                if kind == fdb_dump.RTM_NEWNEIGH:
                    sent.append(int.from_bytes(payload[4:8], "little"))
        assert sent and set(sent) == {index}, name  # filtered by the kernel
        wanted = (seen.port_fdb[name], seen.port_learned[name])
        for port in (index, 0):  # filtered, and as if the kernel ignored the filter
            tables = fdb_dump.read(raw, {}, {index: name}, port=port)
            assert (tables.port_fdb, tables.port_learned) == ({name: wanted[0]}, {name: wanted[1]})
            assert tables.fdb == tables.learned == {}
