"""The console scripts as an operator runs them: ``otherixctl`` against ``otherix-controller``
(a real subprocess) on a real nats-server, plus the flag checks of controller and agent.

What is tested here is the CLI's own behaviour: tables, ``--json``, exit codes 1/2/3, flags and
environment. The API's answers themselves are test_api.py's. ``otherixctl`` runs in-process
(``client.cli.main``, the console script's entry point) except where the installed script and
its environment are the point. One server and one controller serve the whole module (each test
uses its own names).
"""

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from client import cli
from client.api import ApiClient, ApiError
from schemas import naming
from schemas.bus import CA_ENV, CREDS_ENV
from schemas.codec import encode
from schemas.errors import Timeout
from schemas.messages import Ack, Health
from tests.conftest import NatsServer, start_controller

pytestmark = pytest.mark.timeout(60)


def script(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


async def _api(server: NatsServer, call):
    nc = await nats.connect(server.url, **server.kwargs("admin"), connect_timeout=5)
    try:
        return await call(ApiClient(nc))
    finally:
        await nc.close()


def api(server: NatsServer, call):
    """One API call from a sync test (node registration has no CLI: agents do it)."""
    return asyncio.run(_api(server, call))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """nats-server + ``otherix-controller`` subprocess (as the controller identity)."""
    tmp = tmp_path_factory.mktemp("ctl")
    (tmp / "js").mkdir()
    server = NatsServer(tmp / "js", nodes=("hv1", "silent", "never-acks", "late", "watched"))
    proc = None
    log = open(tmp / "controller.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        server.start()
        proc = subprocess.Popen(
            [script("otherix-controller"), "--heartbeat", "0.2"],
            env={**os.environ, **server.env("controller")},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:  # ready = it answers an API request
            try:
                api(server, lambda a: a.status())
                break
            except ApiError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "controller.log").read_text()) from None
                time.sleep(0.1)
        yield server
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, (tmp / "controller.log").read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        server.stop()


def otherixctl(*argv: str, rc: int = 0) -> subprocess.CompletedProcess:
    """``otherixctl ARGV`` in-process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as exited:
            cli.main(list(argv))
    done = subprocess.CompletedProcess(argv, exited.value.code or 0, out.getvalue(), err.getvalue())
    assert done.returncode == rc, (done.returncode, done.stdout, done.stderr)
    return done


def as_admin(server: NatsServer) -> list[str]:
    """The flags that make otherixctl the admin on ``server``'s bus."""
    env = server.env("admin")
    return ["--nats", server.url, "--nats-creds", env[CREDS_ENV], "--nats-ca", env[CA_ENV]]


def ctl(server: NatsServer, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    return otherixctl(*as_admin(server), *args, rc=rc)


def ctl_json(server: NatsServer, *args: str):
    return json.loads(ctl(server, *args, "--json").stdout)


# --- flag checks (no server needed) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["otherix-controller", "--heartbeat", "0"], "--heartbeat 0.0: must be between"),
        (["otherix-controller", "--underlay-mtu", "100"], "--underlay-mtu 100: must be between"),
        (["otherix-controller", "--mesh-prefix", "10.0.0.0/31"], "too small for a mesh"),
        (["otherix-agent", "--node", "Bad Name"], "--node 'Bad Name'"),
        (["otherix-agent", "--node", "n1", "--underlay-ip", "nope"], "not an IPv4 address"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message):
    done = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["network", "create", "x", "--subnet", "10.0.0.0/24"], "--type"),
        (["network", "create", "x", "--type", "mesh", "--subnet", "1/1"], "mesh"),
        (["nic", "attach", "--network", "a"], "--node"),
        (["status", "--wait", "soon"], "invalid float value"),
    ],
)
def test_bad_otherixctl_flags_exit_2_with_a_message(argv, message):
    done = otherixctl(*argv, rc=2)
    assert done.stdout == "" and message in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["otherix-controller"],
            {"OTHERIX_HEARTBEAT": "soon"},
            "--heartbeat: invalid float value: 'soon'",
        ),
        (
            ["otherix-controller"],
            {"OTHERIX_LOG_FORMAT": "xml"},
            "--log-format (env OTHERIX_LOG_FORMAT): invalid choice: 'xml'",
        ),
        (["otherix-agent"], {"OTHERIX_WG_PORT": "x"}, "--wg-port: invalid int value: 'x'"),
    ],
)
def test_bad_environment_is_refused_like_a_bad_flag(argv, env, message):
    done = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr


