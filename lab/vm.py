"""Lab VMs: a namespace ``{prefix}-vm-{vm}`` whose ``eth0`` is wired to an agent's tap.

Owns the VM namespace (guest NIC ``eth0`` + its veth peer ``wire0``) and the wire process
(``lab.wire``) started in the node's namespace, recorded as ``{state_dir}/vm-{vm}.pid`` with
its log beside it. The tap belongs to the agent; this module never creates or deletes one.
Also: ``ping`` from any namespace, and ``probe_once``: exactly one echo request.
"""

# ruff: noqa: ASYNC109 - explicit timeouts are part of the lab API (they bound subprocesses)

import asyncio
from dataclasses import dataclass
from pathlib import Path

from lab.netns import (
    LabError,
    netns_add,
    netns_del,
    netns_pids,
    ns_name,
    python_module,
    run,
    spawn,
    stop_pidfile,
    stop_pids,
    wait_ready,
)

GUEST_IF, WIRE_IF = "eth0", "wire0"


@dataclass
class VmHandle:
    name: str
    netns: str
    node_ns: str
    tap: str
    mac: str
    ip_cidr: str
    process: asyncio.subprocess.Process
    state_dir: Path

    @property
    def ip(self) -> str:
        return self.ip_cidr.split("/")[0]

    async def wait_attached(self, timeout: float = 10.0) -> None:
        """Wait until the wire process has attached to the tap (the agent made it)."""
        base = self.state_dir / f"vm-{self.name}"
        await wait_ready(self.process, Path(f"{base}.ready"), timeout, Path(f"{base}.log"))


async def vm_add(
    prefix: str,
    vm: str,
    node_ns: str,
    tap: str,
    mac: str,
    ip_cidr: str,
    gateway: str | None,
    mtu: int,
    *,
    state_dir: Path,
    tap_wait: float = 300.0,
) -> VmHandle:
    """Create the VM namespace and start its wire process (which waits for the tap)."""
    netns = ns_name(prefix, "vm", vm)
    await netns_add(netns)
    try:
        ipn = ("ip", "-n", netns)
        await run(*ipn, "link", "add", GUEST_IF, "mtu", str(mtu), "address", mac, "type", "veth",
                  "peer", "name", WIRE_IF, "mtu", str(mtu))  # fmt: skip
        # wire0 is a cable, not a host: no IPv6 link-local chatter from it
        await run("ip", "netns", "exec", netns,
                  "sysctl", "-qw", f"net.ipv6.conf.{WIRE_IF}.disable_ipv6=1")  # fmt: skip
        await run(*ipn, "link", "set", WIRE_IF, "up")
        await run(*ipn, "addr", "add", ip_cidr, "dev", GUEST_IF)
        await run(*ipn, "link", "set", GUEST_IF, "up")
        if gateway:
            await run(*ipn, "route", "add", "default", "via", gateway)
        name = f"vm-{vm}"
        ready = state_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        argv = python_module("lab.wire", "--tap", tap, "--netns", netns, "--ifname", WIRE_IF,
                             "--wait", str(tap_wait), "--ready-file", str(ready))  # fmt: skip
        proc = await spawn(argv, state_dir=state_dir, name=name, netns=node_ns)
    except BaseException:
        await netns_del(netns)
        raise
    return VmHandle(vm, netns, node_ns, tap, mac, ip_cidr, proc, state_dir)


async def vm_rm(prefix: str, vm: str, state_dir: Path) -> None:
    """Stop the wire process and delete the VM namespace; a missing VM is fine."""
    netns = ns_name(prefix, "vm", vm)
    await stop_pidfile(state_dir / f"vm-{vm}.pid")
    await stop_pids(await netns_pids(netns))  # e.g. a test's server left inside the VM
    (state_dir / f"vm-{vm}.ready").unlink(missing_ok=True)
    await netns_del(netns)


async def ping(
    ns: str,
    dst: str,
    count: int = 1,
    size: int | None = None,
    dont_fragment: bool = False,
    timeout: float = 3.0,
) -> bool:
    """True if all ``count`` echo replies arrive within ``timeout`` seconds overall."""
    argv = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.1",
            "-w", str(max(1, round(timeout)))]  # fmt: skip
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    try:
        await run(*argv, dst, timeout=timeout + 5)
    except LabError:
        return False
    return True


async def probe_once(ns: str, dst: str, wait: float) -> bool:
    """Exactly ONE echo request from ``ns``; True if its reply arrives within ``wait`` seconds.

    ``ping -c 1 -W wait`` without ``-w``: with a deadline (``-w``) ping keeps sending until a
    reply or the deadline, so ``-c 1 -w 1`` may send ten requests and hide a lost first one."""
    argv = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", f"{wait:g}", dst]
    try:
        await run(*argv, timeout=wait + 5)  # exit 0: the one reply arrived in time
    except LabError:
        return False
    return True
