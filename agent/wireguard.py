"""The WireGuard mesh applier: owns ``otwg0`` (its keys, listen port, peers, MTU, address, up).

Desired state is ``schemas.desired.WireGuard``; the applier observes the device, plans with the
pure functions of ``agent.wgplan`` (``plan_device``, ``plan_link``) and writes only the
difference, so an unchanged snapshot makes zero writes and an unchanged peer is never re-set
(its session and handshake stay as they are). ``apply(None)`` leaves the device alone: silence
never tears down.

Two backends behind one applier:

- ``kernel``: the WireGuard module, configured over generic netlink (sync ``pyroute2.WireGuard``).
- ``userspace``: ``wireguard-go`` driven through its UAPI socket ``<run_dir>/<ifname>.sock``
  (text protocol, keys in hex). The agent adopts a daemon whose socket answers and starts one
  (``WG_PROCESS_FOREGROUND=1``, own session, log in ``<run_dir>/<ifname>.log``) only when there is
  none. A supervisor task restarts a dead daemon and re-applies the last snapshot. ``close()``
  leaves the daemon running by default, so the data plane survives an agent restart; under
  systemd that needs ``KillMode=process`` (or a separate unit) for the same effect.

``auto`` picks: an existing ``otwg0`` of kind wireguard -> kernel; a live UAPI socket -> userspace;
a resolvable ``wireguard`` genl family (module present, it autoloads) -> kernel; else userspace.

Link work (observe, create, delete, MTU, address, up) goes through the agent's one rtnetlink
socket, ``agent.netlink.NetlinkThread``, the same the bridge/VXLAN applier uses. The genl side
(keys, peers) is sync ``pyroute2.WireGuard`` in ``asyncio.to_thread``: pyroute2's async sockets do
not run on uvloop, the agent's main loop. This module never touches any device but its own
``ot…`` interface and never logs keys.
"""

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pyroute2 import WireGuard as Pyroute2WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from agent import wgkeys
from agent.model import Action, CreateWireGuard, DeleteLink, Link
from agent.netlink import NetlinkThread
from agent.wgplan import (
    DeviceMissing,
    DevicePlan,
    ObservedDevice,
    WireGuardError,
    parse_genl,
    parse_get,
    plan_device,
    plan_link,
    render_set,
    split_endpoint,
    validate,
)
from schemas.desired import WireGuard
from schemas.messages import PeerHealth
from schemas.naming import WIREGUARD_IFNAME, is_managed

log = logging.getLogger(__name__)

RUN_DIR = Path("/var/run/wireguard")  # wireguard-go hard-codes this directory for its socket
START_TIMEOUT = 5.0
UAPI_TIMEOUT = 5.0
Backend = Literal["auto", "kernel", "userspace"]


# --- links: otwg0's rtnetlink side ---------------------------------------------------------------


class Links(Protocol):
    async def observe(self, name: str) -> Link | None: ...
    async def create_wireguard(self, name: str) -> None: ...
    async def execute(self, name: str, actions: Sequence[Action]) -> None: ...
    async def delete(self, name: str) -> None: ...


class NetlinkLinks:
    """``Links`` on the agent's ``NetlinkThread``; a failed action raises ``WireGuardError``."""

    def __init__(self, netlink: NetlinkThread):
        self.netlink = netlink

    async def observe(self, name: str) -> Link | None:
        return await self.netlink.observe_link(name)

    async def create_wireguard(self, name: str) -> None:
        await self.execute(name, [CreateWireGuard(name)])

    async def execute(self, name: str, actions: Sequence[Action]) -> None:
        # existing address on add, missing one on delete: the netlink applier counts them done
        result = await self.netlink.apply(actions)
        if result.errors:
            raise WireGuardError("; ".join(result.errors))

    async def delete(self, name: str) -> None:
        await self.execute(name, [DeleteLink(name)])  # already gone counts as done


# --- backends ---------------------------------------------------------------------------------


