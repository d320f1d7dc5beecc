"""The userspace backend end to end: real wireguard-go between two namespaces.

Each node is a network namespace ``otwg-<hex>-a``/``-b`` joined by a veth (198.18.99.1/.2). Its
applier runs in ``wg_driver.py`` inside the namespace and in a private mount namespace with a
tmpfs on /run/wireguard, because wireguard-go always puts its socket at
/var/run/wireguard/otwg0.sock and both nodes use the name otwg0.
"""

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.wireguard import keys as wgkeys

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("wg_driver.py")
UNDERLAY = {"a": "198.18.99.1", "b": "198.18.99.2"}
TUNNEL = {"a": "100.64.0.1", "b": "100.64.0.2"}


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


class Node:
    def __init__(self, name: str, ns: str, key: str, log: Path):
        self.name, self.ns, self.key, self.log = name, ns, key, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *prefix: str) -> None:
        """Start the driver; ``prefix`` enters the namespaces (default: new netns + mount ns)."""
        prefix = prefix or (
            "ip", "netns", "exec", self.ns, "unshare", "-m", "sh", "-c",
            'mount -t tmpfs none /run/wireguard && exec "$0" "$@"',
        )  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OTWG_TEST_KEY": self.key}
        err = await asyncio.to_thread(open, self.log, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, str(DRIVER),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=ROOT, env=env,
            )  # fmt: skip
        finally:
            err.close()

    async def call(self, op: str, **kw) -> dict:
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line, f"driver {self.name} died:\n{self.log.read_text()[-3000:]}"
        out = json.loads(line)
        assert "error" not in out, out["error"]
        return out

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self.proc.stdin.write(b'{"op": "exit"}\n')
            await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 5)

    async def apply(self, *peers: "Node", **kw) -> int:
        out = await self.call("apply", spec=spec(self, *peers), **kw)
        assert out["backend"] == "userspace"
        return out["writes"]

    async def peers(self) -> dict[str, dict]:
        return {p["public_key"]: p for p in (await self.call("peers"))["peers"]}

    async def ping(self, dst: str, attempts: int = 10) -> bool:
        for _ in range(attempts):
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.ns, "ping", "-c1", "-W1", dst,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            if await asyncio.wait_for(proc.wait(), 5) == 0:
                return True
        return False

    @property
    def public_key(self) -> str:
        return wgkeys.public_key(self.key)


def wg_peer(node: Node | tuple[str, str, str]) -> dict:
    if isinstance(node, Node):
        key, endpoint, tunnel, name = (
            node.public_key,
            UNDERLAY[node.name],
            TUNNEL[node.name],
            node.name,
        )
    else:
        key, endpoint, tunnel = node
        name = "ghost"
    return {
        "public_key": key,
        "endpoint": f"{endpoint}:51820",
        "allowed_ips": [f"{tunnel}/32"],
        "node": name,
    }


def spec(node: Node, *peers) -> dict:
    return {
        "name": "otwg0",
        "address": f"{TUNNEL[node.name]}/24",
        "listen_port": 51820,
        "mtu": 1440,
        "peers": [wg_peer(p) for p in peers],
    }


def remove_namespaces(names: list[str]) -> None:
    """Kill what still runs inside (wireguard-go outlives its driver by design), then delete."""

    def pids(ns: str) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10
        )
        return [int(p) for p in out.stdout.split()]

    for ns in names:
        for pid in pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for _ in range(50):  # let them go before their namespaces
        if not any(pids(ns) for ns in names):
            break
        time.sleep(0.05)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
async def mesh(tmp_path):
    tag = secrets.token_hex(3)
    nodes = {
        n: Node(n, f"otwg-{tag}-{n}", wgkeys.generate_private_key(), tmp_path / f"{n}.log")
        for n in "ab"
    }
    a, b = nodes["a"], nodes["b"]
    try:
        for node in nodes.values():
            run("ip", "netns", "add", node.ns)
            run("ip", "-n", node.ns, "link", "set", "lo", "up")
        run(*f"ip -n {a.ns} link add eth0 type veth peer name eth0 netns {b.ns}".split())
        for node in nodes.values():
            run("ip", "-n", node.ns, "addr", "add", f"{UNDERLAY[node.name]}/24", "dev", "eth0")
            run("ip", "-n", node.ns, "link", "set", "eth0", "up")
        Path("/run/wireguard").mkdir(parents=True, exist_ok=True)  # mount point for the tmpfs
        for node in nodes.values():
            await node.start()
        yield a, b
    finally:
        for node in nodes.values():
            with contextlib.suppress(Exception):
                await node.stop()
        await asyncio.to_thread(remove_namespaces, [n.ns for n in nodes.values()])


