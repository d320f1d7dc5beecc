"""The links subsystem's kernel side (``NetlinkLinks`` on a ``NetlinkThread``) against the real
kernel, in a throwaway network namespace."""

import asyncio
import errno
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgspec
import pytest

from agent.errors import ApplyError, Refused
from agent.links import fdb_socket as fdb
from agent.links.applier import LinkApplier
from agent.links.model import (
    AddAddress,
    AddFdb,
    CreateBridge,
    CreateTap,
    CreateVxlan,
    CreateWireGuard,
    DelAddress,
    DeleteLink,
    DelFdb,
    DelPortFdb,
    LinkPlan,
    SetMaster,
    SetMtu,
    SetPortLearning,
    SetUp,
)
from agent.links.netlink import NetlinkLinks
from agent.netlink_thread import NetlinkThread
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]

TAP, BR, VX = "ot0123456789ab", "otb1000", "otvx1000"
FLOOD = "00:00:00:00:00:00"


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True, timeout=10
    ).stdout


@pytest.fixture
def ns():
    name = "otnl-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        # a foreign device the agent must never report or touch (no dummy module here: veth)
        sh(name, "ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth10")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


class Kernel(NetlinkLinks):
    async def apply(self, actions):
        """Execute actions as the agent does: links the dump had are addressed by ifindex."""
        seen = await self.observe()
        indexes = {name: link.index for name, link in seen.links.items()}
        return await self.execute(LinkPlan(actions=tuple(actions), indexes=indexes))


@pytest.fixture
def nl(ns):
    thread = NetlinkThread(netns=ns)
    thread.start()
    try:
        yield Kernel(thread)
    finally:
        thread.stop()


def overlay_plan():
    return [
        CreateBridge(BR, 1390),
        CreateTap(TAP, 1390),
        CreateVxlan(VX, 1000, "10.0.0.1", 4789, 1390),
        SetMaster(TAP, BR),
        SetMaster(VX, BR),
        SetUp(BR),
        SetUp(TAP),
        SetUp(VX),
        AddAddress(BR, "10.9.0.1/24"),
        AddFdb(VX, FLOOD, "10.0.0.2"),
        AddFdb(VX, FLOOD, "10.0.0.3"),
        AddFdb(VX, "02:AA:00:00:00:01", "10.0.0.3"),
    ]


async def test_empty_namespace(nl):
    observed = await nl.observe()
    assert observed.links == {} and observed.fdb == {} and observed.learned == {}


async def test_apply_overlay_then_observe_every_field(nl, ns):
    result = await nl.apply(overlay_plan())
    assert result.errors == () and result.writes == 12 and result.reached == {BR, TAP, VX}

    observed = await nl.observe()
    assert set(observed.links) == {BR, TAP, VX}
    br, tap, vx = observed.links[BR], observed.links[TAP], observed.links[VX]
    assert (br.kind, br.mtu, br.up, br.master) == ("bridge", 1390, True, None)
    assert br.addresses == {"10.9.0.1/24"} and br.vxlan is None
    assert (tap.kind, tap.mtu, tap.up, tap.master, tap.addresses) == ("tun", 1390, True, BR, set())
    assert (vx.kind, vx.mtu, vx.up, vx.master) == ("vxlan", 1390, True, BR)
    assert vx.vxlan is not None
    assert (vx.vxlan.vni, vx.vxlan.local, vx.vxlan.port, vx.vxlan.learning) == (
        1000,
        "10.0.0.1",
        4789,
        False,
    )
    assert observed.fdb == {
        VX: {
            FdbEntry(mac=FLOOD, dst="10.0.0.2"),
            FdbEntry(mac=FLOOD, dst="10.0.0.3"),
            FdbEntry(mac="02:aa:00:00:00:01", dst="10.0.0.3"),
        }
    }
    assert observed.learned == {VX: set()}

    # a non-permanent entry stands in for a learned one
    sh(
        ns,
        "bridge",
        "fdb",
        "add",
        "02:bb:00:00:00:07",
        "dev",
        VX,
        "dst",
        "10.0.0.9",
        "self",
        "dynamic",
    )
    observed = await nl.observe()
    assert observed.learned == {VX: {"02:bb:00:00:00:07"}}
    assert FdbEntry(mac="02:bb:00:00:00:07", dst="10.0.0.9") not in observed.fdb[VX]

    # removals: one flood dst only, the learned entry, the address, the tap's master
    result = await nl.apply(
        [
            DelFdb(VX, FLOOD, "10.0.0.2"),
            DelFdb(VX, "02:bb:00:00:00:07", None),
            DelAddress(BR, "10.9.0.1/24"),
            SetMaster(TAP, None),
            SetMtu(VX, 1300),
        ]
    )
    assert result.errors == ()
    observed = await nl.observe()
    assert observed.fdb[VX] == {
        FdbEntry(mac=FLOOD, dst="10.0.0.3"),
        FdbEntry(mac="02:aa:00:00:00:01", dst="10.0.0.3"),
    }
    assert observed.learned[VX] == set()
    assert observed.links[BR].addresses == set()
    assert observed.links[TAP].master is None
    assert observed.links[VX].mtu == 1300


