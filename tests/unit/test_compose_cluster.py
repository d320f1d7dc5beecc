"""deploy/compose.cluster.yaml, the production profile of the bus: three nats-servers from the
configurations its ``bus`` service renders (which the real nats-server accepts), each with its own
store volume, two controllers (R3, distinct instances) and the agent given every server's URL,
each controller and the agent with metrics and a healthcheck on a host port of its own."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from client.bus import cli
from client.bus import files as bus_files
from tests.conftest import nats_server_binary
from tests.unit.test_compose import host_ports, metrics_endpoints

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("nats1", "nats2", "nats3")
CONTROLLERS = ("controller-1", "controller-2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.cluster.yaml").read_text())


def argv(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


@pytest.fixture(scope="module")
def bus(compose, tmp_path_factory) -> Path:
    """The bus service's own ``otherix-bus init``, into a temporary directory."""
    tmp = tmp_path_factory.mktemp("cluster")
    args = argv(compose["services"]["bus"])[1:]
    args = [a.replace("${OTHERIX_NODE:-node1}", "node1") for a in args]
    args[args.index("/srv/otherix/bus")] = str(tmp / "bus")
    args = [
        f"--server-dir={tmp / 'bus'}" if a.startswith("--server-dir=") else a
        for a in args
        if not a.startswith("--store-dir=")
    ] + [f"--store-dir={tmp / 'data'}"]
    cli.run(args)
    return tmp / "bus"


def test_each_server_runs_its_own_rendered_config_on_its_own_volume(compose, bus):
    services = compose["services"]
    stores = set()
    for name in SERVERS:
        cmd = argv(services[name])
        assert cmd[0] == "nats-server"
        conf = Path(cmd[cmd.index("--config") + 1])
        assert conf == Path("/etc/otherix-bus") / bus_files.server_conf_file(bus, name).name
        mounts = dict(reversed(v.split(":")[:2]) for v in services[name]["volumes"])
        assert mounts["/etc/otherix-bus"] == "./bus" and mounts["/data"] in compose["volumes"]
        stores.add(mounts["/data"])
        check = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(bus_files.server_conf_file(bus, name))],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        text = bus_files.server_conf_file(bus, name).read_text()
        others = [s for s in SERVERS if s != name]
        assert all(f"@{o}:6222" in text for o in others) and f"@{name}:" not in text
    assert len(stores) == 3, "every server its own store"


def test_clients_are_given_every_server_and_the_controller_makes_r3(compose, monkeypatch):
    from agent.main import parse_args as agent_args
    from controller.main import parse_args as controller_args

    for name in CONTROLLERS:
        for key, value in compose["services"][name]["environment"].items():
            monkeypatch.setenv(key, value)
        args = controller_args([])
        assert args.replicas == 3
        assert list(args.nats) == [f"nats://{s}:4222" for s in SERVERS]
    published = {
        p.split(":")[1]: s for s in SERVERS for p in compose["services"][s]["ports"]
    }  # host port → server
    env = compose["services"]["agent"]["environment"]
    monkeypatch.setenv("OTHERIX_NATS_URL", env["OTHERIX_NATS_URL"])
    monkeypatch.setenv("OTHERIX_NODE", "node1")
    ports = [u.rsplit(":", 1)[1] for u in agent_args([]).nats]
    assert sorted(published[p] for p in ports) == list(SERVERS)


def test_two_controllers_with_distinct_instances_on_the_controller_identity(compose, monkeypatch):
    from controller.main import parse_args

    services = compose["services"]
    controllers = [n for n, s in services.items() if argv(s)[0] == "otherix-controller"]
    assert sorted(controllers) == list(CONTROLLERS)
    instances = []
    for name in CONTROLLERS:
        for key, value in services[name]["environment"].items():
            monkeypatch.setenv(key, value)
        instances.append(parse_args([]).instance)
        # the bus's one controller seed: the lease, not the bus, tells them apart
        assert "./bus/controller.nk:/run/otherix/controller.nk:ro" in services[name]["volumes"]
    assert len(set(instances)) == 2 and "otherix-controller" not in instances, instances
    # the same configuration apart from the instance name and the published metrics port
    same = [{k: v for k, v in services[n].items() if k not in ("environment", "ports")}
            for n in CONTROLLERS]  # fmt: skip
    assert same[0] == same[1]
    envs = [dict(services[n]["environment"], OTHERIX_INSTANCE="") for n in CONTROLLERS]
    assert envs[0] == envs[1]


def test_metrics_and_healthchecks_on_distinct_host_ports(compose):
    endpoints = metrics_endpoints(compose)
    assert set(endpoints) == {*CONTROLLERS, "agent"}
    assert endpoints["agent"] == ("127.0.0.1", 9181)  # as in compose.yaml
    taken = host_ports(compose)
    assert len(set(taken)) == len(taken), f"two services on one host port: {taken}"
