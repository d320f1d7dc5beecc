"""The lab's underlay: a fabric namespace with bridge ``fabric0``, node namespaces and "outside".

Owns the namespaces ``{prefix}-fabric``, ``{prefix}-{node}`` and ``{prefix}-outside`` and the
veths joining them (fabric side ``n{index}`` / ``outside``, node side ``eth0``), plus
``cleanup_prefix``, which removes everything a lab with that prefix left behind (also after a
crash: it finds namespaces by name and processes by pid file, namespace and command line).
Never touches a namespace or process without the prefix.
"""

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lab.netns import (
    LabError,
    netns_add,
    netns_del,
    netns_list,
    netns_pids,
    ns_name,
    read_pidfile,
    run,
    stop_pids,
)

log = logging.getLogger(__name__)

UNDERLAY_NET = "198.18.0"  # RFC 2544 benchmarking range, never routed on a real network
UNDERLAY_PREFIXLEN = 24
OUTSIDE_IP = f"{UNDERLAY_NET}.254"
# The nodes' part of the fabric (.0-.223, nodes sit at .11-.210) is the cluster's underlay:
# infrastructure no VM network may overlap or reach. The outside host (.254) stays outside it.
UNDERLAY_CIDRS = f"{UNDERLAY_NET}.0/25,{UNDERLAY_NET}.128/26,{UNDERLAY_NET}.192/27"
FABRIC_BRIDGE = "fabric0"
MAX_INDEX = 243  # 10 + 243 = 253; .254 is the outside host


def default_state_dir(prefix: str) -> Path:
    return Path("/run/otherix-lab") / prefix


def node_ip(index: int) -> str:
    if not 0 <= index <= MAX_INDEX:
        raise LabError(f"node index {index} outside 0..{MAX_INDEX}")
    return f"{UNDERLAY_NET}.{10 + index}"


@dataclass(frozen=True)
class LabNode:
    name: str
    netns: str
    underlay_ip: str
    index: int


class Topology:
    def __init__(
        self, prefix: str = "otlab", underlay_mtu: int = 1500, state_dir: Path | None = None
    ):
        self.prefix = prefix
        self.underlay_mtu = underlay_mtu
        self.state_dir = state_dir or default_state_dir(prefix)
        self.fabric = ns_name(prefix, "fabric")
        self.outside = ns_name(prefix, "outside")
        self.nodes: dict[str, LabNode] = {}

    async def create_fabric(self) -> None:
        await netns_add(self.fabric)
        fab = ("ip", "-n", self.fabric)
        await run(
            *fab, "link", "add", FABRIC_BRIDGE, "mtu", str(self.underlay_mtu), "type", "bridge"
        )
        await run(*fab, "link", "set", FABRIC_BRIDGE, "up")

    async def _plug(self, ns: str, fabric_side: str, cidr: str) -> None:
        """veth ``fabric_side`` (on fabric0) <-> ``eth0`` in ``ns`` with address ``cidr``."""
        mtu = str(self.underlay_mtu)
        fab = ("ip", "-n", self.fabric)
        await run(*fab, "link", "add", fabric_side, "mtu", mtu, "type", "veth",
                  "peer", "name", "eth0", "mtu", mtu, "netns", ns)  # fmt: skip
        await run(*fab, "link", "set", fabric_side, "master", FABRIC_BRIDGE, "up")
        await run("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0")
        await run("ip", "-n", ns, "link", "set", "eth0", "up")

    def node_handle(self, name: str, index: int) -> LabNode:
        """The description of a node that already exists (e.g. made by an earlier command)."""
        return LabNode(name, ns_name(self.prefix, name), node_ip(index), index)

    async def add_node(self, name: str, index: int, ip_forward: bool = True) -> LabNode:
        """A hypervisor: namespace ``{prefix}-{name}``, ``eth0`` = 198.18.0.(10+index)/24.

        ``ip_forward`` is on by default, as on a typical hypervisor host (NAT needs it).
        """
        if name in ("fabric", "outside") or name.startswith("vm-"):
            raise LabError(f"node name {name!r} clashes with the lab's own namespaces")
        if any(n.index == index for n in self.nodes.values()):
            raise LabError(f"node index {index} already used")
        node = self.node_handle(name, index)
        await netns_add(node.netns)
        try:
            await self._plug(node.netns, f"n{index}", f"{node.underlay_ip}/{UNDERLAY_PREFIXLEN}")
            if ip_forward:
                await run("ip", "netns", "exec", node.netns,
                          "sysctl", "-qw", "net.ipv4.ip_forward=1")  # fmt: skip
        except BaseException:
            await netns_del(node.netns)
            raise
        self.nodes[name] = node
        return node

    async def remove_node(self, name: str) -> None:
        """Delete a node; processes still inside are killed (they would keep it alive)."""
        node = self.nodes.pop(name, None)
        netns = node.netns if node else ns_name(self.prefix, name)
        await stop_pids(await netns_pids(netns))
        if node:  # a namespace kept alive by anything would keep the veth on fabric0
            await run("ip", "-n", self.fabric, "link", "del", f"n{node.index}", check=False)
        await netns_del(netns)

    async def add_outside(self) -> str:
        """A host on the fabric standing for "the internet": no route to any VM subnet."""
        await netns_add(self.outside)
        await self._plug(self.outside, "outside", f"{OUTSIDE_IP}/{UNDERLAY_PREFIXLEN}")
        return OUTSIDE_IP

    async def destroy(self) -> None:
        await cleanup_prefix(self.prefix, self.state_dir)
        self.nodes.clear()


def _cmdline_pids(prefix: str) -> list[int]:
    """Processes with an argument ``{prefix}-...`` (e.g. relays listing node namespaces)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            args = (Path("/proc") / entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(f"{prefix}-".encode()) for a in args):
            found.append(int(entry))
    return found


async def cleanup_prefix(prefix: str, state_dir: Path | None = None) -> None:
    """Remove every ``{prefix}-*`` namespace and every process of that lab.

    Processes: those in ``{state_dir}/*.pid`` (checked against their start time), those living
    inside the lab's namespaces, and those whose command line names one. SIGTERM first, SIGKILL
    after a grace period; then the namespaces are deleted.
    """
    state_dir = state_dir or default_state_dir(prefix)
    namespaces = netns_list(prefix)
    pidfiles = sorted(state_dir.glob("*.pid")) if state_dir.is_dir() else []
    pids = {pid for f in pidfiles if (pid := read_pidfile(f)) is not None}
    for ns in namespaces:
        pids.update(await netns_pids(ns))
    pids.update(_cmdline_pids(prefix))
    pids.discard(os.getpid())
    if pids:
        log.info("lab %s: stopping pids %s", prefix, sorted(pids))
        await stop_pids(sorted(pids))
    for f in pidfiles:
        f.unlink(missing_ok=True)
    results = await asyncio.gather(*(netns_del(ns) for ns in namespaces), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise LabError(f"lab {prefix}: cleanup left namespaces: {errors}")
