"""schemas.probes: /metrics, /healthz and /readyz over real HTTP on loopback, and the flag."""

import argparse
import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from schemas import probes
from schemas.options import add_metrics
from schemas.probes import ProbeServer, listen_address


def fetch(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    return await asyncio.to_thread(fetch, port, path, method)


async def test_metrics_healthz_readyz():
    registry = CollectorRegistry()
    hits = Counter("otherix_test_hits", "hits", registry=registry)
    level = Gauge("otherix_test_level", "level", registry=registry)
    state = {"ready": "not connected to NATS"}
    server = ProbeServer(
        registry, ready=lambda: state["ready"], refresh=lambda: level.set(len(state))
    )
    await server.start("127.0.0.1", 0)
    try:
        hits.inc(3)
        status, body = await get(server.port, "/metrics")
        assert status == 200 and "otherix_test_hits_total 3.0" in body
        assert "otherix_test_level 1.0" in body  # refreshed at the scrape
        assert await get(server.port, "/healthz") == (200, "ok\n")
        assert await get(server.port, "/readyz") == (503, "not connected to NATS\n")
        state["ready"] = None
        assert await get(server.port, "/readyz") == (200, "ok\n")
        assert (await get(server.port, "/nope"))[0] == 404
        assert (await get(server.port, "/metrics", "POST"))[0] == 405
    finally:
        await server.stop()


async def test_garbage_and_silent_clients_do_not_stop_it():
    server = ProbeServer(CollectorRegistry())
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"x" * 20000)  # past the request limit, never a blank line
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        _, idle = await asyncio.open_connection("127.0.0.1", server.port)  # says nothing
        assert await get(server.port, "/healthz") == (200, "ok\n")
        idle.close()
    finally:
        await server.stop()


def test_address_flag():
    p = argparse.ArgumentParser()
    add_metrics(p)
    assert p.parse_args([]).metrics_address is None
    assert p.parse_args(["--metrics-address", "0.0.0.0:9100"]).metrics_address == ("0.0.0.0", 9100)
    assert listen_address("[::1]:9101") == ("::1", 9101)
    for bad in ("9100", ":9100", "host:0", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            listen_address(bad)
    with pytest.raises(SystemExit):
        p.parse_args(["--metrics-address", "localhost"])


async def test_a_client_that_never_reads_its_answer_is_cut_off(monkeypatch):
    """A scrape whose client stops reading holds a socket and its unsent answer only for the
    request timeout: then the connection is aborted, not left to wait for a reader forever."""
    monkeypatch.setattr(probes, "REQUEST_TIMEOUT", 0.5)
    registry = CollectorRegistry()
    big = Gauge("otherix_test_big", "many series", ["peer"], registry=registry)
    for i in range(150000):  # ~7 MB: more than the socket buffers hold (up to 4 MB each)
        big.labels(f"node-{i:06d}").set(i)
    started = time.monotonic()
    whole = len(generate_latest(registry))
    took = time.monotonic() - started  # the server spends as long on the loop the test runs on
    server = ProbeServer(registry)
    await server.start("127.0.0.1", 0)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(2 * took + 2.0)  # past the answer and its timeout, reading nothing
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(sock, 1 << 20), 2.0
            ):
                received += len(chunk)
        assert received < whole  # cut off, not delivered late
    finally:
        sock.close()
        await server.stop()


async def test_scrapes_in_a_loop_reuse_a_costly_exposition():
    """A scrape that took 50 ms is answered again for the next ~0.5 s instead of being made
    anew (the loop belongs to the heartbeat); a cheap one is made for every scrape."""
    made = []

    def costly() -> None:
        made.append(time.monotonic())
        time.sleep(0.05)

    server = ProbeServer(CollectorRegistry(), refresh=costly)
    await server.start("127.0.0.1", 0)
    try:
        for _ in range(5):
            assert (await get(server.port, "/metrics"))[0] == 200
        assert len(made) < 5
        await asyncio.sleep(0.6)
        await get(server.port, "/metrics")
        assert len(made) >= 2  # made anew once the reuse window passed
    finally:
        await server.stop()
    cheap = []
    server = ProbeServer(CollectorRegistry(), refresh=lambda: cheap.append(1))
    await server.start("127.0.0.1", 0)
    try:
        for _ in range(3):
            await asyncio.sleep(0.05)
            await get(server.port, "/metrics")
        assert len(cheap) == 3
    finally:
        await server.stop()
