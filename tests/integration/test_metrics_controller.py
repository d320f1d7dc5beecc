"""The controller's metrics and probes over real HTTP, against a real nats-server: the figures
move as the test changes things (a network, a NIC, refused requests and reports, HEADs heard, a
node acked into convergence, a leader stopped), and ``otherix-controller --metrics-address``
serves them as a process, says why it is not ready, and refuses a bad address clearly."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.api import ApiClient
from schemas import naming
from schemas.codec import encode
from schemas.errors import NotFound
from schemas.messages import Ack
from schemas.probes import ProbeServer
from schemas.wire import SectionGet
from tests.conftest import free_port, start_controller
from tests.integration.test_heartbeat import Listener, wait_status
from tests.integration.test_untrusted_reports import genuine_ack

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_INBOX = "request with a reply subject outside _INBOX"

Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(fetch, port, path)


async def scrape(port: int) -> Figures:
    status, text = await get(port, "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def fig(figures: Figures, name: str, **labels: str) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


async def until(port: int, predicate, timeout: float = 10.0) -> Figures:
    """Scrape until ``predicate(figures)`` holds (gauges follow acks and heartbeats)."""
    async with asyncio.timeout(timeout):
        while not predicate(figures := await scrape(port)):  # noqa: ASYNC110 - over HTTP
            await asyncio.sleep(0.05)
    return figures


async def probes_for(ctl) -> ProbeServer:
    """What ``otherix-controller`` serves, for an in-process controller, on a free port."""
    server = ProbeServer(ctl.metrics.registry, ready=ctl.not_ready, refresh=ctl.refresh_metrics)
    await server.start("127.0.0.1", 0)
    return server


async def test_figures_follow_changes_refusals_heads_and_convergence(nats_server, nc):
    ctl = await start_controller(nats_server, heartbeat=0.2)
    probes = await probes_for(ctl)
    try:
        port, api = probes.port, ApiClient(nc)
        await api.node_register(name="n1")
        n1 = await nats_server.connect("n1")
        listener = await Listener(n1, "n1").start()
        await listener.live()
        assert await get(port, "/readyz") == (200, "ok\n")
        assert await get(port, "/healthz") == (200, "ok\n")
        before = await scrape(port)
        assert fig(before, "otherix_controller_leader") == 1
        assert fig(before, "otherix_controller_nodes", state="registered") == 1
        assert fig(before, "otherix_controller_nodes", state="converged") == 0
        assert fig(before, "otherix_controller_nodes", state="pending") == 1  # nothing applied

        await api.network_create("br", "bridge", "10.0.0.0/24")
        nic = await api.nic_attach("br", "n1", "vm1")
        assert (await api.nic_attach("br", "n1", "vm1")).existed  # a retry: no change
        assert (await api.node_register(name="n1")).existed  # an agent reconnecting: no change
        with pytest.raises(NotFound):
            await api.nic_detach("feedfeedfeed")
        # refused: a request whose reply is not an inbox, and an ack of a version never sent
        viewer = await nats_server.connect("viewer")
        await viewer.publish(naming.api_subject("status"), b"{}", reply="not.an.inbox")
        forged = Ack(node="n1", version=10**6, applied_version=10**6, digest="x")
        await n1.publish(naming.ack_subject("n1"), encode(forged))
        snap = await listener.until(lambda s: any(t.mac == nic.nic.mac for t in s.taps))
        head = listener.heads[-1]
        await ApiClient(n1).section_get(
            SectionGet(name="n1", section=head.refs[0].name, version=head.refs[0].version)
        )
        await genuine_ack(nats_server, api, "n1")
        await wait_status(api, "n1", lambda s: s.converged)
        heartbeats = fig(before, "otherix_controller_heartbeat_duration_seconds_count")
        after = await until(
            port,
            lambda f: (
                fig(f, "otherix_controller_nodes", state="converged") == 1
                and fig(f, "otherix_controller_refusals_total", reason="unpublished version") == 1
                and fig(f, "otherix_controller_refusals_total", reason=OUTSIDE_INBOX) == 1
                and fig(f, "otherix_controller_heartbeat_duration_seconds_count") > heartbeats
            ),
        )

        def up(name: str, **labels: str) -> float:
            return fig(after, name, **labels) - fig(before, name, **labels)

        assert up("otherix_controller_changes_total", endpoint="network.create") == 1
        assert up("otherix_controller_changes_total", endpoint="nic.attach") == 1
        assert up("otherix_controller_changes_total", endpoint="node.register") == 0
        assert up("otherix_controller_api_errors_total", endpoint="nic.detach", code="404") == 1
        assert up("otherix_controller_api_errors_total", endpoint="nic.attach", code="404") == 0
        requests = "otherix_controller_api_request_duration_seconds_count"
        assert up(requests, endpoint="nic.attach") == 2  # the retry is a request, not a change
        assert up("otherix_controller_bus_published_bytes_total", kind="head") > 0
        assert up("otherix_controller_bus_published_messages_total", kind="head") > 0
        assert up("otherix_controller_bus_published_bytes_total", kind="section") > 0
        assert up("otherix_controller_bus_published_messages_total", kind="section") >= 1
        assert fig(after, "otherix_controller_nodes", state="registered") == 1
        assert fig(after, "otherix_controller_nodes", state="pending") == 0
        assert fig(after, "otherix_controller_nodes", state="stale") == 0
        assert fig(after, "otherix_controller_desired_version_max") == snap.version
        assert fig(after, "otherix_controller_leader") == 1
    finally:
        await probes.stop()
        await ctl.stop()


async def test_the_follower_shows_0_then_1_once_the_leader_stops(nats_server):
    leader = await start_controller(nats_server, heartbeat=0.2, instance="a")
    follower = await start_controller(nats_server, heartbeat=0.2, instance="b")
    probes = [await probes_for(leader), await probes_for(follower)]
    running = [follower, leader]
    try:
        a, b = (p.port for p in probes)
        assert fig(await scrape(a), "otherix_controller_leader") == 1
        assert fig(await scrape(b), "otherix_controller_leader") == 0
        assert await get(b, "/readyz") == (200, "ok\n")  # a follower caught up serves reads
        await running.pop().stop()  # the leader
        figures = await until(b, lambda f: fig(f, "otherix_controller_leader") == 1)
        assert fig(figures, "otherix_controller_leader") == 1
        await until(b, lambda f: fig(f, "otherix_controller_heartbeat_duration_seconds_count") > 0)
        assert await get(b, "/readyz") == (200, "ok\n")
        assert fig(await scrape(a), "otherix_controller_leader") == 0
    finally:
        for p in probes:
            await p.stop()
        for ctl in running:
            await ctl.stop()


# --- the process: otherix-controller --metrics-address ------------------------------------------


def controller_process(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "controller.main", "--heartbeat", "0.2", *args],
            env=os.environ | env | {"PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)  # a clean stop saves and releases over the bus: slow when loaded
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


async def serving(port: int, path: str, status: int, timeout: float = 30.0) -> str:
    """Until ``path`` answers ``status`` (a slow machine takes seconds to start Python)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                answer, body = await get(port, path)
                if answer == status:
                    return body
            except OSError:
                pass  # not listening yet
            await asyncio.sleep(0.1)


