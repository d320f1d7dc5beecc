"""The controller's publishing timeline: heartbeat period, change → HEAD, ``status --wait``.

The integration tests assert order and counts only; the times live here. Baselines from the same
run: the configured heartbeat interval, a bare publish → receive on the same connection and an API
round trip (``nic list``), and the ``--wait`` asked for. Runs an in-process controller against
its own nats-server (no namespaces, no root).
"""

import asyncio
import contextlib
import io
import tempfile
import time
from pathlib import Path

from bench import summary
from client.api import ApiClient
from client.cli import EXIT_TIMEOUT, build_parser, run
from schemas import naming
from schemas.codec import decode
from schemas.wire import Head
from tests.conftest import NatsServer, start_controller

RUNS = 20
HEARTBEAT = 0.2


async def arrivals(nc, node: str, api: ApiClient | None = None):
    """A node's HEADs with their arrival time; returns once the first one arrived (a positive
    signal, not flush()). With ``api``, attaching throwaway NICs to the node publishes its HEAD
    while we wait (a change is sent at once to the nodes it affects only)."""
    queue: asyncio.Queue[tuple[float, Head]] = asyncio.Queue()

    async def on_msg(msg):
        queue.put_nowait((time.perf_counter(), decode(msg.data, Head)))

    await nc.subscribe(naming.desired_subject(node), cb=on_msg)
    if api is not None:
        await api.network_create("pokes", "bridge", "10.99.0.0/16")
    for attempt in range(30):
        if api is not None:
            await api.nic_attach("pokes", node, f"poke{attempt}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.get(), 0.3)
            return queue
    raise TimeoutError(f"no snapshot for {node}")


async def heartbeat_period(server: NatsServer, nc) -> None:
    ctl = await start_controller(server, heartbeat=HEARTBEAT)
    try:
        await ApiClient(nc).node_register(name="n1")
        queue = await arrivals(nc, "n1")
        times = [(await asyncio.wait_for(queue.get(), 10))[0] for _ in range(RUNS + 1)]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        med = summary("gap between heartbeat snapshots", gaps)
        print(
            f"baseline: configured heartbeat {HEARTBEAT * 1000:.0f} ms; ratio {med / HEARTBEAT:.2f}x"
        )
    finally:
        await ctl.stop()


async def change_to_snapshot(server: NatsServer, nc) -> None:
    ctl = await start_controller(
        server, heartbeat=3600.0
    )  # every snapshot below comes from a change
    try:
        api = ApiClient(nc)
        await api.node_register(name="c1")
        await api.network_create("br", "bridge", "10.0.0.0/16")
        queue = await arrivals(nc, "c1", api)
        change = []
        for i in range(RUNS):
            await asyncio.sleep(0.05)  # let the pokes' HEADs arrive
            while not queue.empty():
                queue.get_nowait()
            before = (await api.status()).nodes[0].desired_version
            start = time.perf_counter()
            await api.nic_attach("br", "c1", f"vm{i}")
            while True:  # the HEAD of the change, with the changed section attached
                at, head = await asyncio.wait_for(queue.get(), 10)
                if head.version > before:
                    change.append(at - start)
                    break

        rtt = []
        for _ in range(RUNS):
            start = time.perf_counter()
            await api.nic_list()
            rtt.append(time.perf_counter() - start)

        echo: asyncio.Queue[float] = asyncio.Queue()

        async def on_echo(_msg):
            echo.put_nowait(time.perf_counter())

        await nc.subscribe("bench.echo", cb=on_echo)
        bare = []
        for _ in range(RUNS + 1):
            start = time.perf_counter()
            await nc.publish("bench.echo", b"x")
            with contextlib.suppress(TimeoutError):  # the first may go before the sub is live
                bare.append(await asyncio.wait_for(echo.get(), 1) - start)
        med = summary("nic attach -> snapshot (heartbeat 1 h)", change)
        med_rtt = summary("baseline: API round trip (nic list)", rtt)
        summary("baseline: bare publish -> receive", bare)
        print(f"ratio change/API round trip: {med / med_rtt:.1f}x")
    finally:
        await ctl.stop()


async def status_wait(server: NatsServer, nc) -> None:
    ctl = await start_controller(server, heartbeat=HEARTBEAT)
    try:
        await ApiClient(nc).node_register(name="silent")  # never acks: never converged
        wait = 1.0
        args = build_parser().parse_args(["--nats", server.url, "status", "--wait", str(wait)])
        took = []
        for _ in range(3):
            start = time.perf_counter()
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                rc = await run(args)
            took.append(time.perf_counter() - start)
            assert rc == EXIT_TIMEOUT, rc
        summary(f"status --wait {wait} (never converges)", took)
        print(f"baseline: the --wait asked for, {wait * 1000:.0f} ms")
    finally:
        await ctl.stop()


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="otbench-") as tmp:
        for step in (heartbeat_period, change_to_snapshot, status_wait):
            store = Path(tmp) / step.__name__
            store.mkdir()
            # a fresh server and store: no intent left from before; the open bus, since one
            # connection plays every part here (attach_ack measures the secured bus)
            server = NatsServer(store, secure=False)
            server.start()
            try:
                await step(server, await server.connect())
            finally:
                await server.close_clients()
                server.stop()