def test_unreachable_nats_is_one_clear_line():
    done = otherixctl("--nats", "nats://127.0.0.1:1", "network", "list", rc=1)
    assert done.stderr.strip().splitlines() == [
        "otherixctl: cannot reach NATS at nats://127.0.0.1:1: nats: no servers available for connection"
    ]


def test_unusable_credentials_are_one_clear_line(cluster, tmp_path):
    bad = tmp_path / "admin.nk"
    bad.write_text("not a seed\n")
    ca = cluster.env("admin")[CA_ENV]
    done = otherixctl("--nats", cluster.url, "--nats-creds", str(bad), "--nats-ca", ca, "network", "list", rc=2)  # fmt: skip
    assert done.stderr.startswith(f"otherixctl: credentials {bad}: not an nkey seed")
    missing = tmp_path / "nope.pem"
    done = otherixctl(*as_admin(cluster)[:4], "--nats-ca", str(missing), "network", "list", rc=2)
    assert done.stderr.startswith(f"otherixctl: CA certificate {missing}:")
    assert isinstance(ctl_json(cluster, "network", "list"), list)  # the right files: it works


def test_no_identity_is_refused_with_one_clear_line(cluster):
    ca = cluster.env("admin")[CA_ENV]
    done = otherixctl("--nats", cluster.url, "--nats-ca", ca, "network", "list", rc=1)
    assert done.stderr.strip().splitlines() == [
        f"otherixctl: cannot reach NATS at {cluster.url}: nats: 'Authorization Violation'"
    ]
    assert isinstance(ctl_json(cluster, "network", "list"), list)  # with the admin's identity


def test_installed_script_takes_the_server_from_the_environment(cluster):
    done = subprocess.run([script("otherixctl"), "network", "list", "--json"],
                          env={**os.environ, **cluster.env("admin")},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)


# --- commands against the controller ------------------------------------------------------------


def test_network_commands(cluster):
    out = ctl(cluster, "network", "create", "web", "--type", "bridge", "--subnet", "10.10.0.0/24")
    header, row = out.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "TYPE", "SUBNET", "GATEWAY"]
    assert row.split()[:5] == ["web", "bridge", "10.10.0.0/24", "10.10.0.1", "none"]

    created = ctl_json(
        cluster, "network", "create", "ov", "--type", "overlay", "--subnet", "10.11.0.0/24",
        "--vni", "7000",
    )  # fmt: skip
    assert created["network"]["vni"] == 7000 and created["bridge"] == "otb7000"
    assert created["mtu"] == 1390
    nat = ctl_json(
        cluster, "network", "create", "out", "--type", "bridge", "--subnet", "10.12.0.0/24",
        "--egress", "nat",
    )  # fmt: skip
    assert nat["network"]["egress"] == "nat"

    names = {i["network"]["name"] for i in ctl_json(cluster, "network", "list")}
    assert {"web", "ov", "out"} <= names
    assert "web" in ctl(cluster, "network", "list").stdout
    shown = ctl_json(cluster, "network", "show", "ov")
    assert shown["network"]["network"]["subnet"] == "10.11.0.0/24" and shown["nics"] == []
    assert "10.11.0.0/24" in ctl(cluster, "network", "show", "ov").stdout

    assert ctl(cluster, "network", "delete", "out").stdout.strip() == "deleted network out"
    assert ctl_json(cluster, "network", "delete", "ov")["network"]["name"] == "ov"
    names = {i["network"]["name"] for i in ctl_json(cluster, "network", "list")}
    assert "ov" not in names and "out" not in names


