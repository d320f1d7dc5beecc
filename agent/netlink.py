"""The netlink applier: observes managed (``ot…``) links, addresses and VXLAN FDB entries, and
executes planned ``Action``s, through pyroute2's ``AsyncIPRoute`` (links, addresses) and
``agent.fdb_netlink`` (FDB dumps and runs of FDB changes, in bulk).

pyroute2's async sockets do not run on uvloop, so all netlink work happens in a dedicated thread
with a stock asyncio loop; ``observe``/``apply`` can be awaited from any other loop. This module
never decides *what* to change (that is ``agent.plan``) and never touches a device whose name
lacks the ``ot`` prefix, nor an FDB entry outside a managed VXLAN device.
"""

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import popns, pushns

from agent.fdb_netlink import FdbSocket
from agent.model import (
    Action,
    AddAddress,
    AddFdb,
    CreateBridge,
    CreateTap,
    CreateVxlan,
    CreateWireGuard,
    DelAddress,
    DeleteLink,
    DelFdb,
    Link,
    Observed,
    SetMaster,
    SetMtu,
    SetUp,
    VxlanInfo,
)
from schemas.desired import FdbEntry
from schemas.naming import is_managed

log = logging.getLogger(__name__)

T = TypeVar("T")

IFF_UP = 0x1
START_TIMEOUT = 10.0

# "gone already" answers that make a delete a success (idempotent deletes)
_GONE = {errno.ENODEV, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ESRCH}


class ApplyResult(msgspec.Struct, frozen=True):
    done: int
    errors: tuple[str, ...]


class _Refused(Exception):
    """An action this applier will not execute (foreign device, missing device, bad value)."""


class _Missing(_Refused):
    def __init__(self, name: str):
        super().__init__(f"device {name} not found")
        self.name = name