async def test_foreign_device_never_reported_nor_touched(nl, ns):
    before = sh(ns, "ip", "-o", "link", "show", "eth9")
    result = await nl.apply(
        [SetMtu("eth9", 1000), SetUp("eth9"), DeleteLink("eth9"), CreateBridge(BR, 1500)]
    )
    assert result.writes == 1 and len(result.errors) == 3
    for error in result.errors:
        assert isinstance(error, Refused) and error.device == "eth9" and not error.temporary
        assert "refusing to touch 'eth9'" in str(error)
    # enslaving a managed device to a foreign master is refused too
    result = await nl.apply([SetMaster(BR, "eth9")])
    assert result.writes == 0 and isinstance(result.errors[0], Refused)
    assert "refusing to enslave" in str(result.errors[0])
    assert sh(ns, "ip", "-o", "link", "show", "eth9") == before
    assert "eth9" not in (await nl.observe()).links


async def test_deletes_are_idempotent(nl):
    await nl.apply(overlay_plan())
    deletes = [
        DelFdb(VX, FLOOD, "10.0.0.2"),
        DelAddress(BR, "10.9.0.1/24"),
        DeleteLink(TAP),
        DeleteLink(VX),
        DeleteLink(BR),
    ]
    assert (await nl.apply(deletes)).errors == ()
    assert (await nl.apply(deletes)).errors == ()  # everything already gone: still fine
    assert (await nl.observe()).links == {}


async def test_failed_action_reported_others_still_applied(nl):
    result = await nl.apply(
        [
            CreateBridge(BR, 1390),
            SetMaster("otvx9", BR),  # no such device
            CreateTap(TAP, 1390),
            SetMaster(TAP, "otb9"),  # no such bridge
            CreateBridge(BR, 1390),  # exists
            SetUp(TAP),
        ]
    )
    assert result.writes == 3
    enodev, eexist = errno.ENODEV, errno.EEXIST
    assert result.errors == (
        ApplyError("otvx9", "SetMaster", "device otvx9 not found", errno=enodev, temporary=True),
        ApplyError(TAP, "SetMaster", "device otb9 not found", errno=enodev, temporary=True),
        ApplyError(BR, "CreateBridge", "File exists", errno=eexist, temporary=False),
    )
    assert [str(e) for e in result.errors] == [  # the ack's text
        "SetMaster otvx9: device otvx9 not found",
        "SetMaster ot0123456789ab: device otb9 not found",
        "CreateBridge otb1000: File exists",
    ]
    assert result.reached == {BR, TAP}
    observed = await nl.observe()
    assert set(observed.links) == {BR, TAP}
    assert observed.links[TAP].up and observed.links[TAP].master is None


OPEN_TAP = textwrap.dedent(
    """
    import fcntl, os, struct, sys
    IFF_TAP, IFF_NO_PI, TUNSETIFF = 0x0002, 0x1000, 0x400454CA
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", sys.argv[1].encode(), IFF_TAP | IFF_NO_PI))
    print(open(f"/sys/class/net/{sys.argv[1]}/carrier").read().strip())
    os.close(fd)
    """
)