def test_nic_and_node_commands(cluster):
    api(cluster, lambda a: a.node_register(name="hv1", underlay_ip="192.0.2.10"))
    ctl(cluster, "network", "create", "lan", "--type", "bridge", "--subnet", "10.20.0.0/24")

    out = ctl(cluster, "nic", "attach", "--network", "lan", "--node", "hv1", "--vm", "vm1")
    header, row = out.stdout.splitlines()
    assert header.split() == ["ID", "TAP", "NETWORK", "NODE", "VM", "MAC", "IP", "STATE"]
    nic_id, tap, network, node, vm, mac, ip, state = row.split()
    assert tap == "ot" + nic_id[:12] and (network, node, vm) == ("lan", "hv1", "vm1")
    assert state == "pending"  # no agent runs hv1: nobody has reported the tap
    assert mac.startswith("02:") and ip == "10.20.0.2"

    chosen = ctl_json(
        cluster, "nic", "attach", "--network", "lan", "--node", "hv1", "--vm", "vm2",
        "--ip", "10.20.0.50", "--mac", "02:00:00:aa:bb:cc",
    )  # fmt: skip
    assert chosen["nic"]["ip"] == "10.20.0.50" and chosen["nic"]["mac"] == "02:00:00:aa:bb:cc"
    assert chosen["tap"] == "ot" + chosen["nic"]["id"][:12]

    listed = ctl_json(cluster, "nic", "list", "--network", "lan")
    assert [i["nic"]["vm"] for i in listed] == ["vm1", "vm2"]
    assert tap in ctl(cluster, "nic", "list", "--node", "hv1").stdout

    nodes = ctl_json(cluster, "node", "list")
    hv1 = next(n for n in nodes if n["node"]["name"] == "hv1")
    assert hv1["node"]["underlay_ip"] == "192.0.2.10" and hv1["desired_version"] >= 1
    assert "hv1" in ctl(cluster, "node", "list").stdout

    out = ctl(cluster, "nic", "detach", tap)
    assert out.stdout.strip() == f"detached NIC {nic_id} (tap {tap})"
    assert ctl_json(cluster, "nic", "detach", chosen["nic"]["id"])["nic"]["vm"] == "vm2"
    assert ctl_json(cluster, "nic", "list", "--network", "lan") == []


def test_status_table_and_json(cluster):
    api(cluster, lambda a: a.node_register(name="silent"))
    st = ctl_json(cluster, "status")
    silent = next(n for n in st["nodes"] if n["node"]["name"] == "silent")
    assert silent["desired_version"] >= 1 and silent["applied_version"] == 0
    assert st["converged"] is False and st["heartbeat_interval"] == 0.2
    assert "silent" in ctl(cluster, "status").stdout


async def status_requests(server: NatsServer, admin) -> asyncio.Queue:
    """Every ``status`` request on the bus (the controller answers; we only count them, on a
    connection of the controller's identity, the one allowed to read API requests)."""
    seen: asyncio.Queue = asyncio.Queue()

    async def on_request(msg):
        seen.put_nowait(msg)

    await (await server.connect("controller")).subscribe(
        naming.api_subject("status"), cb=on_request
    )
    async with asyncio.timeout(10):  # live once our own request shows up
        while seen.empty():
            await ApiClient(admin).status()
    while not seen.empty():
        seen.get_nowait()
    return seen


def status_wait(server: NatsServer, wait: str) -> "asyncio.Task[int]":
    args = cli.build_parser().parse_args([*as_admin(server), "status", "--wait", wait])
    return asyncio.create_task(cli.run(args))


async def test_status_wait_gives_up_with_exit_3(cluster, capsys):
    nc = await cluster.connect("admin")
    try:
        await ApiClient(nc).node_register(name="never-acks")
        requests = await status_requests(cluster, nc)
        assert await status_wait(cluster, "1") == cli.EXIT_TIMEOUT
        assert requests.qsize() >= 2  # it asked again before giving up (how long: bench heartbeat)
    finally:
        await cluster.close_clients()
    out, err = capsys.readouterr()
    assert "not converged after 1.0s" in err and "pending" in out


async def test_status_wait_returns_once_every_node_converged(cluster, capsys):
    nc = await cluster.connect("admin")
    try:
        client = ApiClient(nc)
        await client.node_register(name="late")
        requests = await status_requests(cluster, nc)
        waiting = status_wait(cluster, "30")
        await asyncio.wait_for(requests.get(), 10)  # it has seen the cluster unconverged
        for node in (await client.status()).nodes:  # now every node acks what it was given
            name, v = node.node.name, node.desired_version
            ack = Ack(node=name, version=v, applied_version=v, digest=node.desired_digest)
            health = Health(node=name, applied_version=v, ok=True, started_at=0, sent_at=0)
            agent = await cluster.connect(name)  # only a node may report for itself
            await agent.publish(naming.health_subject(name), encode(health))
            await agent.publish(naming.ack_subject(name), encode(ack))
        assert await asyncio.wait_for(waiting, 20) == 0
    finally:
        await cluster.close_clients()
    out, err = capsys.readouterr()
    assert err == "" and "late" in out


# Two rows: the error's formatting, in table and JSON mode (the messages are test_api.py's).
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["network", "show", "nope"], "error 404: network 'nope' does not exist"),
        (
            ["network", "create", "v", "--type", "vlan", "--subnet", "10.30.0.0/24"],
            "error 501: network type 'vlan' is deferred: not supported yet",
        ),
    ],
)
def test_api_errors_go_to_stderr(cluster, args, message):
    for extra in ([], ["--json"]):
        done = ctl(cluster, *args, *extra, rc=1)
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
        assert done.stderr.startswith(f"otherixctl: {message}"), done.stderr