class Uapi:
    """wireguard-go's UAPI socket: one connection per request, answers end in a blank line."""

    def __init__(self, path: Path):
        self.path = path

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
                            raise WireGuardError(f"{self.path}: UAPI closed mid-answer")
                        lines.append(line.decode().rstrip("\n"))
                finally:
                    writer.close()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DeviceMissing(f"{self.path}: {exc.strerror}") from None
        except TimeoutError:
            raise WireGuardError(f"{self.path}: UAPI did not answer in {UAPI_TIMEOUT}s") from None
        return lines

    async def get(self) -> ObservedDevice:
        return parse_get("\n".join(await self.request("get=1\n\n")))

    async def set(self, text: str) -> None:
        lines = await self.request(text)
        if not lines or lines[-1] != "errno=0":
            raise WireGuardError(f"UAPI set failed: {lines[-1] if lines else 'no answer'}")

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


class KernelBackend:
    name = "kernel"

    def __init__(self, ifname: str, links: Links, wg_factory: Callable[[], Any]):
        self.ifname, self.links, self.wg_factory = ifname, links, wg_factory

    async def ensure_device(self) -> int:
        link = await self.links.observe(self.ifname)
        if link is not None and link.kind == "wireguard":
            return 0
        writes = 1
        if link is not None:  # e.g. a wireguard-go tun left from the userspace backend
            log.warning(
                "%s: replacing a %r device with a kernel WireGuard one", self.ifname, link.kind
            )
            await self.links.delete(self.ifname)
            writes += 1
        await self.links.create_wireguard(self.ifname)
        log.info("%s: created (kernel WireGuard)", self.ifname)
        return writes

    async def observe(self) -> ObservedDevice:
        return await asyncio.to_thread(self._observe)

    def _observe(self) -> ObservedDevice:
        wg = self.wg_factory()
        try:
            return parse_genl(tuple(wg.info(self.ifname)))
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                raise DeviceMissing(f"{self.ifname}: no such WireGuard device") from None
            raise
        finally:
            wg.close()

    async def configure(self, plan: DevicePlan) -> None:
        await asyncio.to_thread(self._configure, plan)

    def _configure(self, plan: DevicePlan) -> None:
        """One netlink request per item (pyroute2 sets one peer per call); failures are
        collected so the other items still get written."""
        calls: list[dict[str, Any]] = []
        if plan.private_key is not None or plan.listen_port is not None:
            calls.append({"private_key": plan.private_key, "listen_port": plan.listen_port})
        calls += [{"peer": {"public_key": k, "remove": True}} for k in plan.peers.remove]
        for change, only in [(c, True) for c in plan.peers.update] + [
            (c, False) for c in plan.peers.add
        ]:
            peer: dict[str, Any] = {"public_key": change.public_key, "update_only": only}
            if change.endpoint is not None:
                peer["endpoint_addr"], peer["endpoint_port"] = split_endpoint(change.endpoint)
            if change.allowed_ips is not None:
                peer["replace_allowed_ips"] = True
                peer["allowed_ips"] = list(change.allowed_ips)
            calls.append({"peer": peer})
        errors: list[Exception] = []
        wg = self.wg_factory()
        try:
            for kwargs in calls:
                try:
                    wg.set(self.ifname, **kwargs)
                except Exception as exc:  # keep going; report together
                    errors.append(exc)
        finally:
            wg.close()
        if errors:
            raise ExceptionGroup(f"{self.ifname}: {len(errors)} WireGuard writes failed", errors)

    async def alive(self) -> bool:
        return True  # nothing to supervise: the heartbeat re-creates a deleted device

    async def remove(self) -> None:
        await self.links.delete(self.ifname)

    async def stop(self) -> None:
        pass


