"""schemas.probes: /metrics, /healthz and /readyz over real HTTP on loopback, and the flag."""

import argparse
import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

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
