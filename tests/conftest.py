"""Shared fixtures: a real nats-server with JetStream per test, secured as in production (TLS with
a CA of its own, one nkey identity per process, the permission matrix of ``client.bus``), clients
connected as one identity, an in-process controller on the controller's identity, and the rule
that ``netns`` tests are skipped (with a reason) unless run as root. A test that needs the open
bus says so by using ``open_nats_server``.
"""

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from client.api import ApiClient
from client.bus import files as bus_files
from controller.compute import ClusterConfig
from controller.service import Controller
from controller.store import BUCKET, LEASE_KEY, Store
from lab.netns import free_port
from schemas.errors import Timeout, Unavailable

# Node identities the bus of every test has (tests act as these agents); roles always exist.
TEST_NODES = ("n1", "n2", "n3", "n4", "late", "watched", "small", "big", "hv1", "hv2")


def nats_server_binary() -> str:
    found = shutil.which("nats-server")
    return found or str(Path(sys.executable).parent / "nats-server")


def wait_listening(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    """Until nats-server accepts connections on ``port`` (TLS comes first: no INFO in clear)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nats-server on port {port} not ready in {timeout}s")
        time.sleep(0.02)


def stop_server(proc: subprocess.Popen | None) -> None:
    """SIGTERM (a clean shutdown that flushes the file store), SIGKILL if it hangs."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class NatsServer:
    """One nats-server process on 127.0.0.1; ``restart()`` keeps its port, store and bus.

    Secured unless ``secure=False``: a bus directory beside the store (``otherix-bus init``) whose
    configuration is included from a small wrapper (nats-server resolves ``include`` relative to
    the including file), with ``-sd`` for the store. ``connect(identity)`` opens a client as
    ``controller``, ``admin``, ``viewer`` or a node; ``close_clients()`` closes them all.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        max_payload: int | None = None,
        secure: bool = True,
        nodes: tuple[str, ...] = TEST_NODES,
    ):
        self.store_dir, self.port = store_dir, port or free_port()
        self.max_payload, self.secure = max_payload, secure
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = store_dir.parent / f"nats-server-{self.port}.log"
        self.bus_dir = store_dir.parent / f"bus-{self.port}"
        self.proc: subprocess.Popen | None = None
        self.clients: list[Client] = []
        if secure and not self.bus_dir.exists():
            bus_files.init(self.bus_dir, nodes=nodes, store_dir="")

    def start(self, timeout: float = 10.0) -> None:
        cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-js", "-sd", str(self.store_dir)]
        lines = [f'include "{self.bus_dir.name}/{bus_files.SERVER_CONF}"'] if self.secure else []
        if self.max_payload is not None:  # only settable in a config file
            lines.append(f"max_payload: {self.max_payload}")
        if lines:
            conf = self.store_dir.parent / f"nats-{self.port}.conf"
            conf.write_text("\n".join(lines) + "\n")
            cmd += ["-c", str(conf)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.proc, self.port, self.log, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_server(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # --- identities -----------------------------------------------------------------------------

    def kwargs(self, identity: str) -> dict:
        """``nats.connect`` keywords of ``identity`` ({} on an open bus)."""
        return bus_files.identity_kwargs(self.bus_dir, identity) if self.secure else {}

    def env(self, identity: str = "admin") -> dict[str, str]:
        """The environment a command needs to reach this server as ``identity``."""
        env = {"OTHERIX_NATS_URL": self.url}
        if self.secure:
            env |= bus_files.identity_env(self.bus_dir, identity)
        return env

    async def connect(self, identity: str = "admin", **kw) -> Client:
        options = {"connect_timeout": 5, "max_reconnect_attempts": 20} | kw
        client = await nats.connect(self.url, **self.kwargs(identity), **options)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        for client in self.clients:
            if not client.is_closed:
                await client.close()
        self.clients.clear()


async def _serving(server: NatsServer):
    try:
        server.start()
        yield server
    finally:
        await server.close_clients()
        server.stop()


@pytest_asyncio.fixture
async def nats_server(tmp_path):
    (tmp_path / "jetstream").mkdir()
    async for server in _serving(NatsServer(tmp_path / "jetstream")):
        yield server


@pytest_asyncio.fixture
async def open_nats_server(tmp_path):
    """No TLS, no identities: only for a test that says why it needs the open bus."""
    (tmp_path / "jetstream").mkdir()
    async for server in _serving(NatsServer(tmp_path / "jetstream", secure=False)):
        yield server


@pytest_asyncio.fixture
async def nc(nats_server):
    """An operator's connection: the ``admin`` identity."""
    return await nats_server.connect("admin")


def bookkeeping(key: str) -> bool:
    """A bucket key the controller writes on its own schedule, whatever the requests: the lease
    (renewed twice a heartbeat) and ``generation.*`` (the versions' mark and the nodes' versions,
    saved by the publisher after it published, at most every second). A check that a request
    wrote nothing must ignore these, or a save due from an earlier change lands in its window."""
    return key == LEASE_KEY or key.startswith("generation.")


async def last_intent_write(nc: Client) -> int:
    """The stream sequence of the intent bucket's last write to a key that is not
    ``bookkeeping``: it moves on any write of intent."""
    js = nc.jetstream()
    prefix = f"$KV.{BUCKET}."
    info = await js.stream_info(f"KV_{BUCKET}", subjects_filter=f"{prefix}>")
    subjects = [s for s in info.state.subjects or {} if not bookkeeping(s[len(prefix) :])]
    return max([(await js.get_last_msg(f"KV_{BUCKET}", s)).seq for s in subjects], default=0)


async def start_controller(
    server: NatsServer, heartbeat: float = 0.2, instance: str = "otherix-controller", **config
) -> Controller:
    """An in-process controller on its own connection, as the ``controller`` identity."""
    client = await server.connect("controller")
    store = await Store.open(client.jetstream())
    config = ClusterConfig(heartbeat_interval=heartbeat, **config)
    ctl = Controller(client, store, config, instance=instance)
    await ctl.start()
    # live once it answers: its subscriptions may not be in place yet (DESIGN.md: flush() is
    # no proof), and a test's first call then met "no controller is answering" in CI
    api = ApiClient(await server.connect("admin"), timeout=1.0)
    async with asyncio.timeout(10):
        while True:
            try:
                await api.status()
                return ctl
            except (Unavailable, Timeout):
                await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def controller(nats_server):
    ctl = await start_controller(nats_server)
    try:
        yield ctl
    finally:
        await ctl.stop()


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="netns test: needs root for network namespaces and netlink")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Ten seconds before pytest-timeout ends a hung test, print every asyncio task's stack:
    its own dump shows only threads, where a hung coroutine is just a loop waiting in select."""
    marker = item.get_closest_marker("timeout")
    timeout = marker.args[0] if marker and marker.args else item.config.getini("timeout")
    timer = threading.Timer(max(float(timeout) - 10, 1.0), _print_tasks, (item.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


def _print_tasks(test: str) -> None:
    # from another thread while the loop runs: good enough for a post-mortem, never for logic
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    out = [f"+++ asyncio tasks of {test}, 10 s before its timeout +++"]
    for loop in (lp for lp in loops if lp.is_running()):
        for task in list(asyncio.all_tasks(loop)):
            where, coro = [], task.get_coro()
            while coro is not None and len(where) < 20:  # down the chain of awaits
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                if frame is not None:
                    code = frame.f_code
                    where.append(f"{_short(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
            out.append(f"{task.get_name()}:\n    " + "\n    ".join(where))
    print("\n".join(out), file=sys.stderr, flush=True)


def _short(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def pytest_terminal_summary(terminalreporter):
    from tests.chaos import report  # the chaos scenarios' figures, one line each

    if report.LINES:
        terminalreporter.section("chaos scenarios")
        for line in report.LINES:
            terminalreporter.write_line(line)