async def test_tap_opens_by_name_from_another_process(nl, ns):
    assert (await nl.apply([CreateTap(TAP, 1390), SetUp(TAP)])).errors == ()
    # carrier is 1 only while a process holds the tap open: proves we attached to *our* tap
    assert sh(ns, sys.executable, "-c", OPEN_TAP, TAP).strip() == "1"
    link = (await nl.observe()).links[TAP]
    assert (link.kind, link.mtu) == ("tun", 1390)  # persistent: survives the opener closing


def test_usable_from_uvloop(nl):
    import uvloop

    async def main():
        result = await nl.apply([CreateBridge(BR, 1390)])
        return result, await nl.observe()

    result, observed = uvloop.run(main())
    assert result.errors == () and set(observed.links) == {BR}


def test_start_fails_cleanly_for_missing_namespace():
    name = "otnl-missing-" + secrets.token_hex(4)
    threads = threading.active_count()
    thread = NetlinkThread(netns=name)
    with pytest.raises(FileNotFoundError, match=f"no network namespace {name}"):
        thread.start()
    assert threading.active_count() == threads  # the netlink thread did not stay behind
    thread.stop()  # no-op, nothing left running


async def test_bulk_fdb_spans_several_chunks_and_reports_each_failure(nl, ns):
    await nl.apply(overlay_plan())
    macs = [f"02:bb:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(1500)]  # > 2 chunks
    result = await nl.apply(
        [AddFdb(VX, m, f"10.1.{i % 200}.{i % 250 + 1}") for i, m in enumerate(macs)]
    )
    assert result.errors == () and result.writes == 1500
    observed = await nl.observe()
    assert {e.mac for e in observed.fdb[VX]} >= set(macs)
    assert len(sh(ns, "bridge", "fdb", "show", "dev", VX).splitlines()) >= 1500
    # appending again is idempotent; a 5-byte address is refused by the kernel, and only it
    # (the agent validates MACs before this point: this proves failures are matched per entry)
    again = await nl.apply([AddFdb(VX, macs[0], "10.1.0.1"), AddFdb(VX, "02:00:00:00:09", "10.1.0.1"),
                            AddFdb(VX, "02:cc:00:00:00:01", "10.1.0.1")])  # fmt: skip
    assert again.writes == 2
    assert again.errors == (
        ApplyError(VX, "AddFdb", "02:00:00:00:09 dst 10.1.0.1: Invalid argument", errno=22),
    )
    deleted = await nl.apply(
        [DelFdb(VX, m, f"10.1.{i % 200}.{i % 250 + 1}") for i, m in enumerate(macs)]
    )
    assert deleted.errors == () and deleted.writes == 1500
    assert not {e.mac for e in (await nl.observe()).fdb[VX]} & set(macs)


async def test_observe_link_reads_one_device_like_observe(nl):
    await nl.apply(overlay_plan())
    full = await nl.observe()
    for name in (BR, TAP, VX):
        assert await nl.observe_link(name) == full.links[name]
    assert await nl.observe_link("otmissing0") is None
    with pytest.raises(ValueError, match="eth9"):
        await nl.observe_link("eth9")


KERNEL_HAS_WIREGUARD = Path("/sys/module/wireguard").exists() or any(
    Path("/lib/modules", os.uname().release).rglob("wireguard.ko*")
)


@pytest.mark.skipif(KERNEL_HAS_WIREGUARD, reason="this kernel has WireGuard: nothing to refuse")
async def test_create_wireguard_reports_a_kernel_without_the_module(nl):
    result = await nl.apply([CreateWireGuard("otwg0")])
    assert result.writes == 0 and result.reached == frozenset()
    assert result.errors == (
        ApplyError(
            "otwg0",
            "CreateWireGuard",
            "Operation not supported",
            errno=errno.EOPNOTSUPP,
            temporary=False,  # a refusal: retrying will not load a module that is not there
        ),
    )
    assert "otwg0" not in (await nl.observe()).links


SNAPSHOT = Snapshot(
    node="n1",
    version=1,
    bridges=(Bridge(name=BR, mtu=1390, address="10.9.0.1/24"),),
    taps=(Tap(name=TAP, bridge=BR, mtu=1390, mac="02:00:00:00:00:0a"),),
    vxlans=(
        Vxlan(
            name=VX,
            vni=1000,
            bridge=BR,
            local="10.0.0.1",
            mtu=1390,
            fdb=(
                FdbEntry(mac=FLOOD, dst="10.0.0.2"),
                FdbEntry(mac="02:aa:00:00:00:01", dst="10.0.0.2"),
            ),
        ),
    ),
)


async def test_subsystem_second_reconcile_plans_nothing_and_reads_no_link_by_name(
    nl, ns, monkeypatch
):
    links = LinkApplier(nl)
    result = await links.reconcile(SNAPSHOT)
    assert result.errors == () and result.reached == {BR, TAP, VX}
    again = links.plan(SNAPSHOT, await links.observe())
    assert again.actions == () and (await links.apply(again)).writes == 0
    # drift on every device: the repair addresses them by the dump's ifindex, no RTM_GETLINK
    sh(ns, "ip", "link", "set", BR, "down")
    sh(ns, "ip", "link", "set", TAP, "mtu", "1400")
    sh(ns, "ip", "link", "set", VX, "nomaster")
    plan = links.plan(SNAPSHOT, await links.observe())
    # re-enslaved: learning comes back on and the bridge forgot the port's entries
    assert {type(a).__name__ for a in plan.actions} == {
        "SetMtu",
        "SetMaster",
        "SetPortLearning",
        "SetUp",
        "AddPortFdb",
    }
    lookups = []
    ipr = nl.netlink._sockets.ipr
    original = ipr.link_lookup

    async def counted(**kw):
        lookups.append(kw)
        return await original(**kw)

    monkeypatch.setattr(ipr, "link_lookup", counted)
    result = await links.apply(plan)
    assert result.errors == () and result.writes == len(plan.actions) and lookups == []
    assert links.plan(SNAPSHOT, await links.observe()).actions == ()


# --- bridge ports: learning off, static entries, no flooding to other taps, atomic moves ------

MAC_A, REMOTE = "02:00:00:00:00:0a", "02:aa:00:00:00:01"


def bridge_fdb(ns: str) -> set[str]:
    return {" ".join(line.split()) for line in sh(ns, "bridge", "fdb", "show").splitlines()}


def port_learning(ns: str) -> dict[str, str]:
    """Port name -> "on"/"off", as `bridge -d link show` prints it."""
    out, name = {}, None
    for line in sh(ns, "bridge", "-d", "link", "show").splitlines():
        if not line.startswith(" "):
            name = line.split(":")[1].strip().split("@")[0]
        elif " learning " in f" {line} ":
            words = line.split()
            out[name] = words[words.index("learning") + 1]
    return out


async def test_learning_off_and_static_entries_for_local_and_remote_nics(nl, ns):
    links = LinkApplier(nl)
    assert (await links.reconcile(SNAPSHOT)).errors == ()
    assert port_learning(ns) == {TAP: "off", VX: "off"}
    fdb = bridge_fdb(ns)
    assert f"{MAC_A} dev {TAP} master {BR} static" in fdb
    assert f"{REMOTE} dev {VX} master {BR} static" in fdb
    assert f"{REMOTE} dev {VX} dst 10.0.0.2 self permanent" in fdb
    observed = await links.observe()
    assert observed.links[TAP].port_learning is False and observed.links[BR].port_learning is None
    assert observed.port_fdb == {TAP: {MAC_A}, VX: {REMOTE}}
    assert observed.port_learned == {TAP: set(), VX: set()}
    kernel_own = {line for line in fdb if line.endswith(" permanent") and " master " in line}
    assert kernel_own  # each port's own address: the bridge's, never ours to touch

    # drift by hand: learning on, a stale static entry (ours), a learned one, and a permanent
    # (local) one, which the bridge treats as its own address: not ours, kept
    sh(ns, "bridge", "link", "set", "dev", TAP, "learning", "on")
    sh(ns, "bridge", "fdb", "add", "02:de:ad:00:00:01", "dev", TAP, "master", "static")
    sh(ns, "bridge", "fdb", "add", "02:de:ad:00:00:02", "dev", VX, "master", "dynamic")
    sh(ns, "bridge", "fdb", "add", "02:de:ad:00:00:03", "dev", VX, "master", "permanent")
    plan = links.plan(SNAPSHOT, await links.observe())
    assert set(plan.actions) == {
        SetPortLearning(TAP, False),
        DelPortFdb(TAP, "02:de:ad:00:00:01"),
        DelPortFdb(VX, "02:de:ad:00:00:02"),
    }
    assert (await links.apply(plan)).errors == ()
    fdb = bridge_fdb(ns)
    assert not any("02:de:ad:00:00:01" in line or "02:de:ad:00:00:02" in line for line in fdb)
    assert f"02:de:ad:00:00:03 dev {VX} master {BR} permanent" in fdb
    assert kernel_own <= fdb and port_learning(ns)[TAP] == "off"
    assert links.plan(SNAPSHOT, await links.observe()).actions == ()


TAPS = {"ot00000000000a": "02:00:00:00:00:0a", "ot00000000000b": "02:00:00:00:00:0b",
        "ot00000000000c": "02:00:00:00:00:0c"}  # fmt: skip

# Plays three hypervisors: holds the taps open, sends frames into the bridge from A to B and
# from B to A (what the VMs send), and counts what each tap is given (what the VMs receive).
TAP_TRAFFIC = textwrap.dedent(
    """
    import fcntl, json, os, select, struct, sys, time
    IFF_TAP, IFF_NO_PI, TUNSETIFF, ETHERTYPE = 0x0002, 0x1000, 0x400454CA, 0x88B5
    taps = json.loads(sys.argv[1])
    fds = {}
    for name in taps:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fds[name] = fd
    time.sleep(0.3)  # carrier up: the ports go forwarding
    a, b, c = taps
    def frame(src, dst, i):
        mac = lambda t: bytes.fromhex(taps[t].replace(":", ""))
        return mac(dst) + mac(src) + struct.pack("!HI", ETHERTYPE, i) + bytes(46)
    for i in range(20):
        os.write(fds[a], frame(a, b, i))
        os.write(fds[b], frame(b, a, i))
    seen = {name: {"to_a": 0, "to_b": 0} for name in taps}
    deadline = time.monotonic() + 0.5
    while (left := deadline - time.monotonic()) > 0:
        for fd in select.select(list(fds.values()), [], [], left)[0]:
            name = next(n for n, f in fds.items() if f == fd)
            data = os.read(fd, 2048)
            if struct.unpack("!H", data[12:14])[0] == ETHERTYPE:
                to = "to_a" if data[:6].hex(":") == taps[a] else "to_b"
                seen[name][to] += 1
    print(json.dumps(seen))
    """
)


def three_taps(with_macs: bool) -> Snapshot:
    taps = tuple(
        Tap(name=name, bridge=BR, mtu=1390, mac=mac if with_macs else "")
        for name, mac in TAPS.items()
    )
    return Snapshot(node="n1", version=1, bridges=(Bridge(name=BR, mtu=1390),), taps=taps)


@pytest.mark.parametrize("with_macs", [False, True], ids=["no-entries", "static-entries"])
async def test_unicast_to_a_known_nic_never_reaches_the_other_taps(nl, ns, with_macs):
    import json

    sh(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")  # no host chatter on the taps
    links = LinkApplier(nl)
    assert (await links.reconcile(three_taps(with_macs))).errors == ()
    seen = json.loads(sh(ns, sys.executable, "-c", TAP_TRAFFIC, json.dumps(TAPS)))
    a, b, c = TAPS
    assert seen[b]["to_b"] == 20 and seen[a]["to_a"] == 20  # the VMs' own traffic flows
    if with_macs:
        assert seen[c] == {"to_a": 0, "to_b": 0}  # nothing between A and B reaches C
        assert seen[a]["to_b"] == 0 and seen[b]["to_a"] == 0
    else:
        # learning off and no entries: every frame is unknown unicast and floods (the control)
        assert seen[c] == {"to_a": 20, "to_b": 20}
    assert (await links.observe()).port_learned == {t: set() for t in TAPS}  # nothing learned


class RecordingSocket:
    """Stands in for the FDB socket's raw socket and keeps what was sent."""

    def __init__(self, sock):
        self.sock, self.sent = sock, []

    def send(self, data):
        self.sent += [
            (kind, flags, fdb.parse_neigh(p)) for kind, flags, _, p in fdb.parse_messages(data)
        ]
        return self.sock.send(data)

    def recv(self, size):
        return self.sock.recv(size)

    def recvmsg(self, size):  # the FDB dump reads with it (agent.links.fdb_dump)
        return self.sock.recvmsg(size)

    def close(self):
        self.sock.close()


def neigh_monitor(ns: str) -> socket.socket:
    """An rtnetlink socket in ``ns`` that receives every neighbour (FDB) change as it happens."""
    from pyroute2.netns import popns, pushns

    pushns(ns)
    try:
        mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    finally:
        popns()
    mon.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    mon.bind((0, 1 << (RTNLGRP_NEIGH - 1)))
    mon.setblocking(False)
    return mon


def events(mon: socket.socket, macs: set[str]) -> list[tuple[str, str, str | None, int]]:
    """("new"/"del", mac, dst, port ifindex) of every AF_BRIDGE change to ``macs`` so far."""
    out = []
    while True:
        try:
            data = mon.recv(1 << 20)
        except BlockingIOError:
            return out
        for kind, _flags, _seq, payload in fdb.parse_messages(data):
            if kind in (fdb.RTM_NEWNEIGH, fdb.RTM_DELNEIGH) and payload[0] == socket.AF_BRIDGE:
                rec = fdb.parse_neigh(payload)
                if rec.mac in macs:
                    out.append(
                        (
                            "new" if kind == fdb.RTM_NEWNEIGH else "del",
                            rec.mac,
                            rec.dst,
                            rec.ifindex,
                        )
                    )


RTNLGRP_NEIGH = 3
LOCAL_B, MAC_B = "ot00000000000b", "02:00:00:00:00:0b"  # MAC_B: a remote NIC that moves here


def moving(version: int) -> Snapshot:
    """v1: NIC A here, NIC B and REMOTE on 10.0.0.2; v2: A gone to 10.0.0.3, B here, REMOTE on
    10.0.0.3. Every MAC moves: VXLAN dst, tap → VXLAN port, VXLAN port → tap."""
    a_here = version == 1
    taps = (Tap(name=TAP, bridge=BR, mtu=1390, mac=MAC_A),) if a_here else (
        Tap(name=LOCAL_B, bridge=BR, mtu=1390, mac=MAC_B),)  # fmt: skip
    dst = "10.0.0.2" if a_here else "10.0.0.3"
    remote = [(FLOOD, "10.0.0.2"), (REMOTE, dst), (MAC_B, "10.0.0.2") if a_here else (MAC_A, dst)]
    return msgspec.structs.replace(
        SNAPSHOT,
        version=version,
        taps=taps,
        vxlans=(msgspec.structs.replace(
            SNAPSHOT.vxlans[0], fdb=tuple(FdbEntry(mac=m, dst=d) for m, d in remote)),),
    )  # fmt: skip


async def test_moved_macs_are_replaced_in_one_message_and_never_leave_the_table(nl, ns):
    links = LinkApplier(nl)
    assert (await links.reconcile(moving(1))).errors == ()
    sockets = nl.netlink._sockets
    recorder = sockets.fdb.sock = RecordingSocket(sockets.fdb.sock)
    mon = neigh_monitor(ns)
    macs = {MAC_A, MAC_B, REMOTE}
    try:
        plan = links.plan(moving(2), await links.observe())
        assert (await links.apply(plan)).errors == ()
        changes = events(mon, macs)
    finally:
        mon.close()
        sockets.fdb.sock = recorder.sock
    ours = [(kind, flags, rec) for kind, flags, rec in recorder.sent if rec.mac in macs]
    writes = [(rec.mac, rec.dst, rec.flags) for kind, _, rec in ours if kind == fdb.RTM_NEWNEIGH]
    # one RTM_NEWNEIGH with NLM_F_CREATE|NLM_F_REPLACE per moved entry; REMOTE's bridge entry
    # stays on the VXLAN port, so it is not written at all
    assert len(writes) == 4 and set(writes) == {
        (REMOTE, "10.0.0.3", fdb.NTF_SELF),
        (MAC_A, "10.0.0.3", fdb.NTF_SELF),
        (MAC_A, None, fdb.NTF_MASTER),
        (MAC_B, None, fdb.NTF_MASTER),
    }
    for kind, flags, _ in ours:
        if kind == fdb.RTM_NEWNEIGH:
            assert flags & fdb.NLM_F_REPLACE and flags & fdb.NLM_F_CREATE
            assert not flags & fdb.NLM_F_APPEND
    # the only delete: NIC B's VXLAN entry, now that B lives here (not a move: B's bridge
    # entry already points at its tap by then)
    deletes = [(rec.mac, rec.dst) for kind, _, rec in ours if kind == fdb.RTM_DELNEIGH]
    assert deletes == [(MAC_B, "10.0.0.2")]
    # the kernel's own record of every change, in order: no bridge entry and no VXLAN entry of
    # a moved MAC ever went away
    observed = await links.observe()
    vx, tap_b = observed.links[VX].index, observed.links[LOCAL_B].index
    assert [e for e in changes if e[0] == "del"] == [("del", MAC_B, "10.0.0.2", vx)], changes
    assert changes.index(("new", MAC_B, None, tap_b)) < changes.index(
        ("del", MAC_B, "10.0.0.2", vx)
    )
    observed = await links.observe()
    assert {
        FdbEntry(mac=REMOTE, dst="10.0.0.3"),
        FdbEntry(mac=MAC_A, dst="10.0.0.3"),
    } <= observed.fdb[VX]
    assert not {e for e in observed.fdb[VX] if e.mac == MAC_B}  # gone from VXLAN, as it should
    assert observed.port_fdb == {VX: {REMOTE, MAC_A}, LOCAL_B: {MAC_B}}
    assert links.plan(moving(2), await links.observe()).actions == ()


async def test_the_old_append_then_delete_leaves_a_hole(nl, ns):
    """The control: what the agent used to send for a move. The kernel ignores the append on an
    existing unicast MAC, so the delete leaves the MAC with no entry at all."""
    links = LinkApplier(nl)
    assert (await links.reconcile(SNAPSHOT)).errors == ()
    index = (await links.observe()).links[VX].index
    sockets = nl.netlink._sockets
    mon = neigh_monitor(ns)
    try:
        await nl.netlink.run(lambda s: _old_move(s, index))
        changes = events(mon, {REMOTE})
    finally:
        mon.close()
    assert ("del", REMOTE, "10.0.0.2", index) in changes
    assert not {e for e in (await links.observe()).fdb[VX] if e.mac == REMOTE}
    assert sockets.fdb is not None


async def _old_move(s, index):
    assert s.fdb.change(fdb.APPEND, [(index, REMOTE, "10.0.0.3")]) == []
    assert s.fdb.change(fdb.DELETE, [(index, REMOTE, "10.0.0.2")]) == []


async def test_a_job_that_never_finishes_times_out_and_frees_the_thread(nl):
    """A netlink call that never answers must not hang the agent's apply worker for ever."""
    thread = nl.netlink

    async def stuck(sockets):
        await asyncio.sleep(3600)

    with pytest.raises(TimeoutError, match="did not finish within 0.2s"):
        await thread.run(stuck, timeout=0.2)
    assert await asyncio.wait_for(thread.run(lambda s: asyncio.sleep(0, "next")), 5) == "next"
