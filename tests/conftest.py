"""Shared fixtures: a real nats-server with JetStream per test, a connected client, an in-process
controller, and the rule that ``netns`` tests are skipped (with a reason) unless run as root."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from controller.compute import ClusterConfig
from controller.service import Controller
from controller.store import Store


def nats_server_binary() -> str:
    found = shutil.which("nats-server")
    return found or str(Path(sys.executable).parent / "nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server process on 127.0.0.1; ``restart()`` keeps its port and store dir."""

    def __init__(self, store_dir: Path, port: int | None = None, max_payload: int | None = None):
        self.store_dir, self.port = store_dir, port or free_port()
        self.max_payload = max_payload
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = store_dir.parent / f"nats-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-js", "-sd", str(self.store_dir)]
        if self.max_payload is not None:  # only settable in a config file
            conf = self.store_dir.parent / f"nats-{self.port}.conf"
            conf.write_text(f"max_payload: {self.max_payload}\n")
            cmd += ["-c", str(conf)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:  # ready = it sends its INFO line on a fresh connection
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server on port {self.port} not ready in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()  # SIGTERM: a clean shutdown that flushes the file store
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def nats_server(tmp_path):
    store = tmp_path / "jetstream"
    store.mkdir()
    server = NatsServer(store)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def nc(nats_server):
    client = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=20)
    try:
        yield client
    finally:
        await client.close()


async def start_controller(client, heartbeat: float = 0.2, **config) -> Controller:
    store = await Store.open(client.jetstream())
    ctl = Controller(client, store, ClusterConfig(heartbeat_interval=heartbeat, **config))
    await ctl.start()
    return ctl


@pytest_asyncio.fixture
async def controller(nc):
    ctl = await start_controller(nc)
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
