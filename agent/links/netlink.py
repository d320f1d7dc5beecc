"""The links subsystem's kernel side: read managed (``ot…``) links, addresses and VXLAN FDB
entries, and execute a ``LinkPlan``, as jobs on the agent's ``NetlinkThread``.

Links and addresses go through pyroute2's ``AsyncIPRoute``, FDB runs through the bulk socket
(``agent.links.fdb_socket``). A link the observation had is addressed by its ifindex; only a
device created during this apply is looked up (RTM_GETLINK). This module never decides *what*
to change (``agent.links.plan`` does) and never touches a device whose name lacks the ``ot``
prefix, nor an FDB entry outside a managed VXLAN device.
"""

import errno
import ipaddress
import logging
import socket
from collections.abc import Coroutine, Sequence
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import ApplyError, ApplyResult, Refused
from agent.links.model import (
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
    LinkPlan,
    Observed,
    SetMaster,
    SetMtu,
    SetUp,
    VxlanInfo,
)
from agent.logs import NodeLog
from agent.netlink_thread import NetlinkThread, Sockets
from schemas.desired import FdbEntry
from schemas.naming import is_managed

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000  # carrier: for a tap, a hypervisor holds it open
# "gone already" answers that make a delete a success (idempotent deletes)
_GONE = {errno.ENODEV, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ESRCH}
_CREATES = CreateBridge | CreateTap | CreateVxlan | CreateWireGuard


class NetlinkLinks:
    """The real kernel behind ``LinkApplier``: every call is one job on the netlink thread."""

    def __init__(self, netlink: NetlinkThread, node: str | None = None):
        self.netlink = netlink
        self.log = NodeLog(logging.getLogger(__name__), node)

    async def observe(self) -> Observed:
        return await self.netlink.run(observe)

    async def observe_link(self, name: str) -> Link | None:
        return await self.netlink.run(lambda s: observe_link(s, name))

    async def execute(self, plan: LinkPlan) -> ApplyResult[frozenset[str]]:
        return await self.netlink.run(lambda s: _Executor(s, plan, self.log).run())


# --- observe (netlink thread) ----------------------------------------------------------------


async def observe(s: Sockets) -> Observed:
    msgs = [m async for m in await s.ipr.link("dump")]
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
    managed = {m["index"]: m for m in msgs if is_managed(names[m["index"]] or "")}

    addresses: dict[int, set[str]] = {i: set() for i in managed}
    async for a in await s.ipr.addr("dump", family=socket.AF_INET):
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
        for entry in s.fdb.dump(vxlans):
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


async def observe_link(s: Sockets, name: str) -> Link | None:
    """One managed link (no FDB), or None when it does not exist."""
    if not is_managed(name):
        raise ValueError(f"refusing to read {name!r}: not an Otherix ('ot…') device")
    try:
        (m,) = await s.ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code in _GONE:
            return None
        raise
    master_name = None
    if master := m.get_attr("IFLA_MASTER"):
        (mm,) = await s.ipr.link("get", index=master)
        master_name = mm.get_attr("IFLA_IFNAME")
    addresses = {
        _address(a) async for a in await s.ipr.addr("dump", family=socket.AF_INET, index=m["index"])
    }
    return _link(m, name, addresses, master_name)


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
        carrier=bool(m["flags"] & IFF_LOWER_UP),
        master=master,
        addresses=frozenset(addresses),
        vxlan=vxlan,
        index=m["index"],
    )


def _address(a: Any) -> str:
    return f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"


# --- apply (netlink thread) ------------------------------------------------------------------


class _Missing(ApplyError):
    def __init__(self, device: str, op: str, missing: str):
        super().__init__(device, op, f"device {missing} not found", errno=errno.ENODEV)
        self.missing = missing