async def test_watch_prints_a_crafted_ack(cluster, capsys):
    ack = Ack(node="watched", version=7, applied_version=7, digest="abc", changes=2)
    args = cli.build_parser().parse_args([*as_admin(cluster), "watch", "--count", "1", "--json"])
    watching = asyncio.create_task(cli.run(args))
    nc = await cluster.connect("watched")
    try:
        async with asyncio.timeout(15):
            while not watching.done():  # until the watcher saw one: its subscription goes live
                await nc.publish(naming.ack_subject("watched"), encode(ack))  # at some point
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert await watching == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert got["subject"] == "otherix.v1.ack.watched"
    assert got["ack"]["version"] == 7 and got["ack"]["digest"] == "abc" and got["ack"]["ok"]


# --- retries: repeating a write is safe, and a timed-out write says its outcome is unknown ------


def test_nic_attach_repeated_gives_the_same_nic(cluster):
    api(cluster, lambda a: a.node_register(name="hv1", underlay_ip="192.0.2.10"))
    ctl(cluster, "network", "create", "again", "--type", "bridge", "--subnet", "10.40.0.0/24")
    done = ctl(
        cluster, "network", "create", "again", "--type", "bridge", "--subnet", "10.40.0.0/24"
    )
    assert done.stderr == "otherixctl: network again existed already\n"
    attach = ("nic", "attach", "--network", "again", "--node", "hv1", "--vm", "twice")
    first = ctl_json(cluster, *attach)
    done = ctl(cluster, *attach, "--json")
    assert json.loads(done.stdout)["nic"] == first["nic"] and json.loads(done.stdout)["existed"]
    assert done.stderr == "otherixctl: vm twice had this NIC on again already\n"
    assert [i["nic"]["id"] for i in ctl_json(cluster, "nic", "list", "--network", "again")] == [
        first["nic"]["id"]
    ]
    done = ctl(cluster, "nic", "attach", "--network", "again", "--node", "hv1", "--vm", "twice",
               "--ip", "10.40.0.99", rc=1)  # fmt: skip
    assert done.stderr.startswith(
        f"otherixctl: error 409: vm 'twice' already has NIC {first['nic']['id']}"
    )
    ctl(cluster, "nic", "detach", first["tap"])
    done = ctl(cluster, "nic", "detach", first["tap"], rc=1)
    assert done.stderr == (
        f"otherixctl: error 404: NIC {first['nic']['id']} is already detached (vm 'twice' on"
        " network 'again', node hv1): nothing to do\n"
    )


async def test_a_write_that_times_out_says_its_outcome_is_unknown(nats_server, capsys):
    controller = await start_controller(nats_server)
    try:
        client = ApiClient(await nats_server.connect("admin"))
        await client.node_register(name="n1")
        await client.network_create("lan", "bridge", "10.0.0.0/24")
        attach = ["nic", "attach", "--network", "lan", "--node", "n1", "--vm", "vm1"]
        argv = [*as_admin(nats_server), "--timeout", "1", *attach]
        async with controller.api._lock:  # the controller is busy past the CLI's patience
            assert await cli.run(cli.build_parser().parse_args(argv)) == cli.EXIT_UNKNOWN
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[:3] == [
            "otherixctl: the controller did not answer nic.attach within 1.0s: the change may or"
            " may not have been made.",
            "  check:  otherixctl nic list --network lan --node n1",
            "  retry:  the same command",
        ]
        # the attach was made once the controller got to it; repeating it returns that NIC
        args = cli.build_parser().parse_args([*argv, "--json"])
        assert await cli.run(args) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["existed"] and [i.nic.id for i in await client.nic_list()] == [
            again["nic"]["id"]
        ]
    finally:
        await controller.stop()


def test_the_retry_hint_repeats_the_command_as_typed(capsys):
    args = cli.build_parser().parse_args(["nic", "detach", "ot0123456789ab"])
    text = cli.unknown_outcome(
        Timeout("no answer"), "otherixctl nic list", ["nic", "detach", "x y"]
    )
    assert "  retry:  otherixctl nic detach 'x y'\n" in text and cli.check_command(args)
    assert cli.check_command(cli.build_parser().parse_args(["nic", "list"])) is None
