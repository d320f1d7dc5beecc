"""``otherix-lab up --controllers N``: a lab with two controller processes, the leader SIGKILLed
through the lab's own helper, the other one leading within three heartbeats and carrying the
next change to the data plane; and the flag refusing a count the lab does not run."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.api import ApiError
from lab.cluster import Lab
from lab.main import build_parser
from lab.netns import LabError
from schemas.errors import Timeout, Unavailable
from tests.e2e.helpers import ensure_network, lab_fixture

HEARTBEAT = 1.0  # the lease expires after two; the bound below is three
lab = lab_fixture(nodes=1, mesh=False, heartbeat=HEARTBEAT, controllers=2)


async def tap_on(lab: Lab, node: str, tap: str) -> bool:
    return f" {tap}:" in await lab.exec_node(node, "ip", "-o", "link", "show")


async def leader_named(lab: Lab, wanted: str, timeout: float) -> None:
    """Until ``status`` names ``wanted`` as leader (polled every 50 ms)."""
    api = await lab.connect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await api.status()).leader == wanted:
                return
        except ApiError:
            pass  # no controller answered this once: the survivor is taking over
        await asyncio.sleep(0.05)
    raise AssertionError(f"{wanted} did not lead within {timeout}s")


async def led_at(log_file: Path, offset: int, timeout: float = 10.0) -> float:
    """The wall time of the first "leading" line after ``offset`` (logging's asctime, local
    time with milliseconds: "2026-11-28 14:50:01,123 INFO controller: controller …: leading").
    Waited for: status names the new leader once it holds the lease, before it logs this."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_file, "rb") as f:  # noqa: ASYNC230 - a local file, a few KB
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                if ": leading (" in line:
                    stamp, ms = " ".join(line.split()[:2]).split(",")
                    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        await asyncio.sleep(0.05)
    raise AssertionError(f"no 'leading' line in {log_file} within {timeout}s")


async def until_written(call, timeout: float = 10.0):
    """A write retried while the new leader does not serve writes yet (status names it once it
    holds the lease; it answers writes once it has caught up and serves their endpoints)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await call()
            except (Unavailable, Timeout):
                await asyncio.sleep(0.05)


@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.asyncio(loop_scope="module")
async def test_the_follower_leads_after_the_leader_is_killed(lab: Lab):
    assert lab.controller_names == ["controller", "controller-2"]
    assert all(lab.processes().values()), lab.processes()
    assert await lab.leader() == "controller"  # up waits for the first one to lead
    api = await lab.connect()
    await ensure_network(lab, "lan", "bridge", "10.84.0.0/24")
    first = await api.nic_attach("lan", "n1", "vm1")
    await lab.wait_converged()
    assert await tap_on(lab, "n1", first.tap)

    survivor_log = lab.state_dir / "controller-2.log"
    logged = survivor_log.stat().st_size
    killed_at, killed_wall = time.monotonic(), time.time()
    assert await lab.kill_controller() == "controller"  # None: the leader
    await leader_named(lab, lab.controller_instance("controller-2"), 10 * HEARTBEAT)
    # from the SIGKILL to the survivor's own "leading" line: this test's polling is not counted
    took = await led_at(survivor_log, logged) - killed_wall
    assert took < 3 * HEARTBEAT, f"takeover took {took:.2f}s"
    assert lab.processes()["controller"] is None and lab.processes()["controller-2"]

    second = await until_written(lambda: api.nic_attach("lan", "n1", "vm2"))  # the new leader
    writes_after = time.monotonic() - killed_at  # this one includes the polling
    await lab.wait_converged()
    assert await tap_on(lab, "n1", second.tap) and await tap_on(lab, "n1", first.tap)
    status = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "client.cli", "status"], capture_output=True,
        text=True, timeout=30, env={**os.environ, **lab.bus_env("admin")},
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"leading controller: {lab.prefix}-controller-2" in status.stdout, status.stdout
    lab_status = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "lab.main", "--prefix", lab.prefix, "status"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    lines = {line.split()[0]: line.split()[1:] for line in lab_status.stdout.splitlines()}
    assert lines["controller"] == ["down"], lab_status.stdout
    assert lines["controller-2"][0] == "pid" and lines["controller-2"][-1] == "leading"
    assert lab_status.returncode == 1  # one controller is down
    print(
        f"\nleading controller SIGKILLed: the other leads after {took:.2f}s, takes writes after"
        f" {writes_after:.2f}s (heartbeat {HEARTBEAT}s)"
    )


def test_a_controller_count_the_lab_does_not_run_is_refused(capsys):
    for bad in ("0", "4", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", "--controllers", bad])
        assert "argument --controllers: invalid" in capsys.readouterr().err
    assert build_parser().parse_args(["up", "--controllers", "3"]).controllers == 3
    assert build_parser().parse_args(["up"]).controllers == 1
    with pytest.raises(LabError, match="1 to 3 controllers"):
        Lab("otbad", controllers=4)