async def connect(a: Node, b: Node) -> None:
    assert await a.apply(b) > 0
    assert await b.apply(a) > 0
    assert await a.ping(TUNNEL["b"]), "no ping across the tunnel"


async def test_tunnel_noop_peer_add_and_remove(mesh):
    a, b = mesh
    await connect(a, b)
    assert await a.apply(b) == 0  # second apply: zero writes
    assert await b.apply(a) == 0
    before = (await a.peers())[b.public_key]
    assert before["latest_handshake"] > 0 and before["node"] == "b"
    assert before["endpoint"] == "198.18.99.2:51820"

    ghost = (wgkeys.public_key(wgkeys.generate_private_key()), "198.18.99.3", "100.64.0.3")
    assert await a.apply(b, ghost) == 1  # only the new peer is written
    after = await a.peers()
    assert set(after) == {b.public_key, ghost[0]}
    assert after[b.public_key]["latest_handshake"] == before["latest_handshake"]

    assert await a.apply(b) == 1  # the departed peer is removed
    assert set(await a.peers()) == {b.public_key}
    assert await a.ping(TUNNEL["b"])

    assert await a.apply() == 1
    assert await a.peers() == {}
    assert not await a.ping(TUNNEL["b"], attempts=1)

    await a.call("remove")  # explicit teardown: daemon and device gone
    assert (await a.call("pid"))["pid"] is None
    assert "otwg0" not in run("ip", "-n", a.ns, "-o", "link")
    assert await a.apply(b) > 0  # and a later snapshot brings it back
    assert await a.ping(TUNNEL["b"])


async def test_a_mesh_change_over_drift_is_repaired_by_the_same_apply(mesh):
    """The change path sets only the joining peer; when its verifying read shows more changed
    (a peer removed by hand since the last read), the same apply reconciles whole, so the ack
    of this HEAD never says ok over a device known to be wrong."""
    a, b = mesh
    await connect(a, b)
    ghost = (wgkeys.public_key(wgkeys.generate_private_key()), "198.18.99.3", "100.64.0.3")
    joined = (wgkeys.public_key(wgkeys.generate_private_key()), "198.18.99.4", "100.64.0.4")
    assert await a.apply(b, ghost) == 1
    assert await a.apply(b, ghost) == 0  # a no-op read: the device is known
    base, after = spec(a, b, ghost), spec(a, b, ghost, joined)
    out = await a.call("change", spec=after, base=base, gained=[wg_peer(joined)], lost=[])
    assert out == {"writes": 1, "errors": []}  # the joining peer alone
    assert set(await a.peers()) == {b.public_key, ghost[0], joined[0]}

    await a.call("forget", key=ghost[0])  # drift behind the agent's back
    leave = spec(a, b, joined)
    out = await a.call("change", spec=leave, base=after, gained=[], lost=[wg_peer(ghost)])
    assert out["errors"] == [] and set(await a.peers()) == {b.public_key, joined[0]}
    await a.call("forget", key=b.public_key)
    back = spec(a, b, joined, ghost)
    out = await a.call("change", spec=back, base=leave, gained=[wg_peer(ghost)], lost=[])
    assert out["errors"] == [] and out["writes"] == 2  # the ghost set, then b restored whole
    assert set(await a.peers()) == {b.public_key, joined[0], ghost[0]}
    assert await a.ping(TUNNEL["b"])


async def test_key_rotation_keeps_the_tunnel(mesh):
    a, b = mesh
    await connect(a, b)
    old = a.public_key
    a.key = wgkeys.generate_private_key()
    assert await a.apply(b, private_key=a.key) == 1  # just the key
    assert await b.apply(a) == 2  # old peer out, new peer in
    assert set(await b.peers()) == {a.public_key} != {old}
    assert await a.ping(TUNNEL["b"])
    assert await b.ping(TUNNEL["a"])


async def test_supervisor_restarts_a_killed_daemon(mesh):
    a, b = mesh
    await connect(a, b)
    pid = (await a.call("pid"))["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        new = (await a.call("pid"))["pid"]
        if new not in (None, pid) and (await a.peers()):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("wireguard-go was not restarted")
    assert await a.ping(TUNNEL["b"])
    assert await a.apply(b) == 0  # the supervisor restored the whole config


async def test_a_restarted_agent_adopts_the_running_daemon(mesh):
    a, b = mesh
    await connect(a, b)
    pid = (await a.call("pid"))["pid"]
    await a.stop()  # the agent exits; wireguard-go (and the data plane) stays
    assert await a.ping(TUNNEL["b"])
    # a new agent in the same namespaces as the daemon (its mount ns holds the socket)
    await a.start("nsenter", "-t", str(pid), "-n", "-m")
    assert await a.apply(b) == 0
    assert (await a.call("pid"))["pid"] == pid
