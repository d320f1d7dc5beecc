"""The lab's plumbing on a real kernel: underlay, outside host, relay, wire process, cleanup."""

import asyncio
import secrets
from pathlib import Path

import pytest

from lab.netns import alive, exec_in, netns_exists, netns_list, run
from lab.relay import start_relay
from lab.topology import OUTSIDE_IP, Topology, cleanup_prefix
from lab.vm import ping, vm_add, vm_rm
from tests.e2e.helpers import eventually

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]
TAP = "ot0123456789ab"


@pytest.fixture
async def lab(tmp_path):
    prefix = "otlt" + secrets.token_hex(2)
    topo = Topology(prefix, underlay_mtu=9000, state_dir=tmp_path / "state")
    try:
        await topo.create_fabric()
        await topo.add_node("n1", 1)
        await topo.add_node("n2", 2)
        await topo.add_outside()
        yield topo
    finally:
        await topo.destroy()
        assert netns_list(prefix) == []


async def test_underlay_and_outside(lab):
    n1, n2 = lab.nodes["n1"], lab.nodes["n2"]
    assert (n1.underlay_ip, n2.underlay_ip) == ("198.18.0.11", "198.18.0.12")
    assert await ping(n1.netns, n2.underlay_ip)
    assert await ping(n2.netns, OUTSIDE_IP)
    assert await ping(lab.outside, n1.underlay_ip)
    # jumbo underlay: a full 9000-byte DF packet crosses the fabric, a bigger one cannot
    assert await ping(n1.netns, n2.underlay_ip, size=9000 - 28, dont_fragment=True)
    assert not await ping(n1.netns, n2.underlay_ip, size=9001 - 28, dont_fragment=True, timeout=1)
    await lab.remove_node("n2")
    assert not netns_exists(f"{lab.prefix}-n2")
    assert "n2" not in await run("ip", "-n", lab.fabric, "-br", "link")


async def test_relay_reaches_root_loopback(lab, tmp_path):
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = tmp_path / "state"
    ns = [lab.nodes["n1"].netns, lab.nodes["n2"].netns]
    relay = await start_relay(ns, f"127.0.0.1:{port}", 14222, state_dir=state, name="relay")
    # 20 concurrent clients inside a node namespace, each echoing 200 KB through the relay
    client = (
        "import asyncio\n"
        "async def one(i):\n"
        "    r, w = await asyncio.open_connection('127.0.0.1', 14222)\n"
        "    data = bytes([i]) * 200_000\n"
        "    w.write(data); await w.drain(); w.write_eof()\n"
        "    got = await r.read(-1); w.close()\n"
        "    assert got == data, (i, len(got))\n"
        "async def main():\n"
        "    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 20)\n"
        "    print('ok')\n"
        "asyncio.run(main())\n"
    )
    try:
        for netns in ns:
            out = await exec_in(netns, "python3", "-c", client, timeout=30)
            assert out.strip() == "ok"
    finally:
        relay.terminate()
        rc = await asyncio.wait_for(relay.wait(), 5)
        server.close()
    assert rc == 0


async def _make_tap(node_ns: str) -> None:
    ipn = ("ip", "-n", node_ns)
    await run(*ipn, "tuntap", "add", "mode", "tap", "name", TAP)
    await run(*ipn, "link", "add", "otbtest", "type", "bridge")
    await run(*ipn, "addr", "add", "10.77.0.1/24", "dev", "otbtest")
    await run(*ipn, "link", "set", "otbtest", "up")
    await run(*ipn, "link", "set", TAP, "master", "otbtest", "up")


async def test_vm_pings_through_wire(lab, tmp_path):
    state = tmp_path / "state"
    node = lab.nodes["n1"]
    await _make_tap(node.netns)
    vm = await vm_add(lab.prefix, "a", node.netns, TAP, "02:00:00:00:00:0a", "10.77.0.2/24",
                      "10.77.0.1", 1500, state_dir=state)  # fmt: skip
    await vm.wait_attached(10)
    pid = vm.process.pid
    assert await ping(vm.netns, "10.77.0.1", count=3)
    assert await ping(vm.netns, "10.77.0.1", size=1472, dont_fragment=True)
    # TCP exercises checksum offload and GSO frames across the AF_PACKET <-> tap copy
    payload = 2_000_000
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", node.netns, "python3", "-c",
        "import socket,sys\ns=socket.create_server(('10.77.0.1',15000))\nprint('up',flush=True)\n"
        "c,_=s.accept()\nn=0\nwhile d:=c.recv(65536): n+=len(d)\nprint(n)",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert (await asyncio.wait_for(server.stdout.readline(), 5)).strip() == b"up"
        await exec_in(vm.netns, "python3", "-c",
                      "import socket\nc=socket.create_connection(('10.77.0.1',15000),timeout=10)\n"
                      f"c.sendall(b'x'*{payload})\nc.close()", timeout=20)  # fmt: skip
        got = await asyncio.wait_for(server.stdout.readline(), 10)
        assert int(got) == payload
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()
    await vm_rm(lab.prefix, "a", state)
    assert not netns_exists(vm.netns)
    assert not alive(pid)
    assert not (state / "vm-a.pid").exists()
    # the tap belongs to the agent: vm_rm leaves it alone
    assert TAP in await run("ip", "-n", node.netns, "-br", "link")


async def test_wire_waits_for_tap_and_exits_when_it_goes(lab, tmp_path):
    state = tmp_path / "state"
    node = lab.nodes["n2"]
    vm = await vm_add(lab.prefix, "late", node.netns, TAP, "02:00:00:00:00:0b", "10.77.0.3/24",
                      None, 1500, state_dir=state)  # fmt: skip
    log = state / "vm-late.log"

    async def waiting():
        return log.exists() and f"waiting for tap {TAP}" in log.read_text()

    await eventually(waiting, what="the wire process waiting for its tap")
    # waiting must not create the tap (TUNSETIFF on a missing name would)
    assert TAP not in await run("ip", "-n", node.netns, "-br", "link")
    assert vm.process.returncode is None
    await _make_tap(node.netns)
    await vm.wait_attached(10)
    assert await ping(vm.netns, "10.77.0.1", count=2)
    await run("ip", "-n", node.netns, "link", "del", TAP)  # NIC detached
    assert await asyncio.wait_for(vm.process.wait(), 5) == 0
    await vm_rm(lab.prefix, "late", state)
    assert not netns_exists(vm.netns)


async def test_cleanup_after_crash(tmp_path):
    """A run that never called destroy: cleanup_prefix finds namespaces and processes."""
    prefix = "otlt" + secrets.token_hex(2)
    state = tmp_path / "state"
    topo = Topology(prefix, state_dir=state)
    try:
        await topo.create_fabric()
        node = await topo.add_node("n1", 1)
        vm = await vm_add(prefix, "x", node.netns, TAP, "02:00:00:00:00:0c", "10.77.0.4/24",
                          None, 1500, state_dir=state)  # fmt: skip
        sleeper = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", node.netns, "sleep", "60", start_new_session=True
        )
        relay = await start_relay([node.netns], "127.0.0.1:1", 14222, state_dir=state, name="r")
        (state / "r.pid").unlink()  # found by its command line all the same
        assert len(netns_list(prefix)) == 3
    finally:
        await cleanup_prefix(prefix, state)  # a fresh call, as `otherix-lab down` would do
    assert netns_list(prefix) == []
    assert not any(alive(p.pid) for p in (vm.process, sleeper, relay))
    assert not list(Path(state).glob("*.pid"))
    await sleeper.wait()
