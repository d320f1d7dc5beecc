"""Async helpers for the lab: running ``ip``, network namespaces, and the lab's own processes.

Owns: running a command with a clear error (argv + stderr), creating/deleting/listing named
network namespaces, entering one from Python (``enter_netns``), and starting/stopping the
detached processes the lab runs (pid files with the process start time, so a recycled pid is
never killed). Never touches a namespace or process that the caller did not name.
"""

# ruff: noqa: ASYNC109 - explicit timeouts are part of the lab API (they bound subprocesses)

import asyncio
import contextlib
import ctypes
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # so `python -m lab.x` works anywhere

_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,15}$")  # no '-': "{prefix}-" must be unambiguous
_PART = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")


class LabError(Exception):
    """A lab operation failed; the message says which command and what it printed."""


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise LabError(f"lab prefix {prefix!r} must be 1-16 lowercase letters/digits, no '-'")
    return prefix


def ns_name(prefix: str, *parts: str) -> str:
    """``{prefix}-{part}-...``; parts are DNS labels, so the name is a safe file name."""
    for part in parts:
        if not _PART.match(part):
            raise LabError(f"lab name part {part!r} is not a lowercase DNS label")
    return "-".join((check_prefix(prefix), *parts))


# --- commands ---------------------------------------------------------------------------------


async def run(
    *argv: str, check: bool = True, input: str | bytes | None = None, timeout: float = 30.0
) -> str:
    """Run argv, return stdout; raise LabError (argv, rc, stderr) on failure or timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    data = input.encode() if isinstance(input, str) else input
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError(f"{' '.join(argv)}: timed out after {timeout}s") from None
    if check and proc.returncode != 0:
        msg = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {msg}")
    return out.decode(errors="replace")


async def exec_in(ns: str, *argv: str, check: bool = True, input=None, timeout=30.0) -> str:
    return await run("ip", "netns", "exec", ns, *argv, check=check, input=input, timeout=timeout)


# --- namespaces -------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback TCP port for a server to listen on, below the ephemeral range: a port
    from that range (a bind to port 0) may be taken by any outgoing connection before the
    server binds it (a lab's nats-server route port was, once in CI)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LabError(f"no free port found between 10000 and {low}")


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


async def netns_add(name: str) -> None:
    await run("ip", "netns", "add", name)
    await run("ip", "-n", name, "link", "set", "lo", "up")


async def netns_del(name: str) -> None:
    """Delete a namespace; a missing one is fine."""
    if not netns_exists(name):
        return
    await run("ip", "netns", "del", name, check=False)
    if netns_exists(name):
        raise LabError(f"ip netns del {name}: namespace still exists")


def netns_list(prefix: str) -> list[str]:
    """Namespaces ``{prefix}-*``, found by name (so also those a crashed run left)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(check_prefix(prefix) + "-"))


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def enter_netns(name: str) -> Iterator[None]:
    """Switch the calling thread into namespace ``name``; sockets made inside stay there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def switch_netns(name: str) -> None:
    """Move the calling thread into ``name`` for good (for single-purpose processes)."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


async def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    out = await run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in out.split()]


# --- processes --------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # comm may contain spaces and ')'
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int) -> bool:
    return _start_time(pid) is not None


def write_pidfile(path: Path, pid: int) -> None:
    path.write_text(f"{pid} {_start_time(pid) or '?'}\n")


def read_pidfile(path: Path) -> int | None:
    """The pid recorded in ``path`` if that very process is still running."""
    try:
        pid_s, _, start = path.read_text().strip().partition(" ")
        pid = int(pid_s)
    except (FileNotFoundError, ValueError):
        return None
    now = _start_time(pid)
    if now is None or (start not in ("", "?") and start != now):
        return None  # gone, or the pid was recycled
    return pid


async def stop_pids(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left (and wait for it)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        left = [p for p in pids if alive(p)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            left = [p for p in left if alive(p)]
        if not left:
            return
    raise LabError(f"processes {left} survived SIGKILL")


async def stop_pidfile(path: Path, timeout: float = 5.0) -> None:
    pid = read_pidfile(path)
    if pid is not None:
        await stop_pids([pid], timeout)
    path.unlink(missing_ok=True)


async def spawn(
    argv: list[str], *, state_dir: Path, name: str, netns: str | None = None
) -> asyncio.subprocess.Process:
    """Start a detached lab process (own session) logging to ``{state_dir}/{name}.log``.

    Its pid (with start time) goes to ``{name}.pid``; ``stop_pidfile`` and ``cleanup_prefix``
    use it, also from another process after a crash.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]  # ip execs, so the pid stays the same
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    with open(state_dir / f"{name}.log", "ab") as log:  # noqa: ASYNC230 - local file
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C on the lab CLI must not kill the data plane
            env=env,
        )
    write_pidfile(state_dir / f"{name}.pid", proc.pid)
    return proc


async def wait_ready(
    proc: asyncio.subprocess.Process, ready_file: Path, timeout: float, log_file: Path
) -> None:
    """Wait until ``proc`` creates ``ready_file``; raise LabError with the log tail if not."""
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            why = "timed out" if proc.returncode is None else f"exit {proc.returncode}"
            tail = log_file.read_text(errors="replace")[-1500:].strip() if log_file.exists() else ""
            raise LabError(f"pid {proc.pid} not ready ({why}): {tail}")
        await asyncio.sleep(0.02)


def mark_ready(path: str | None) -> None:
    """Called by a lab process once it is serving (atomic: write then rename)."""
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