class _Executor:
    """Executes one plan in order; one failed action never stops the others."""

    def __init__(self, s: Sockets, plan: LinkPlan, log: NodeLog):
        self.s, self.plan, self.log = s, plan, log
        self.indexes = {name: i for name, i in plan.indexes.items() if i}
        self.present = set(plan.indexes)  # managed devices as observed, then as changed

    async def run(self) -> ApplyResult[frozenset[str]]:
        writes = 0
        errors: list[ApplyError] = []
        for batch in _fdb_batches(self.plan.actions):
            if isinstance(batch, list):  # a run of FDB changes on one device: bulk path
                ok, failed = await self._fdb_batch(batch)
                writes += ok
                errors += failed
                continue
            op, device = type(batch).__name__, _device(batch)
            try:
                await self._one(batch, op)
            except ApplyError as e:
                errors.append(e)
            except NetlinkError as e:
                errors.append(ApplyError.from_errno(device, op, e.code))
            except Exception as e:  # keep going: one bad action must not block the rest
                errors.append(ApplyError(device, op, f"{type(e).__name__}: {e}", temporary=False))
            else:
                writes += 1
        return ApplyResult(writes=writes, reached=frozenset(self.present), errors=tuple(errors))

    async def _fdb_batch(self, batch: list[AddFdb | DelFdb]) -> tuple[int, list[ApplyError]]:
        first = batch[0]
        op, device = type(first).__name__, first.device
        kernel_op = "append" if isinstance(first, AddFdb) else "delete"
        if not is_managed(device):
            return 0, [_foreign(device, op)] * len(batch)
        try:
            index = await self._index(device, op)
        except _Missing as e:
            if kernel_op == "delete":
                return len(batch), []  # the device is gone, and its entries with it
            return 0, [e] * len(batch)
        entries = [(a.mac.lower(), a.dst) for a in batch]
        try:
            failures = self.s.fdb.change(kernel_op, index, entries)
        except OSError as e:
            return 0, [ApplyError.from_errno(device, op, e.errno or 0)] * len(batch)
        self.log.info(
            "netlink %s: fdb %s %d entries (%d failed)",
            device,
            kernel_op,
            len(batch),
            len(failures),
        )
        errors = [
            ApplyError.from_errno(device, op, code, f"{mac} dst {dst or '-'}")
            for mac, dst, code in failures
        ]
        return len(batch) - len(failures), errors

    async def _index(self, name: str, op: str, device: str | None = None) -> int:
        """The observed ifindex; a lookup only for a device this apply created."""
        if (index := self.indexes.get(name)) is not None:
            return index
        found = await self.s.ipr.link_lookup(ifname=name)
        if not found:
            raise _Missing(device or name, op, name)
        self.indexes[name] = found[0]
        return found[0]

    async def _one(self, action: Action, op: str) -> None:
        ipr, log = self.s.ipr, self.log
        device = _device(action)
        if not is_managed(device):
            raise _foreign(device, op)
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
                self.present.add(name)  # it exists even if the MTU below fails
                await ipr.link("set", index=await self._index(name, op), mtu=mtu)
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
                await ipr.link("set", index=await self._index(name, op), mtu=mtu)
            case SetMaster(name, master):
                if master is not None and not is_managed(master):
                    raise Refused(name, op, f"refusing to enslave to foreign device {master!r}")
                index = await self._index(name, op)
                master_index = 0 if master is None else await self._index(master, op, name)
                log.info("netlink %s: master %s", name, master or "none")
                await ipr.link("set", index=index, master=master_index)
            case SetUp(name):
                log.info("netlink %s: up", name)
                await ipr.link("set", index=await self._index(name, op), state="up")
            case AddAddress(name, address):
                iface = _ipv4(name, op, address)
                log.info("netlink %s: add address %s", name, iface)
                await _tolerate(
                    {errno.EEXIST},
                    ipr.addr(
                        "add",
                        index=await self._index(name, op),
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    ),
                )
            case DelAddress(name, address):
                iface = _ipv4(name, op, address)
                log.info("netlink %s: delete address %s", name, iface)
                try:
                    index = await self._index(name, op)
                    args = {"address": str(iface.ip), "prefixlen": iface.network.prefixlen}
                    await _tolerate(_GONE, ipr.addr("del", index=index, **args))
                except _Missing:
                    pass  # deletes are idempotent: a missing device has no address either
            case DeleteLink(name):
                log.info("netlink %s: delete link", name)
                try:
                    await _tolerate(_GONE, ipr.link("del", index=await self._index(name, op)))
                except _Missing:
                    pass
                self.indexes.pop(name, None)
                self.present.discard(name)
            case _:
                raise Refused(device, op, f"unknown action {action!r}")
        if isinstance(action, _CREATES):
            self.present.add(device)


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


def _device(action: Action) -> str:
    return action.device if isinstance(action, AddFdb | DelFdb) else action.name


def _foreign(device: str, op: str) -> Refused:
    return Refused(device, op, f"refusing to touch {device!r}: not an Otherix ('ot…') device")


def _ipv4(device: str, op: str, address: str) -> ipaddress.IPv4Interface:
    try:
        return ipaddress.IPv4Interface(address)
    except ValueError:
        raise Refused(device, op, f"bad IPv4 address {address!r}") from None


async def _tolerate(codes: set[int], coro: Coroutine[Any, Any, Any]) -> None:
    try:
        await coro
    except NetlinkError as e:
        if e.code not in codes:
            raise
