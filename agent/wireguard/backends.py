"""The two ways to run ``otwg0``, behind one small interface the WireGuard applier uses.

- ``KernelBackend``: the WireGuard module, keys and peers over generic netlink (sync
  ``pyroute2.WireGuard`` in ``asyncio.to_thread``: pyroute2's async sockets do not run on
  uvloop). Its link is created, replaced and judged from the link it is given.
- ``UserspaceBackend``: ``wireguard-go`` driven through its UAPI socket ``<run_dir>/<ifname>.sock``
  (text protocol, keys in hex). It adopts a daemon whose socket answers and starts one
  (``WG_PROCESS_FOREGROUND=1``, own session, log in ``<run_dir>/<ifname>.log``) only when there
  is none.

Link work (create, delete) goes through the links subsystem (``Links``), one rtnetlink socket
for the whole agent. Failures are typed (``WireGuardError``, ``DeviceMissing``,
``ApplyError``); this module never touches any device but its own and never logs keys.
"""

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import TEMPORARY_ERRNOS, ApplyError, ApplyResult, DeviceMissing, WireGuardError
from agent.links.model import Action, CreateWireGuard, DeleteLink, Link, LinkPlan
from agent.logs import NodeLog
from agent.wireguard.plan import (
    DevicePlan,
    ObservedDevice,
    parse_genl,
    parse_get,
    render_set,
    split_endpoint,
)

START_TIMEOUT = 5.0
UAPI_TIMEOUT = 5.0


class Links(Protocol):
    """What the WireGuard subsystem needs of the links subsystem (``LinkApplier``)."""

    async def observe_link(self, name: str) -> Link | None: ...
    async def apply(self, plan: LinkPlan) -> ApplyResult[frozenset[str]]: ...


async def link_actions(
    links: Links, name: str, actions: Sequence[Action], link: Link | None = None
) -> ApplyResult[frozenset[str]]:
    """Run actions on our own link, by the ifindex of ``link`` when the caller has it."""
    indexes = {name: link.index} if link is not None else {}
    return await links.apply(LinkPlan(actions=tuple(actions), indexes=indexes))


def must(result: ApplyResult[Any]) -> None:
    """Raise the first failure of a one-action link plan."""
    if result.errors:
        raise result.errors[0]


# --- userspace: wireguard-go's UAPI socket -----------------------------------------------------


