"""compose.yaml for real: the image built with podman from Debian's packages onto a base image
made here (no registry), the project started with podman-compose, and an agent container
programming a bridge network in its host's namespace, kept across a restart of every container;
the controller's /readyz and /metrics answer on its published port and podman runs every
container's healthcheck (/healthz) in the image.

The agent's "host" is a network namespace this test makes: the only change to compose.yaml is the
agent's ``network_mode`` (``ns:/run/netns/NAME`` instead of ``host``, an override file). As on a
host, the agent reaches NATS at 127.0.0.1 on the published port: lab.relay listens on that port
inside the namespace and forwards to the host's loopback, where podman publishes it. otherixctl
runs from the venv with the admin seed that the compose ``bus`` service made. Nothing but loopback
and this namespace carries traffic; the image build alone uses the network (Debian, PyPI).
"""

import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from lab.netns import free_port
from tests.containers import podman
from tests.containers.podman import BIN, ROOT, Compose, run
from tests.containers.report import add

pytestmark = [pytest.mark.netns, pytest.mark.containers, pytest.mark.timeout(900)]

UNDERLAY_IP = "198.18.0.11"  # RFC 2544 benchmarking range, as in the lab; never routed
NODE = "node1"
# netavark turns the host's IPv4 forwarding on for the compose network, and a new namespace
# copies the host's setting on this kernel: later tests' nodes would start forwarding
HOST_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict[str, float | None]:
    for tool in ("podman", "debootstrap"):
        assert shutil.which(tool), f"{tool} missing: ./dev setup installs it"
    base = podman.ensure_base_image(tmp_path_factory.mktemp("base"))
    return {"base": base, "build": podman.build_image()}


