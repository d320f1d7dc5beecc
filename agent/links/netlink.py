"""The links subsystem's kernel side: read managed (``ot…``) links, addresses, bridge-port
learning and FDB entries (VXLAN devices' own, bridges' on managed ports), and execute a
``LinkPlan``, as jobs on the agent's ``NetlinkThread``.

Links and addresses go through pyroute2's ``AsyncIPRoute`` (port learning comes with the link
dump: IFLA_LINKINFO's bridge slave data), FDB runs through the bulk socket: one dump, parsed by
``agent.links.fdb_dump`` (which also says which entries are ours), and writes by
``agent.links.fdb_socket``. ``observe_devices`` reads back a few links (the taps a plan wrote,
their bridges) and their ports' bridge entries, with dumps the kernel filters to each port. A
link the observation had is addressed by its ifindex; only a
device created during this apply is looked up (RTM_GETLINK). This module never decides *what*
to change (``agent.links.plan`` does) and never touches a device whose name lacks the ``ot``
prefix, nor an FDB entry outside a managed device; of the bridge entries on a managed port it
reports only the static ones (ours) and the learned ones, never the kernel's ``permanent`` own
addresses or entries in a VLAN.
"""

import errno
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import ApplyError, ApplyResult, Refused
from agent.links import fdb_dump
from agent.links.fdb_socket import APPEND, DELETE, REPLACE
from agent.links.model import (
    Action,
    AddAddress,
    AddFdb,
    AddPortFdb,
    CreateBridge,
    CreateTap,
    CreateVxlan,
    CreateWireGuard,
    DelAddress,
    DeleteLink,
    DelFdb,
    DelPortFdb,
    FdbAction,
    Link,
    LinkPlan,
    Observed,
    SetMaster,
    SetMtu,
    SetPortLearning,
    SetUp,
    VxlanInfo,
)
from agent.links.plan import is_unicast
from agent.logs import NodeLog
from agent.netlink_thread import NetlinkThread, Sockets
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

    async def observe_devices(self, names: Iterable[str]) -> Observed:
        names = sorted(names)
        return await self.netlink.run(lambda s: observe_devices(s, names))

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
    ports: dict[int, str] = {}
    for index, m in managed.items():
        master = m.get_attr("IFLA_MASTER")
        link = _link(m, names[index], addresses[index], names.get(master) if master else None)
        links[link.name] = link
        if link.kind == "vxlan":
            vxlans[index] = link.name
        if link.master is not None:
            ports[index] = link.name

    if vxlans or ports:
        tables = fdb_dump.read(s.fdb, vxlans, ports)
    else:  # nothing of ours can hold an entry: no dump
        tables = fdb_dump.FdbTables({}, {}, {}, {})
    return Observed(
        links=links,
        fdb=tables.fdb,
        learned=tables.learned,
        port_fdb=tables.port_fdb,
        port_learned=tables.port_learned,
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


async def observe_devices(s: Sockets, names: Iterable[str]) -> Observed:
    """The named managed links as they are now (a name missing from ``links`` does not exist),
    with their bridge's entries on each that is a bridge port: what a write of a few devices
    (a tap and its bridge) left, read back without a dump of every link and FDB entry."""
    links = {name: link for name in names if (link := await observe_link(s, name)) is not None}
    port_fdb: dict[str, frozenset[str]] = {}
    port_learned: dict[str, frozenset[str]] = {}
    for name, link in links.items():
        if link.master is not None:  # the kernel filters the dump to the port (``brport``)
            tables = fdb_dump.read(s.fdb, {}, {link.index: name}, port=link.index)
            port_fdb[name] = tables.port_fdb.get(name, frozenset())
            port_learned[name] = tables.port_learned.get(name, frozenset())
    return Observed(links=links, port_fdb=port_fdb, port_learned=port_learned)


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
    port_learning = None
    if info and master is not None and info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge":
        slave = info.get_attr("IFLA_INFO_SLAVE_DATA")
        port_learning = bool(slave.get_attr("IFLA_BRPORT_LEARNING")) if slave else None
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
        port_learning=port_learning,
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
            if isinstance(batch, list):  # a run of one kind of FDB change: bulk path
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

    async def _fdb_batch(self, batch: list[FdbAction]) -> tuple[int, list[ApplyError]]:
        """One kind of FDB change on any number of devices, pipelined; errors per entry."""
        op = type(batch[0]).__name__
        master = isinstance(batch[0], AddPortFdb | DelPortFdb)
        deleting = isinstance(batch[0], DelFdb | DelPortFdb)
        writes, errors = 0, []
        by_op: dict[str, list[tuple[int, str, str | None]]] = {}
        actions: dict[str, list[FdbAction]] = {}
        for action in batch:
            device = _device(action)
            if not is_managed(device):
                errors.append(_foreign(device, op))
                continue
            try:
                index = await self._index(device, op)
            except _Missing as e:
                if deleting:
                    writes += 1  # the device is gone, and its entries with it
                else:
                    errors.append(e)
                continue
            mac, dst = action.mac.lower(), getattr(action, "dst", None)
            if deleting:
                kernel_op = DELETE
            else:  # one dst (or port) per unicast MAC: set, or move, in one message
                kernel_op = REPLACE if master or is_unicast(mac) else APPEND
            by_op.setdefault(kernel_op, []).append((index, mac, dst))
            actions.setdefault(kernel_op, []).append(action)
        for kernel_op, entries in by_op.items():
            try:
                failures = self.s.fdb.change(kernel_op, entries, master=master)
            except OSError as e:
                code = e.errno or 0
                errors += [ApplyError.from_errno(_device(a), op, code) for a in actions[kernel_op]]
                continue
            writes += len(entries) - len(failures)
            kind = f"fdb {kernel_op}{' master' if master else ''}"
            for device, count in Counter(_device(a) for a in actions[kernel_op]).items():
                self.log.info("netlink %s: %s %d entries", device, kind, count)
            for position, code in failures:
                a = actions[kernel_op][position]
                detail = f"{a.mac} dst {a.dst or '-'}" if isinstance(a, AddFdb | DelFdb) else a.mac
                errors.append(ApplyError.from_errno(_device(a), op, code, detail))
        return writes, errors

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
            case SetPortLearning(name, learning):
                log.info("netlink %s: bridge port learning %s", name, "on" if learning else "off")
                index = await self._index(name, op)
                await ipr.link("set", index=index, kind="bridge_slave", learning=int(learning))
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


def _fdb_batches(actions: Sequence[Action]) -> list[Action | list[FdbAction]]:
    """Group consecutive FDB changes of one kind (any devices); keep everything else in order."""
    out: list[Action | list[FdbAction]] = []
    for action in actions:
        if isinstance(action, FdbAction):
            last = out[-1] if out else None
            if isinstance(last, list) and type(last[0]) is type(action):
                last.append(action)
                continue
            out.append([action])
        else:
            out.append(action)
    return out


def _device(action: Action) -> str:
    if isinstance(action, AddPortFdb | DelPortFdb):
        return action.port
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