async def test_the_process_serves_metrics_and_probes(nats_server, nc, tmp_path):
    port = free_port()
    env = nats_server.env("controller") | {"OTHERIX_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    proc = controller_process(env, log=tmp_path / "controller.log")
    try:
        await serving(port, "/readyz", 200)
        await ApiClient(nc, timeout=5).network_create("br", "bridge", "10.0.0.0/24")
        figures = await scrape(port)
        assert fig(figures, "otherix_controller_leader") == 1
        assert fig(figures, "otherix_controller_changes_total", endpoint="network.create") == 1
        assert fig(figures, "otherix_controller_heartbeat_duration_seconds_count") > 0
        assert await get(port, "/healthz") == (200, "ok\n")
    finally:
        assert stop(proc) == 0, (tmp_path / "controller.log").read_text()
    with pytest.raises(OSError):  # and it stopped serving with the process
        fetch(port, "/healthz")


async def test_the_process_says_it_is_not_ready_before_nats_answers(tmp_path):
    port, dead = free_port(), free_port()  # nothing listens on ``dead``
    env = {"OTHERIX_NATS_URL": f"nats://127.0.0.1:{dead}"}
    proc = controller_process(env, "--metrics-address", f"127.0.0.1:{port}", log=tmp_path / "c.log")
    try:
        assert await serving(port, "/readyz", 503) == "not connected to NATS\n"
        assert await get(port, "/healthz") == (200, "ok\n")
        assert fig(await scrape(port), "otherix_controller_leader") == 0
    finally:
        stop(proc)


def test_a_bad_or_busy_metrics_address_is_a_clear_exit(tmp_path):
    def run(address: str) -> subprocess.CompletedProcess:
        env = os.environ | {"PYTHONPATH": str(ROOT), "OTHERIX_NATS_URL": "nats://127.0.0.1:1"}
        argv = [sys.executable, "-m", "controller.main", "--metrics-address", address]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)

    bad = run("localhost")
    assert bad.returncode == 2 and "--metrics-address" in bad.stderr
    assert "expected HOST:PORT" in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        taken = run(f"127.0.0.1:{port}")
    assert taken.returncode == 1 and "Traceback" not in taken.stderr, taken.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-address)" in taken.stderr
    assert "in use" in taken.stderr
    assert time.monotonic() - started < 20  # at once, not after trying NATS


