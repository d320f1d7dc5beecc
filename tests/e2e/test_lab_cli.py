"""The otherix-lab CLI as an operator uses it: up, vm add/rm, and down also after a crash."""

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.netns import netns_list
from lab.topology import cleanup_prefix, default_state_dir

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def lab_cli(prefix: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lab.main", "--prefix", prefix, *argv],
        capture_output=True, text=True, timeout=90, check=check,
    )  # fmt: skip


def lab_processes(prefix: str) -> list[str]:
    """Command lines of live processes that belong to the lab (by name or namespace)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{prefix}-" in cmd or str(default_state_dir(prefix)) in cmd:
            found.append(cmd)
    return found


def test_up_vm_and_down_after_a_crash():
    prefix = "otcli" + secrets.token_hex(2)
    try:
        up = lab_cli(prefix, "up", "--nodes", "2", "--no-mesh", "--heartbeat", "0.5")
        assert "2 node(s) converged" in up.stdout
        # what `up` tells the operator to export: the URL, the admin's credentials and the CA
        exports = dict(w.split("=", 1) for w in up.stdout.split() if w.startswith("OTHERIX_"))
        assert set(exports) == {"OTHERIX_NATS_URL", "OTHERIX_NATS_CREDS", "OTHERIX_NATS_CA"}
        net = subprocess.run([sys.executable, "-m", "client.cli", "network", "create", "lan",
                              "--type", "bridge", "--subnet", "10.70.0.0/24"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, **exports})  # fmt: skip
        assert net.returncode == 0, net.stderr
        vm = lab_cli(prefix, "vm", "add", "web", "--network", "lan", "--node", "n1")
        assert "10.70.0.2/24" in vm.stdout and f"{prefix}-vm-web" in netns_list(prefix)
        bad = lab_cli(prefix, "vm", "add", "db", "--network", "nope", "--node", "n1", check=False)
        assert bad.returncode != 0 and "network 'nope' does not exist" in bad.stderr
        assert lab_processes(prefix)
        # a crash that loses the lab's own records: down must still find everything by name
        shutil.rmtree(default_state_dir(prefix))
        down = lab_cli(prefix, "down")
        assert "down" in down.stdout
        assert netns_list(prefix) == []
        assert lab_processes(prefix) == []
    finally:
        asyncio.run(cleanup_prefix(prefix))


def test_bad_flags_are_refused():
    bad = lab_cli("otlab", "up", "--nodes", "0", check=False)
    assert bad.returncode != 0 and "--nodes 0" in bad.stderr
    bad = lab_cli("Bad-Prefix", "down", check=False)
    assert bad.returncode != 0 and "prefix" in bad.stderr.lower()


def test_up_with_chaos_and_the_chaos_commands():
    prefix = "otcli" + secrets.token_hex(2)
    try:
        up = lab_cli(prefix, "up", "--nodes", "1", "--no-mesh", "--heartbeat", "0.5", "--chaos",
                     "--seed", "3")  # fmt: skip
        assert "1 node(s) converged" in up.stdout and "chaos proxy" in up.stdout
        rule = json.loads(
            lab_cli(prefix, "chaos", "drop", "otherix.v1.health.n1", "-p", "1").stdout
        )
        assert rule["rule"] == 0 and rule["action"] == "drop"

        def stats() -> dict:
            return json.loads(lab_cli(prefix, "chaos", "stats").stdout)

        deadline = time.monotonic() + 10
        while stats()["rules"][0]["dropped"] == 0:  # the agent's health (every second) dropped
            assert time.monotonic() < deadline, stats()
            time.sleep(0.3)
        assert stats()["seed"] == 3 and {"controller", "n1"} <= set(stats()["connections"])
        lab_cli(prefix, "chaos", "partition", "n1")
        assert stats()["partitioned"] == ["n1"]
        lab_cli(prefix, "chaos", "heal")
        lab_cli(prefix, "chaos", "clear")
        after = stats()
        assert after["rules"] == [] and after["partitioned"] == []
        bad = lab_cli(prefix, "chaos", "dup", "x", "-p", "2", check=False)
        assert bad.returncode != 0 and "chaos dup" in bad.stderr
        lab_cli(prefix, "down")
        assert lab_processes(prefix) == [] and netns_list(prefix) == []
        gone = lab_cli(prefix, "chaos", "stats", check=False)
        assert gone.returncode != 0 and "no lab" in gone.stderr
    finally:
        asyncio.run(cleanup_prefix(prefix))
