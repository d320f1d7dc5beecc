"""The links subsystem's kernel side (``NetlinkLinks`` on a ``NetlinkThread``) against the real
kernel, in a throwaway network namespace."""

import errno
import os
import secrets
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.errors import ApplyError, Refused
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
    LinkPlan,
    SetMaster,
    SetMtu,
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
    taps=(Tap(name=TAP, bridge=BR, mtu=1390),),
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
    assert {type(a).__name__ for a in plan.actions} == {"SetMtu", "SetMaster", "SetUp"}
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