class UserspaceBackend:
    name = "userspace"

    def __init__(self, ifname: str, run_dir: Path, links: Links, binary: str):
        self.ifname, self.run_dir, self.links, self.binary = ifname, run_dir, links, binary
        self.uapi = Uapi(run_dir / f"{ifname}.sock")
        self.proc: subprocess.Popen[bytes] | None = None  # only a daemon we started

    async def alive(self) -> bool:
        if self.proc is not None and (rc := self.proc.poll()) is not None:
            log.warning("%s: wireguard-go (pid %d) exited with %s", self.ifname, self.proc.pid, rc)
            self.proc = None
            return False
        return await self.uapi.alive()

    async def ensure_device(self) -> int:
        if await self.alive():
            return 0
        await self._start()
        return 1

    async def _start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise WireGuardError(f"{self.binary} not found (install the wireguard-go package)")
        # Leftovers of a dead or unreachable daemon are ours (``ot`` name, our socket): clear them.
        if await self.links.observe(self.ifname) is not None:
            log.warning("%s: device without a live UAPI socket; deleting it", self.ifname)
            await self.links.delete(self.ifname)
        with contextlib.suppress(FileNotFoundError):
            self.uapi.path.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.run_dir / f"{self.ifname}.log"
        self.proc = await asyncio.to_thread(self._spawn, binary, logfile)
        deadline = time.monotonic() + START_TIMEOUT
        while not await self.uapi.alive():
            if (rc := self.proc.poll()) is not None:
                self.proc = None
                raise WireGuardError(f"{self.ifname}: wireguard-go exited with {rc}; see {logfile}")
            if time.monotonic() > deadline:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, START_TIMEOUT)
                self.proc = None
                raise WireGuardError(f"{self.ifname}: wireguard-go gave no UAPI socket in time")
            await asyncio.sleep(0.02)
        log.info("%s: started wireguard-go (pid %d)", self.ifname, self.proc.pid)

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

    async def configure(self, plan: DevicePlan) -> None:
        await self.uapi.set(render_set(plan))

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
        await self.links.delete(self.ifname)
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


# --- the applier ------------------------------------------------------------------------------