class NetlinkThread:
    """Owns one netlink socket and the thread/loop it lives in."""

    def __init__(self, netns: str | None = None):
        self._netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ipr: AsyncIPRoute | None = None
        self._fdb: FdbSocket | None = None  # bulk FDB path (see agent.fdb_netlink)
        self._lock: asyncio.Lock | None = None  # observe/apply never interleave

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("netlink thread already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="netlink", daemon=True)
        self._thread.start()
        # The socket must be created inside the thread: pyroute2 keeps it in thread-locals.
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(timeout=START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        log.info("netlink thread started (netns=%s)", self._netns or "current")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=START_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=START_TIMEOUT)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None
        log.info("netlink thread stopped")

    async def _open(self) -> None:
        # groups=0: no multicast subscriptions, so no unread events pile up in pyroute2's queue
        # flags=0: fail on a missing namespace instead of creating one (pyroute2's default)
        ipr = AsyncIPRoute(netns=self._netns, groups=0, flags=0)
        try:
            await ipr.link("get", index=1)  # the socket opens lazily: prove it works now
        except BaseException:
            ipr.close()
            raise
        self._ipr = ipr
        self._fdb = _open_fdb_socket(self._netns)
        self._lock = asyncio.Lock()

    async def _close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._fdb is not None:
            self._fdb.close()
            self._fdb = None

    async def _in_thread(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("netlink thread is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # --- public API (any event loop) ---------------------------------------------------------

    async def observe(self) -> Observed:
        return await self._in_thread(self._locked(self._observe()))

    async def apply(self, actions: Sequence[Action]) -> ApplyResult:
        return await self._in_thread(self._locked(self._apply(tuple(actions))))

    async def observe_link(self, name: str) -> Link | None:
        """One managed link (no FDB), or None when it does not exist; cheap enough per apply."""
        if not is_managed(name):
            raise ValueError(f"refusing to read {name!r}: not an Otherix ('ot…') device")
        return await self._in_thread(self._locked(self._observe_link(name)))

    async def _locked(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._lock is not None
        async with self._lock:
            return await coro

    # --- observe (netlink thread) ------------------------------------------------------------

    async def _observe(self) -> Observed:
        ipr = self._ipr
        assert ipr is not None
        msgs = [m async for m in await ipr.link("dump")]
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
        managed = {m["index"]: m for m in msgs if is_managed(names[m["index"]] or "")}

        addresses: dict[int, set[str]] = {i: set() for i in managed}
        async for a in await ipr.addr("dump", family=socket.AF_INET):
            if a["index"] in addresses:
                addresses[a["index"]].add(_address(a))

        links: dict[str, Link] = {}
        vxlans: dict[int, str] = {}
        for index, m in managed.items():
            master = m.get_attr("IFLA_MASTER")
            link = _link(m, names[index], addresses[index], names.get(master) if master else None)
            links[link.name] = link
            if link.kind == "vxlan":
                vxlans[index] = link.name

        fdb: dict[int, set[FdbEntry]] = {i: set() for i in vxlans}
        learned: dict[int, set[str]] = {i: set() for i in vxlans}
        if vxlans:
            assert self._fdb is not None
            for entry in self._fdb.dump(vxlans):
                # entries of the bridge master (NTF_MASTER) show up on the port too: skip them
                if not entry.own or entry.mac is None:
                    continue
                if entry.dst and entry.permanent:
                    fdb[entry.ifindex].add(FdbEntry(mac=entry.mac, dst=entry.dst))
                else:
                    learned[entry.ifindex].add(entry.mac)
        return Observed(
            links=links,
            fdb={vxlans[i]: frozenset(e) for i, e in fdb.items()},
            learned={vxlans[i]: frozenset(e) for i, e in learned.items()},
        )

    async def _observe_link(self, name: str) -> Link | None:
        ipr = self._ipr
        assert ipr is not None
        try:
            (m,) = await ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code in _GONE:
                return None
            raise
        master_name = None
        if master := m.get_attr("IFLA_MASTER"):
            (mm,) = await ipr.link("get", index=master)
            master_name = mm.get_attr("IFLA_IFNAME")
        addresses = {
            _address(a)
            async for a in await ipr.addr("dump", family=socket.AF_INET, index=m["index"])
        }
        return _link(m, name, addresses, master_name)

    # --- apply (netlink thread) --------------------------------------------------------------

    async def _apply(self, actions: tuple[Action, ...]) -> ApplyResult:
        done = 0
        errors: list[str] = []
        for batch in _fdb_batches(actions):
            if isinstance(batch, list):  # a run of FDB changes on one device: bulk path
                ok, failed = await self._fdb_batch(batch)
                done += ok
                errors += failed
                continue
            action = batch
            label = f"{type(action).__name__} {_device(action)}"
            try:
                await self._one(action)
            except NetlinkError as e:
                errors.append(f"{label}: {os.strerror(e.code) if e.code else e}")
            except _Refused as e:
                errors.append(f"{label}: {e}")
            except Exception as e:  # keep going: one bad action must not block the rest
                errors.append(f"{label}: {type(e).__name__}: {e}")
            else:
                done += 1
                continue
            log.warning("netlink %s failed: %s", label, errors[-1].split(": ", 1)[1])
        if errors:
            log.warning("netlink apply: %d done, %d failed", done, len(errors))
        return ApplyResult(done=done, errors=tuple(errors))

    async def _fdb_batch(self, batch: list[AddFdb | DelFdb]) -> tuple[int, list[str]]:
        first = batch[0]
        op = "append" if isinstance(first, AddFdb) else "delete"
        label = f"{type(first).__name__} {first.device}"
        if not is_managed(first.device):
            return 0, [
                f"{label}: refusing to touch {first.device!r}: not an Otherix ('ot…') device"
            ] * len(batch)
        try:
            index = await self._index(first.device)
        except _Missing as e:
            if op == "delete":
                return len(batch), []  # the device is gone, and its entries with it
            return 0, [f"{label}: {e}"] * len(batch)
        assert self._fdb is not None
        entries = [(a.mac.lower(), a.dst) for a in batch]
        try:
            failures = self._fdb.change(op, index, entries)
        except OSError as e:
            return 0, [f"{label}: {e}"] * len(batch)
        log.info(
            "netlink %s: fdb %s %d entries (%d failed)", first.device, op, len(batch), len(failures)
        )
        errors = [
            f"{label} {mac} dst {dst or '-'}: {os.strerror(code)}" for mac, dst, code in failures
        ]
        return len(batch) - len(failures), errors

    async def _index(self, name: str) -> int:
        assert self._ipr is not None
        found = await self._ipr.link_lookup(ifname=name)
        if not found:
            raise _Missing(name)
        return found[0]

    async def _one(self, action: Action) -> None:
        ipr = self._ipr
        assert ipr is not None
        device = _device(action)
        if not is_managed(device):
            raise _Refused(f"refusing to touch {device!r}: not an Otherix ('ot…') device")
        match action:
            case CreateBridge(name, mtu):
                log.info("netlink %s: create bridge mtu %d", name, mtu)
                await ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            case CreateTap(name, mtu):
                # TUN/TAP cannot be made over rtnetlink: pyroute2 does the TUNSETIFF +
                # TUNSETPERSIST ioctls, which would silently attach to an existing tap.
                if await ipr.link_lookup(ifname=name):
                    raise NetlinkError(errno.EEXIST)
                log.info("netlink %s: create tap mtu %d", name, mtu)
                await ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": 1})
                await ipr.link("set", index=await self._index(name), mtu=mtu)
            case CreateVxlan(name, vni, local, port, mtu):
                log.info("netlink %s: create vxlan vni %d local %s port %d", name, vni, local, port)
                await ipr.link(
                    "add",
                    ifname=name,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_local=local,
                    vxlan_port=port,
                    vxlan_learning=0,
                    mtu=mtu,
                )
            case CreateWireGuard(name):
                log.info("netlink %s: create wireguard", name)
                await ipr.link("add", ifname=name, kind="wireguard")
            case SetMtu(name, mtu):
                log.info("netlink %s: mtu %d", name, mtu)
                await ipr.link("set", index=await self._index(name), mtu=mtu)
            case SetMaster(name, master):
                if master is not None and not is_managed(master):
                    raise _Refused(f"refusing to enslave to foreign device {master!r}")
                index = await self._index(name)
                master_index = 0 if master is None else await self._index(master)
                log.info("netlink %s: master %s", name, master or "none")
                await ipr.link("set", index=index, master=master_index)
            case SetUp(name):
                log.info("netlink %s: up", name)
                await ipr.link("set", index=await self._index(name), state="up")
            case AddAddress(name, address):
                iface = _ipv4(address)
                log.info("netlink %s: add address %s", name, iface)
                await _tolerate(
                    {errno.EEXIST},
                    ipr.addr(
                        "add",
                        index=await self._index(name),
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    ),
                )
            case DelAddress(name, address):
                iface = _ipv4(address)
                log.info("netlink %s: delete address %s", name, iface)
                await _gone_ok(
                    self._del_addr(name, str(iface.ip), iface.network.prefixlen),
                )
            case DeleteLink(name):
                log.info("netlink %s: delete link", name)
                await _gone_ok(self._del_link(name))
            case _:
                raise _Refused(f"unknown action {action!r}")

    async def _del_addr(self, name: str, ip: str, prefixlen: int) -> None:
        assert self._ipr is not None
        await self._ipr.addr("del", index=await self._index(name), address=ip, prefixlen=prefixlen)

    async def _del_link(self, name: str) -> None:
        assert self._ipr is not None
        await self._ipr.link("del", index=await self._index(name))


def _fdb_batches(actions: Sequence[Action]) -> list[Action | list[AddFdb | DelFdb]]:
    """Group consecutive FDB changes of one kind on one device; keep everything else in order."""
    out: list[Action | list[AddFdb | DelFdb]] = []
    for action in actions:
        if isinstance(action, AddFdb | DelFdb):
            last = out[-1] if out else None
            if (
                isinstance(last, list)
                and type(last[0]) is type(action)
                and last[0].device == action.device
            ):
                last.append(action)
                continue
            out.append([action])
        else:
            out.append(action)
    return out


def _open_fdb_socket(netns: str | None) -> FdbSocket:
    """A raw rtnetlink socket in ``netns`` (a socket keeps the namespace it was made in)."""
    if netns is None:
        return FdbSocket()
    pushns(netns)
    try:
        return FdbSocket()
    finally:
        popns()


def _link(m: Any, name: str, addresses: set[str], master: str | None) -> Link:
    """A ``Link`` from an RTM_NEWLINK message and what was looked up around it."""
    info = m.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
    vxlan = None
    if kind == "vxlan":
        data = info.get_attr("IFLA_INFO_DATA")
        vxlan = VxlanInfo(
            vni=data.get_attr("IFLA_VXLAN_ID"),
            local=data.get_attr("IFLA_VXLAN_LOCAL"),
            port=data.get_attr("IFLA_VXLAN_PORT"),
            learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        )
    return Link(
        name=name,
        kind=kind,
        mtu=m.get_attr("IFLA_MTU"),
        up=bool(m["flags"] & IFF_UP),
        master=master,
        addresses=frozenset(addresses),
        vxlan=vxlan,
    )


def _address(a: Any) -> str:
    return f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"


def _device(action: Action) -> str:
    return action.device if isinstance(action, AddFdb | DelFdb) else action.name


def _ipv4(address: str) -> ipaddress.IPv4Interface:
    try:
        return ipaddress.IPv4Interface(address)
    except ValueError as e:
        raise _Refused(f"bad IPv4 address {address!r}") from e


async def _tolerate(codes: set[int], coro: Coroutine[Any, Any, Any]) -> None:
    try:
        await coro
    except NetlinkError as e:
        if e.code not in codes:
            raise


async def _gone_ok(coro: Coroutine[Any, Any, Any]) -> None:
    """Deletes are idempotent: a missing device or entry means the job is already done."""
    try:
        await coro
    except _Missing:
        pass
    except NetlinkError as e:
        if e.code not in _GONE:
            raise