@pytest.fixture
def host_netns():
    """The agent's host: a namespace with loopback and an underlay address on a veth pair."""
    name = "otc" + secrets.token_hex(4)
    run("ip", "netns", "add", name)
    try:
        ip = ("ip", "-n", name)
        run(*ip, "link", "set", "lo", "up")
        run(*ip, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
        run(*ip, "addr", "add", f"{UNDERLAY_IP}/24", "dev", "eth0")
        run(*ip, "link", "set", "eth0peer", "up")
        run(*ip, "link", "set", "eth0", "up")
        yield name
    finally:
        run("ip", "netns", "delete", name, check=False)


@pytest.fixture
def stack(image, host_netns, tmp_path):
    port, metrics_port = free_port(), free_port()
    compose = Compose(
        host_netns,  # the project's name too: unique, and its containers name their host
        tmp_path,
        overrides=f"services:\n  agent:\n    network_mode: ns:/run/netns/{host_netns}\n",
        variables={
            "OTHERIX_NATS_PORT": str(port),
            "OTHERIX_UNDERLAY_IP": UNDERLAY_IP,
            "OTHERIX_NODE": NODE,
            "OTHERIX_CONTROLLER_METRICS_PORT": str(metrics_port),
        },
    )
    forwarding = HOST_FORWARDING.read_text()
    ready = tmp_path / "relay.ready"
    relay = subprocess.Popen(
        [sys.executable, "-m", "lab.relay", "--target", f"127.0.0.1:{port}",
         "--listen-port", str(port), "--ready-file", str(ready), host_netns],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert relay.poll() is None and time.monotonic() < deadline, "relay did not start"
            time.sleep(0.05)
        compose("--profile", "init", "run", "--rm", "-T", "bus")  # ./bus, as an operator would
        yield Stack(compose, {
            "PATH": str(BIN),
            "OTHERIX_NATS_URL": f"nats://127.0.0.1:{port}",
            "OTHERIX_NATS_CREDS": str(tmp_path / "bus" / "admin.nk"),
            "OTHERIX_NATS_CA": str(tmp_path / "bus" / "ca.pem"),
        }, f"http://127.0.0.1:{metrics_port}")  # fmt: skip
    finally:
        compose.remove_everything()
        relay.terminate()
        relay.wait(10)
        HOST_FORWARDING.write_text(forwarding)


class Stack(NamedTuple):
    compose: Compose
    ctl_env: dict[str, str]  # otherixctl as admin, on the published port
    controller_http: str  # the controller's /metrics, /healthz, /readyz on its published port


def ctl(stack: Stack, *args: str) -> dict | list:
    return json.loads(run(BIN / "otherixctl", *args, "--json", env=stack.ctl_env, timeout=30))


def wait_converged(
    stack: Stack, networks: int, nics: int, timeout: float = 90.0
) -> tuple[float, dict]:
    """Poll ``otherixctl status`` until the node converged, then check how much intent the
    controller holds (it loads all of it before it answers); the seconds it took, the status."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            last = ctl(stack, "status")
        except AssertionError as e:  # the controller or NATS is still starting
            last = str(e)
        else:
            if last["converged"] and len(last["nodes"]) == 1:
                assert (last["networks"], last["nics"]) == (networks, nics), last
                return time.monotonic() - started, last
        time.sleep(0.5)
    raise AssertionError(f"not converged within {timeout}s: {last}\n{stack.compose.logs()}")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def check_probes(stack: Stack) -> None:
    """The controller's readiness and metrics through its published port, and every container's
    compose healthcheck run by podman in the image (python's urllib on /healthz)."""
    assert get(f"{stack.controller_http}/readyz")[0] == 200
    code, metrics = get(f"{stack.controller_http}/metrics")
    assert code == 200 and "otherix_controller_leader 1.0" in metrics, metrics[-2000:]
    assert 'otherix_controller_nodes{state="converged"} 1.0' in metrics, metrics[-2000:]
    for service in ("controller", "agent"):
        run("podman", "healthcheck", "run", stack.compose.container(service))


def devices(netns: str) -> dict[str, dict]:
    return {d["ifname"]: d for d in json.loads(run("ip", "-n", netns, "-j", "link", "show"))}


def test_compose_runs_an_agent_that_programs_its_host_and_keeps_it_across_restarts(
    image, stack, host_netns
):
    started = time.monotonic()
    compose = stack.compose
    compose("up", "-d")
    assert set(compose.containers()) == {"nats", "controller", "agent"}
    first_converge, _ = wait_converged(stack, networks=0, nics=0)

    network = ctl(
        stack, "network", "create", "--type", "bridge", "--subnet", "10.77.0.0/24", "net1"
    )
    nic = ctl(stack, "nic", "attach", "--network", "net1", "--node", NODE, "--vm", "vm1")
    _, status = wait_converged(stack, networks=1, nics=1)
    check_probes(stack)
    bridge, tap = network["bridge"], nic["tap"]
    before = devices(host_netns)
    assert before[tap].get("master") == bridge, before
    assert "otwg0" in before  # the mesh device, from wireguard-go inside the agent container
    for name in (bridge, tap):  # the agent programmed its own host, not the machine's
        assert run("ip", "link", "show", name, check=False) == ""
    node_key = status["nodes"][0]["health"]["wg_public_key"]  # what the agent itself uses
    assert node_key == status["nodes"][0]["node"]["wg_public_key"]

    # restart every container: new containers, only the volumes and the namespace stay
    old = compose.containers()
    restart_started = time.monotonic()
    compose("down", "-t", "10")
    assert compose.containers() == {}
    compose("up", "-d")
    new = compose.containers()
    assert set(new) == set(old) and not set(new.values()) & set(old.values())
    reconverge, status = wait_converged(stack, networks=1, nics=1)
    restart = time.monotonic() - restart_started

    assert [n["network"]["name"] for n in ctl(stack, "network", "list")] == ["net1"]
    nics = ctl(stack, "nic", "list")
    assert [(n["nic"]["id"], n["nic"]["mac"], n["nic"]["ip"]) for n in nics] == [
        (nic["nic"]["id"], nic["nic"]["mac"], nic["nic"]["ip"])
    ]
    after = devices(host_netns)
    for name in (bridge, tap):  # kept, not made again: the same devices
        assert after[name]["ifindex"] == before[name]["ifindex"], name
    assert after[tap].get("master") == bridge and "otwg0" in after
    # the agent kept its WireGuard key (state volume), so it is the node the controller knows
    assert status["nodes"][0]["health"]["wg_public_key"] == node_key

    base = "cached" if image["base"] is None else f"made in {image['base']:.1f}s"
    add(
        f"containers: base image {base}, "
        f"image build {image['build']:.1f}s, first convergence {first_converge:.1f}s after up, "
        f"down+up of every container reconverged in {reconverge:.1f}s ({restart:.1f}s with down), "
        f"scenario {time.monotonic() - started:.1f}s"
    )