class Uapi:
    """wireguard-go's UAPI socket: one connection per request, answers end in a blank line."""

    def __init__(self, path: Path, ifname: str):
        self.path, self.ifname = path, ifname

    async def request(self, text: str) -> list[str]:
        try:
            async with asyncio.timeout(UAPI_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                try:
                    writer.write(text.encode())
                    await writer.drain()
                    lines = []
                    while (line := await reader.readline()) != b"\n":
                        if not line:
                            raise WireGuardError(
                                f"{self.path}: UAPI closed mid-answer", device=self.ifname
                            )
                        lines.append(line.decode().rstrip("\n"))
                finally:
                    writer.close()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DeviceMissing(f"{self.path}: {exc.strerror}", device=self.ifname) from None
        except TimeoutError:
            raise WireGuardError(
                f"{self.path}: UAPI did not answer in {UAPI_TIMEOUT}s", device=self.ifname
            ) from None
        return lines

    async def get(self) -> ObservedDevice:
        return parse_get("\n".join(await self.request("get=1\n\n")))

    async def set(self, text: str) -> None:
        lines = await self.request(text)
        if not lines or lines[-1] != "errno=0":
            last = lines[-1] if lines else "no answer"
            code = int(last[6:]) if last.startswith("errno=") and last[6:].isdigit() else None
            raise WireGuardError(
                f"UAPI set failed: {last}",
                device=self.ifname,
                op="configure",
                errno=code,
                temporary=code in TEMPORARY_ERRNOS,
            )

    async def alive(self) -> bool:
        try:
            async with asyncio.timeout(UAPI_TIMEOUT):
                _, writer = await asyncio.open_unix_connection(str(self.path))
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    async def peer_pid(self) -> int | None:
        """The daemon's pid from the socket's peer credentials (works for adopted daemons)."""
        try:
            async with asyncio.timeout(UAPI_TIMEOUT):
                _, writer = await asyncio.open_unix_connection(str(self.path))
        except (OSError, TimeoutError):
            return None
        try:
            sock = writer.get_extra_info("socket")
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", cred)[0]
        finally:
            writer.close()


# --- kernel ------------------------------------------------------------------------------------


class KernelBackend:
    name = "kernel"

    def __init__(self, ifname: str, links: Links, wg_factory: Callable[[], Any], log: NodeLog):
        self.ifname, self.links, self.wg_factory, self.log = ifname, links, wg_factory, log

    async def ready(self, link: Link | None) -> bool:
        return link is not None and link.kind == "wireguard"

    async def create(self, link: Link | None) -> int:
        """Make the kernel device; ``link`` is what holds the name now (replaced if foreign)."""
        writes = 1
        if link is not None and link.kind != "wireguard":  # e.g. wireguard-go's tun
            self.log.warning(
                "%s: replacing a %r device with a kernel WireGuard one", self.ifname, link.kind
            )
            must(await link_actions(self.links, self.ifname, [DeleteLink(self.ifname)], link))
            writes += 1
        must(await link_actions(self.links, self.ifname, [CreateWireGuard(self.ifname)]))
        self.log.info("%s: created (kernel WireGuard)", self.ifname)
        return writes

    async def observe(self) -> ObservedDevice:
        return await asyncio.to_thread(self._observe)

    def _observe(self) -> ObservedDevice:
        wg = self.wg_factory()
        try:
            return parse_genl(tuple(wg.info(self.ifname)))
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                raise DeviceMissing(
                    f"{self.ifname}: no such WireGuard device", device=self.ifname, errno=exc.code
                ) from None
            raise WireGuardError(
                f"genl dump failed: {os.strerror(exc.code)}", device=self.ifname, errno=exc.code
            ) from None
        finally:
            wg.close()

    async def configure(self, plan: DevicePlan) -> tuple[int, list[ApplyError]]:
        return await asyncio.to_thread(self._configure, plan)

    def _configure(self, plan: DevicePlan) -> tuple[int, list[ApplyError]]:
        """One netlink request per item (pyroute2 sets one peer per call); a failed item never
        stops the others. Returns the writes made and the failures."""
        calls: list[tuple[int, str, dict[str, Any]]] = []  # (writes, what, kwargs)
        if plan.private_key is not None or plan.listen_port is not None:
            weight = (plan.private_key is not None) + (plan.listen_port is not None)
            calls.append(
                (weight, "key/port", {"private_key": plan.private_key, "listen_port": plan.listen_port})
            )  # fmt: skip
        calls += [
            (1, f"peer {k[:8]}…", {"peer": {"public_key": k, "remove": True}})
            for k in plan.peers.remove
        ]
        for change, only in [(c, True) for c in plan.peers.update] + [
            (c, False) for c in plan.peers.add
        ]:
            peer: dict[str, Any] = {"public_key": change.public_key, "update_only": only}
            if change.endpoint is not None:
                peer["endpoint_addr"], peer["endpoint_port"] = split_endpoint(change.endpoint)
            if change.allowed_ips is not None:
                peer["replace_allowed_ips"] = True
                peer["allowed_ips"] = list(change.allowed_ips)
            calls.append((1, f"peer {change.public_key[:8]}…", {"peer": peer}))
        writes, errors = 0, []
        wg = self.wg_factory()
        try:
            for weight, what, kwargs in calls:
                try:
                    wg.set(self.ifname, **kwargs)
                except NetlinkError as exc:
                    errors.append(ApplyError.from_errno(self.ifname, "configure", exc.code, what))
                except Exception as exc:  # keep going; report each
                    errors.append(
                        ApplyError(
                            self.ifname, "configure", f"{what}: {type(exc).__name__}: {exc}",
                            temporary=False,
                        )
                    )  # fmt: skip
                else:
                    writes += weight
        finally:
            wg.close()
        return writes, errors

    async def alive(self) -> bool:
        return True  # nothing to supervise: the heartbeat re-creates a deleted device

    async def remove(self) -> None:
        must(await link_actions(self.links, self.ifname, [DeleteLink(self.ifname)]))

    async def stop(self) -> None:
        pass


# --- userspace ---------------------------------------------------------------------------------


class UserspaceBackend:
    name = "userspace"

    def __init__(self, ifname: str, run_dir: Path, links: Links, binary: str, log: NodeLog):
        self.ifname, self.run_dir, self.links, self.binary = ifname, run_dir, links, binary
        self.log = log
        self.uapi = Uapi(run_dir / f"{ifname}.sock", ifname)
        self.proc: subprocess.Popen[bytes] | None = None  # only a daemon we started

    async def ready(self, link: Link | None) -> bool:
        return await self.alive()

    async def alive(self) -> bool:
        if self.proc is not None and (rc := self.proc.poll()) is not None:
            self.log.warning(
                "%s: wireguard-go (pid %d) exited with %s", self.ifname, self.proc.pid, rc
            )
            self.proc = None
            return False
        return await self.uapi.alive()

    async def create(self, link: Link | None) -> int:
        binary = shutil.which(self.binary)
        if binary is None:
            raise WireGuardError(
                f"{self.binary} not found (install the wireguard-go package)",
                device=self.ifname, op="start", temporary=False,
            )  # fmt: skip
        # Leftovers of a dead or unreachable daemon are ours (``ot`` name, our socket): clear them.
        # Read now: the daemon may have died since the heartbeat's dump.
        if (stale := await self.links.observe_link(self.ifname)) is not None:
            self.log.warning("%s: device without a live UAPI socket; deleting it", self.ifname)
            must(await link_actions(self.links, self.ifname, [DeleteLink(self.ifname)], stale))
        with contextlib.suppress(FileNotFoundError):
            self.uapi.path.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.run_dir / f"{self.ifname}.log"
        self.proc = await asyncio.to_thread(self._spawn, binary, logfile)
        deadline = time.monotonic() + START_TIMEOUT
        while not await self.uapi.alive():
            if (rc := self.proc.poll()) is not None:
                self.proc = None
                raise WireGuardError(
                    f"wireguard-go exited with {rc}; see {logfile}", device=self.ifname, op="start"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, START_TIMEOUT)
                self.proc = None
                raise WireGuardError(
                    "wireguard-go gave no UAPI socket in time", device=self.ifname, op="start"
                )
            await asyncio.sleep(0.02)
        self.log.info("%s: started wireguard-go (pid %d)", self.ifname, self.proc.pid)
        return 1

    def _spawn(self, binary: str, logfile: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        env.setdefault("LOG_LEVEL", "error")
        with open(logfile, "ab") as out:
            # own session: a ^C or the agent's exit does not take the data plane with it
            return subprocess.Popen(
                [binary, self.ifname],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    async def observe(self) -> ObservedDevice:
        return await self.uapi.get()

    async def configure(self, plan: DevicePlan) -> tuple[int, list[ApplyError]]:
        """One UAPI transaction: all of it or nothing."""
        try:
            await self.uapi.set(render_set(plan))
        except WireGuardError as e:
            return 0, [e]
        return plan.writes, []

    async def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else await self.uapi.peer_pid()

    async def remove(self) -> None:
        """Stop the daemon (ours or adopted); its tun device goes with it."""
        if (pid := await self.pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(int(START_TIMEOUT / 0.02)):  # until the socket stops answering
                if not await self.uapi.alive():
                    break
                await asyncio.sleep(0.02)
        await self.stop()
        must(await link_actions(self.links, self.ifname, [DeleteLink(self.ifname)]))
        with contextlib.suppress(FileNotFoundError):
            self.uapi.path.unlink()

    async def stop(self) -> None:
        if (proc := self.proc) is not None:
            self.proc = None
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, START_TIMEOUT)