async def test_a_follower_takes_the_nodes_acks_and_shows_them_converged(nats_server, nc):
    """Every controller hears the acks; a follower bounds them by the leader's mark of versions
    (it has published nothing itself), so its status and gauges show the node converged, and
    an ack above every version sent is still refused there."""
    leader = await start_controller(nats_server, heartbeat=0.2, instance="a")
    follower = await start_controller(nats_server, heartbeat=0.2, instance="b")
    probes = await probes_for(follower)
    try:
        api = ApiClient(nc)
        await api.node_register(name="n1")
        await api.network_create("br", "bridge", "10.0.0.0/24")
        await api.nic_attach("br", "n1", "vm1")
        n1 = await nats_server.connect("n1")
        await Listener(n1, "n1").start()
        for _ in range(50):  # until the follower has the leader's saved versions
            await genuine_ack(nats_server, api, "n1")
            figures = await scrape(probes.port)
            if fig(figures, "otherix_controller_nodes", state="converged") == 1:
                break
            await asyncio.sleep(0.2)
        assert fig(figures, "otherix_controller_nodes", state="converged") == 1
        assert follower.acks.refused["unpublished version"] == 0
        forged = Ack(node="n1", version=10**6, applied_version=10**6, digest="x")
        await n1.publish(naming.ack_subject("n1"), encode(forged))
        await until(
            probes.port,
            lambda f: (
                fig(f, "otherix_controller_refusals_total", reason="unpublished version") == 1
            ),
        )
        assert not follower.leading and leader.leading
    finally:
        await probes.stop()
        await follower.stop()
        await leader.stop()


async def test_the_leader_gauge_follows_the_lease_not_the_write_service(nats_server):
    """A leader frozen past its lease (its write service still up until its next lease step)
    must not read 1 next to the new leader's 1."""
    ctl = await start_controller(nats_server, heartbeat=0.2, instance="a")
    probes = await probes_for(ctl)
    try:
        assert fig(await scrape(probes.port), "otherix_controller_leader") == 1
        ctl.lease.holds = lambda now: False  # as after a freeze longer than the lease
        assert ctl.leading
        assert fig(await scrape(probes.port), "otherix_controller_leader") == 0
    finally:
        await probes.stop()
        await ctl.stop()