class WireGuardApplier:
    def __init__(
        self,
        netlink: NetlinkThread | Links,
        ifname: str = WIREGUARD_IFNAME,
        *,
        private_key: str,
        backend: Backend = "auto",
        run_dir: Path | str = RUN_DIR,
        wg_factory: Callable[[], Any] | None = None,
        wireguard_go: str = "wireguard-go",
        check_interval: float = 1.0,
    ):
        if not is_managed(ifname):
            raise ValueError(f"{ifname!r} is not an Otherix device name")
        if backend not in ("auto", "kernel", "userspace"):
            raise ValueError(f"unknown WireGuard backend {backend!r}")
        self.ifname = ifname
        self.private_key = private_key
        self._requested = backend
        self._run_dir = Path(run_dir)
        # the agent passes its NetlinkThread: one rtnetlink socket for all link work
        self._links = NetlinkLinks(netlink) if isinstance(netlink, NetlinkThread) else netlink
        self._wg_factory = wg_factory or _pyroute2_wireguard
        self._wireguard_go = wireguard_go
        self._check_interval = check_interval
        self._backend: KernelBackend | UserspaceBackend | None = None
        self._lock = asyncio.Lock()
        self._last: WireGuard | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def private_key(self) -> str:
        return self._private_key

    @private_key.setter
    def private_key(self, key: str) -> None:
        """Rotate the key; the next ``apply`` writes it."""
        self._public_key = wgkeys.public_key(key)  # validates
        self._private_key = key

    @property
    def public_key(self) -> str:
        return self._public_key

    @property
    def backend_name(self) -> str:
        """The resolved backend, kernel or userspace; the requested mode until the first use."""
        return self._backend.name if self._backend is not None else self._requested

    async def probe(self) -> str:
        return (await self._resolve()).name

    async def apply(self, desired: WireGuard | None, link: Link | None = None) -> int:
        """Converge the device on ``desired``; returns the number of writes (0 when in sync).

        ``link``: the device as the caller just observed it (the agent's heartbeat already dumps
        every ``ot…`` link), so a no-op heartbeat does not read it a second time.
        """
        if desired is None:
            return 0  # silence never tears the data plane down
        if desired.name != self.ifname:
            raise ValueError(
                f"snapshot names WireGuard device {desired.name!r}, not {self.ifname!r}"
            )
        validate(desired)
        async with self._lock:
            writes = await self._apply_locked(desired, link)
        if self.backend_name == "userspace" and self._supervisor is None:
            self._supervisor = asyncio.create_task(
                self._supervise(), name=f"wg-supervise-{self.ifname}"
            )
        return writes

    async def _apply_locked(self, desired: WireGuard, observed: Link | None) -> int:
        backend = await self._resolve()
        writes = await backend.ensure_device()
        plan = plan_device(desired, self._private_key, await backend.observe(), self._public_key)
        if plan.writes:
            await backend.configure(plan)
            p = plan.peers
            log.info(
                "%s: wrote %d (key=%s port=%s peers +%d ~%d -%d)",
                self.ifname, plan.writes, plan.private_key is not None, plan.listen_port,
                len(p.add), len(p.update), len(p.remove),
            )  # fmt: skip
        self._last = desired  # the supervisor re-applies this after a daemon restart
        # the caller's observation holds unless this apply just (re)created the device
        link = (
            observed
            if observed is not None and not writes
            else await self._links.observe(self.ifname)
        )
        if link is None:
            raise DeviceMissing(f"{self.ifname}: device vanished during apply")
        if actions := plan_link(desired, link):
            await self._links.execute(self.ifname, actions)
            log.info("%s: link %s", self.ifname, ", ".join(type(a).__name__ for a in actions))
        return writes + plan.writes + len(actions)

    async def peers(self) -> list[PeerHealth]:
        """Peer health as the device reports it ([] when there is no device)."""
        async with self._lock:
            try:
                dev = await (await self._resolve()).observe()
            except DeviceMissing:
                return []
        nodes = {p.public_key: p.node for p in self._last.peers} if self._last else {}
        return [
            PeerHealth(
                public_key=p.public_key,
                node=nodes.get(p.public_key, ""),
                endpoint=p.endpoint,
                latest_handshake=p.latest_handshake,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
            )
            for p in dev.peers
        ]

    async def daemon_pid(self) -> int | None:
        """wireguard-go's pid (userspace backend), whether we started it or adopted it."""
        backend = await self._resolve()
        return await backend.pid() if isinstance(backend, UserspaceBackend) else None

    async def remove(self) -> None:
        """Explicit teardown: delete the device (and stop wireguard-go)."""
        await self._stop_supervisor()
        async with self._lock:
            await (await self._resolve()).remove()
            self._last = None
        log.info("%s: removed", self.ifname)

    async def close(self, *, stop_daemon: bool = False) -> None:
        """Stop supervising. wireguard-go keeps running unless ``stop_daemon`` (data plane first)."""
        await self._stop_supervisor()
        if stop_daemon and self._backend is not None:
            async with self._lock:
                await self._backend.stop()

    async def _stop_supervisor(self) -> None:
        if (task := self._supervisor) is not None:
            self._supervisor = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _supervise(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                async with self._lock:
                    if self._last is None or await self._backend.alive():  # type: ignore[union-attr]
                        continue
                    log.warning("%s: wireguard-go is gone; restarting it", self.ifname)
                    await self._apply_locked(self._last, None)  # the daemon is new: observe afresh
                failures = 0
                log.info("%s: wireguard-go restarted and configured", self.ifname)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                if failures == 1:  # the first failure in full, then quietly keep trying
                    log.exception("%s: restarting wireguard-go failed", self.ifname)

    async def _resolve(self) -> KernelBackend | UserspaceBackend:
        if self._backend is None:
            name = self._requested
            if name == "auto":
                name = await self._probe()
                log.info("%s: WireGuard backend %s", self.ifname, name)
            if name == "kernel":
                self._backend = KernelBackend(self.ifname, self._links, self._wg_factory)
            else:
                self._backend = UserspaceBackend(
                    self.ifname, self._run_dir, self._links, self._wireguard_go
                )
        return self._backend

    async def _probe(self) -> str:
        link = await self._links.observe(self.ifname)
        if link is not None and link.kind == "wireguard":
            return "kernel"
        return await asyncio.to_thread(self._probe_sync)

    def _probe_sync(self) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self._run_dir / f"{self.ifname}.sock"))
                return "userspace"  # adopt the running daemon
            except OSError:
                pass
        try:
            self._wg_factory().close()  # resolving the genl family autoloads the module
            return "kernel"
        except Exception:
            return "userspace"


def _pyroute2_wireguard() -> Any:
    return Pyroute2WireGuard()
