"""``./dev bench scale``: the control plane at 100 / 1,000 / 5,000 hollow nodes (issue 10), one table.

Measured only through stable interfaces, so the same command gives the figures of any wire
protocol: the controller as a process (CPU time and RSS from ``/proc``), nats-server's own
counters (``/varz`` of its monitoring port: ``in_bytes`` is what clients published, ``out_bytes``
what the server delivered), the API, the per-node subject ``otherix.v1.desired.<node>`` and the
agents' acks on ``otherix.v1.ack.<node>`` (of both only the top-level ``version`` and ``ok``).

Phases, each on its own nats-server (an OPEN bus: plaintext, no identities, since a roster of
5,000 node identities is impractical; ``bench attach_ack`` measures what the secured bus costs):

- baseline: the same controller with an empty intent (CPU per heartbeat, RSS);
- per size: hollow nodes (``bench.hollow``: 20 NICs each over several overlays, written to the
  store before the controller starts; nobody acks, the controller publishes anyway). Start-up
  (load + first publication) is bounded by ``--limit`` seconds and ``--mem-limit`` MB, beyond
  which the size is reported as "did not finish". Then CPU and bus bytes per heartbeat over
  ``--heartbeats`` heartbeats, and ``--changes`` NIC attaches: API reply → the last node hosting
  that network got a message with a newer version, and the bus bytes of that window;
- convergence with ``--hollow-agents`` HOLLOW AGENTS: the real ``agent.runner.Agent`` on an
  in-memory kernel, all in this process (like kubemark): API request → every affected node's ack;
- convergence with ``--real-agents`` real agents in network namespaces (``lab.cluster.Lab``,
  root only, brought up all at once; those registered within ``--real-budget`` seconds count):
  their CPU per unchanged heartbeat, then NIC attach/detach → every hosting node's ack, on a
  network every node hosts and on one that spans two nodes, one change every two heartbeats;
  then the same-run FLOOR: the agents stopped, one minimal nats-py process per node namespace
  (``FLOOR_AGENT``: receives its node's HEADs, and acks a HEAD-sized message per change) through
  the same relay: what any Python agent fleet does on this machine, publish → all acks;
- cold apply of 10,000 FDB entries next to ``bridge -batch`` of the same (``bench fdb_apply``);
- agent CPU per unchanged heartbeat: ``bench agent_steady`` when it exists.

Options: ``./dev bench scale --nodes 100,1000 --hollow-agents 200 --real-agents 0`` for a quick run.
Everything here is measurement; it never changes the code it measures.
"""

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats

from bench import hollow
from client.api import ApiClient
from schemas.codec import encode
from schemas.errors import ApiError
from tests.conftest import free_port, nats_server_binary, stop_server, wait_listening

DESIRED = "otherix.v1.desired."
ACK = "otherix.v1.ack."
ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./dev bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", default="100,1000,5000", help="hollow node counts, comma-separated")
    p.add_argument("--nics", type=int, default=20, help="NICs per hollow node")
    p.add_argument("--heartbeat", type=float, default=1.0, help="controller heartbeat (s)")
    p.add_argument("--heartbeats", type=int, default=10, help="heartbeats per CPU/bytes window")
    p.add_argument("--changes", type=int, default=5, help="NIC attaches timed per size")
    p.add_argument("--limit", type=float, default=120.0,
                   help="seconds a controller may take to start (load + first publication) or a change to land")  # fmt: skip
    p.add_argument("--mem-limit", type=int, default=6000, help="controller RSS limit (MB)")
    p.add_argument("--hollow-agents", type=int, default=1000, help="0: skip")
    p.add_argument("--agent-nics", type=int, default=2, help="NICs per hollow agent's node")
    p.add_argument("--hollow-limit", type=float, default=180.0,
                   help="seconds for every hollow agent to ack its first snapshot")  # fmt: skip
    p.add_argument("--real-agents", type=int, default=100, help="0: skip")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the real agents' floor (minimal nats-py processes)")  # fmt: skip
    p.add_argument("--real-budget", type=float, default=180.0,
                   help="seconds for bringing real agents up (and registered)")  # fmt: skip
    p.add_argument("--runs", type=int, default=20, help="attaches per convergence measurement")
    p.add_argument("--conv-budget", type=float, default=120.0,
                   help="seconds per convergence measurement: fewer runs past it")  # fmt: skip
    return p.parse_args(argv)


# --- the table ----------------------------------------------------------------------------------


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, figure: str, size: str, measured: str, baseline: str = "") -> None:
        self.rows.append((figure, size, measured, baseline))
        print(f"   {figure} [{size}]: {measured}   ({baseline})", flush=True)

    def print(self) -> None:
        head = ("figure", "size", "measured", "same-run baseline")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
        print(line)
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def ms(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the bus and the controller as processes -------------------------------------------------


class Bus:
    """An open nats-server with JetStream and its monitoring port on 127.0.0.1."""

    def __init__(self, workdir: Path):
        self.dir = workdir / f"bus-{secrets.token_hex(3)}"
        self.dir.mkdir()
        self.port, self.monitor = free_port(), free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.clients: list = []
        self.errors: list[Exception] = []

    def __enter__(self) -> "Bus":
        argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.dir / "js"), "-m", str(self.monitor)]  # fmt: skip
        log = self.dir / "nats-server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, log, 10)
        return self

    def __exit__(self, *_exc) -> None:
        stop_server(self.proc)

    async def connect(self, **kw):
        async def quiet(e: Exception) -> None:  # a lagging hollow agent's connection is cut as a
            self.errors.append(e)  # slow consumer: counted, not a traceback per connection

        nc = await nats.connect(self.url, max_reconnect_attempts=5, error_cb=quiet, **kw)
        self.clients.append(nc)
        return nc

    def error_kinds(self) -> str:
        kinds = collections.Counter(type(e).__name__ for e in self.errors)
        return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) or "none"

    async def close_clients(self) -> None:
        async def close(nc) -> None:  # bounded: one close hung a whole run (1,000 hollow agents)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

        await asyncio.gather(*map(close, self.clients))
        self.clients.clear()

    async def varz(self) -> tuple[int, int]:
        """(in_bytes, out_bytes) since the server started."""

        def get() -> dict:
            url = f"http://127.0.0.1:{self.monitor}/varz"
            with urllib.request.urlopen(url, timeout=5) as r:
                return msgspec.json.decode(r.read())

        v = await asyncio.to_thread(get)
        return v["in_bytes"], v["out_bytes"]


def short_load(ctl: "ControllerProcess", cluster: hollow.HollowCluster, label: str, table) -> None:
    """A row when the controller's log says it loaded fewer records than were written."""
    found = re.search(r"(\d+) networks, (\d+) NICs, (\d+) nodes", ctl.loaded())
    if found is None:
        return
    written = (len(cluster.networks), len(cluster.nics), len(cluster.nodes))
    loaded = tuple(int(x) for x in found.groups())
    if loaded != written:
        table.add("STORE LOAD SHORT: networks, NICs, nodes loaded vs written", label,
                  f"{loaded} of {written}", f"{sum(written):,} keys written")  # fmt: skip


class DidNotFinish(Exception):
    pass


class ControllerProcess:
    """``otherix-controller`` as a subprocess: CPU time and RSS read from ``/proc``."""

    def __init__(self, bus: Bus, heartbeat: float, bucket: str = "otherix"):
        self.log = bus.dir / f"controller-{bucket}.log"
        argv = [sys.executable, "-m", "controller.main", "--nats", bus.url,
                "--heartbeat", str(heartbeat), "--underlay-cidr", hollow.UNDERLAY_CIDR,
                "--mesh-prefix", hollow.MESH_PREFIX, "--bucket", bucket]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started = time.perf_counter()

    def cpu(self) -> float:
        """CPU seconds so far, every thread: the scheduler's nanoseconds (``schedstat``), as
        ``stat``'s user + system ticks are too coarse (10 ms) for a small heartbeat."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def memory(self, key: str = "VmRSS") -> int:
        """``VmRSS`` (or ``VmHWM``, the peak) in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    async def wait(self, ready: Callable[[], bool], limit: float, mem_limit: int) -> float:
        """Until ``ready()``; seconds since start. Past ``limit`` seconds or ``mem_limit`` bytes
        of RSS the controller is stopped and ``DidNotFinish`` raised."""
        while not ready():
            elapsed = time.perf_counter() - self.started
            if self.proc.poll() is not None:
                raise DidNotFinish(f"controller exited ({self.proc.returncode}); see {self.log}")
            rss = self.memory()
            if rss > mem_limit:
                self.stop()
                raise DidNotFinish(
                    f"did not finish: RSS passed {size(mem_limit)} after {elapsed:.0f} s"
                )
            if elapsed > limit:
                self.stop()
                raise DidNotFinish(f"did not finish within {limit:.0f} s (RSS {size(rss)} by then)")
            await asyncio.sleep(0.2)
        return time.perf_counter() - self.started

    def loaded(self) -> str:
        """The controller's own count of what it loaded (its log line), to catch a short load
        (or see that it never got past loading)."""
        for line in self.log.read_text(errors="replace").splitlines():
            if "loaded" in line and "NICs" in line:
                return "loaded " + line.split("loaded", 1)[1].strip()
        return "not finished"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- watching the per-node subject and the acks -------------------------------------------------


class Head(msgspec.Struct):
    """All we read of a desired-state message or an ack: its top-level version (and ok)."""

    version: int = 0
    ok: bool = True


_json_head = msgspec.json.Decoder(Head)
_pack_head = msgspec.msgpack.Decoder(Head)


def head(data: bytes) -> Head:
    try:
        return _json_head.decode(data)
    except msgspec.DecodeError:
        return _pack_head.decode(data)


class Watch:
    """Latest version (and its arrival time) per node on ``prefix.<node>``, and waiters."""

    def __init__(self, prefix: str, only_ok: bool = False):
        self.prefix, self.only_ok = prefix, only_ok
        self.version: dict[str, int] = {}
        self.at: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg) -> None:
        node = msg.subject[len(self.prefix) :]
        h = head(msg.data)
        self.count[node] = self.count.get(node, 0) + 1
        if h.version > self.version.get(node, -1) and (h.ok or not self.only_ok):
            self.version[node], self.at[node] = h.version, time.perf_counter()
        self.changed.set()

    async def subscribe(self, nc, nodes: list[str] | None = None) -> None:
        """Each node's subject, or one wildcard for all."""
        targets = [self.prefix + n for n in nodes] if nodes else [self.prefix + ">"]
        for subject in targets:
            await nc.subscribe(subject, cb=self.on_msg, pending_bytes_limit=512 * 2**20)

    async def beyond(self, floor: dict[str, int], timeout: float) -> float:
        """Until every node of ``floor`` has a version above it; the last arrival time."""
        async with asyncio.timeout(timeout):
            while True:
                late = [n for n, v in floor.items() if self.version.get(n, -1) <= v]
                if not late:
                    return max(self.at[n] for n in floor)
                self.changed.clear()
                await self.changed.wait()


async def heartbeats(watch: Watch, node: str, count: int, timeout: float) -> None:
    """Until ``count`` more messages arrived on ``node``'s subject."""
    target = watch.count.get(node, 0) + count
    async with asyncio.timeout(timeout):
        while watch.count.get(node, 0) < target:
            watch.changed.clear()
            await watch.changed.wait()


async def api_rtt(api: ApiClient, network: str, runs: int = 10) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await api.network_show(network)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --- phases ---------------------------------------------------------------------------------------


async def empty_baseline(opts, work: Path, table: Table) -> dict:
    """The same controller with no intent: CPU per heartbeat and RSS."""
    with Bus(work) as bus:
        ctl = ControllerProcess(bus, opts.heartbeat)
        try:
            api = ApiClient(await bus.connect(), timeout=2.0)
            ready: list[bool] = []

            async def probe() -> None:
                while not ready:
                    with contextlib.suppress(ApiError):
                        await api.network_list()
                        ready.append(True)
                    await asyncio.sleep(0.1)

            task = asyncio.create_task(probe())
            await ctl.wait(lambda: bool(ready), opts.limit, opts.mem_limit * 2**20)
            await task
            await asyncio.sleep(opts.heartbeat)
            cpu0 = ctl.cpu()
            await asyncio.sleep(opts.heartbeat * opts.heartbeats)
            cpu = (ctl.cpu() - cpu0) / opts.heartbeats
            return {"cpu": cpu, "rss": ctl.memory()}
        finally:
            ctl.stop()
            await bus.close_clients()


async def controller_side(opts, nodes: int, work: Path, table: Table, empty: dict) -> None:
    label = f"{nodes:,} hollow nodes"
    cluster = hollow.build(nodes, opts.nics)
    network = cluster.networks[0].name
    hosts = sorted(cluster.hosts(network))
    canary = hollow.node_name(min(len(cluster.networks) // 2, nodes - 1))
    if canary in hosts:
        canary = next(n.name for n in cluster.nodes if n.name not in hosts)
    with Bus(work) as bus:
        nc = await bus.connect()
        wrote = await hollow.write(nc, cluster)
        print(f"-- {label}: {len(cluster.nics):,} NICs on {len(cluster.networks)} overlays"
              f" written in {wrote:.1f} s; {len(hosts)} nodes host {network}", flush=True)  # fmt: skip
        watch = Watch(DESIRED)
        await watch.subscribe(nc, [canary])
        ctl = ControllerProcess(bus, opts.heartbeat)
        try:
            try:
                started = await ctl.wait(
                    lambda: canary in watch.at, opts.limit, opts.mem_limit * 2**20
                )
            except DidNotFinish as e:
                table.add("controller start (load + first publication)", label, str(e),
                          f"store load: {ctl.loaded()} of {len(cluster.nics)} NICs written")  # fmt: skip
                short_load(ctl, cluster, label, table)
                return
            table.add("controller start (load + first publication)", label, f"{started:.1f} s",
                      f"{ctl.loaded()} of {len(cluster.nics)} NICs written")  # fmt: skip
            short_load(ctl, cluster, label, table)

            # heartbeats: CPU and bytes over a window of whole cycles seen on the canary
            await heartbeats(watch, canary, 1, opts.limit)
            cpu0, (in0, _) = ctl.cpu(), await bus.varz()
            t0 = time.perf_counter()
            await heartbeats(watch, canary, opts.heartbeats, opts.limit)
            took = time.perf_counter() - t0
            cpu, (in1, _) = ctl.cpu() - cpu0, await bus.varz()
            n = opts.heartbeats
            table.add("controller CPU per heartbeat", label,
                      f"{ms(cpu / n)} ({cpu / took * 100:.0f} % of a core; cycle {took / n:.2f} s)",
                      f"empty intent {ms(empty['cpu'])}")  # fmt: skip
            intent_bytes = sum(len(encode(r)) for r in (*cluster.networks, *cluster.nodes, *cluster.nics))  # fmt: skip
            table.add("bus bytes per heartbeat (published)", label,
                      f"{size((in1 - in0) / n)} ({size((in1 - in0) / took)}/s)",
                      f"whole intent encoded {size(intent_bytes)}")  # fmt: skip

            # one NIC attach at a time: reply → the last hosting node's newer message
            api = ApiClient(await bus.connect(), timeout=max(opts.limit, 10))
            rtt = await api_rtt(api, network)
            changes = Watch(DESIRED)
            await changes.subscribe(await bus.connect(), hosts)
            await changes.beyond({h: -1 for h in hosts}, opts.limit)  # every subscription live
            lags, windows, byte_counts, totals = [], [], [], []
            nic_bytes = len(encode(cluster.nics[0]))
            began = time.perf_counter()
            for i in range(opts.changes):
                if i and time.perf_counter() - began > opts.conv_budget / 2:
                    break  # a slow controller: fewer samples, the count says so
                await heartbeats(watch, canary, 1, opts.limit)  # start right after a cycle
                floor = {h: changes.version[h] for h in hosts}
                (in0, _), start = await bus.varz(), time.perf_counter()
                await api.nic_attach(network, hosts[i % len(hosts)], f"bench-{i}")
                replied = time.perf_counter()
                try:
                    last = await changes.beyond(floor, opts.limit)
                except TimeoutError:
                    table.add("change → last hosting node's message", label,
                              f"did not arrive within {opts.limit:.0f} s")  # fmt: skip
                    return
                in1, _ = await bus.varz()
                lags.append(last - replied)
                totals.append(last - start)
                windows.append(time.perf_counter() - start)
                byte_counts.append(in1 - in0)
            table.add("nic attach: API reply → last hosting node's message", label,
                      f"median {ms(statistics.median(lags))}, max {ms(max(lags))} (n={len(lags)})"
                      f" (request → last: {ms(statistics.median(totals))})",
                      f"API round trip {ms(rtt)}")  # fmt: skip
            table.add("bus bytes per change (one nic attach)", label,
                      f"median {size(statistics.median(byte_counts))}"
                      f" (window {ms(statistics.median(windows))})",
                      f"one NIC record × {len(hosts)} hosting nodes = {size(nic_bytes * len(hosts))}")  # fmt: skip
            table.add("controller RSS", label, f"{size(ctl.memory())} (peak {size(ctl.memory('VmHWM'))})",
                      f"empty intent {size(empty['rss'])}")  # fmt: skip
        finally:
            ctl.stop()
            await bus.close_clients()


async def hollow_agents(opts, work: Path, table: Table) -> None:
    from bench.hollow_agents import hollow_agent  # the agent code only for this phase

    count = opts.hollow_agents
    label = f"{count:,} HOLLOW agents, {opts.agent_nics} NICs each"
    cluster = hollow.build(count, opts.agent_nics)
    network = cluster.networks[0].name
    hosts = sorted(cluster.hosts(network))
    with Bus(work) as bus:
        nc = await bus.connect()
        await hollow.write(nc, cluster)
        acks = Watch(ACK, only_ok=True)
        await acks.subscribe(nc)
        watch = Watch(DESIRED)
        names = [n.name for n in cluster.nodes]
        await watch.subscribe(nc, [names[-1]])
        ctl = ControllerProcess(bus, opts.heartbeat)
        agents = []
        logging.getLogger("agent").setLevel(logging.ERROR)  # a thousand agents' start-up lines
        try:
            try:  # agents start once the controller publishes: registering then changes nothing
                await ctl.wait(lambda: names[-1] in watch.at, opts.limit, opts.mem_limit * 2**20)
            except DidNotFinish as e:
                table.add("controller start", label, str(e))
                return
            conns = [await bus.connect() for _ in range(max(1, count // 10))]
            for i, node in enumerate(cluster.nodes):
                state = work / "agents" / node.name
                state.mkdir(parents=True, exist_ok=True)
                agents.append(hollow_agent(conns[i % len(conns)], node, state))
            start, cpu0 = time.perf_counter(), time.process_time()
            for agent in agents:
                await agent.start()
            try:
                await ctl.wait(
                    lambda: len(acks.version) == count, opts.hollow_limit, opts.mem_limit * 2**20
                )
            except DidNotFinish as e:
                # why: what one snapshot costs the agent code, times the agents
                handled = sum(sum(a.counters.values()) - a.counters["received"] for a in agents)
                cpu = time.process_time() - cpu0
                per = cpu / max(handled, 1)
                table.add("convergence after start", label,
                          f"{str(e).replace('did not finish', 'not converged')};"
                          f" {len(acks.version)} of {count} acked; bus errors: {bus.error_kinds()}",
                          f"agent CPU {ms(per)} per snapshot handled ({handled} in {cpu:.0f} s):"
                          f" {count} agents need {per * count:.0f} s of CPU per heartbeat")  # fmt: skip
                return
            table.add("convergence after start (every node acked ok)", label,
                      ms(time.perf_counter() - start))  # fmt: skip

            # steady state: this process (all agents) and the bus, per heartbeat
            await heartbeats(watch, names[-1], 2, opts.limit)
            cpu0, (in0, out0) = time.process_time(), await bus.varz()
            t0 = time.perf_counter()
            await heartbeats(watch, names[-1], opts.heartbeats, opts.limit)
            took, n = time.perf_counter() - t0, opts.heartbeats
            cpu, (in1, out1) = time.process_time() - cpu0, await bus.varz()
            table.add("agents' CPU per heartbeat (all hollow agents)", label,
                      f"{ms(cpu / n)} ({cpu / took * 100:.0f} % of a core)",
                      f"{ms(cpu / n / count)} per agent")  # fmt: skip
            table.add("bus bytes per heartbeat (in + out, with acks and health)", label,
                      f"{size((in1 - in0 + out1 - out0) / n)}",
                      f"published {size((in1 - in0) / n)}, delivered {size((out1 - out0) / n)}")  # fmt: skip

            api = ApiClient(await bus.connect(), timeout=max(opts.limit, 10))
            rtt = await api_rtt(api, network)
            report_convergence(table, label, await converge(api, acks, network, hosts, opts), rtt)
        finally:
            with contextlib.suppress(TimeoutError):  # a stop that hangs must not hang the run
                await asyncio.wait_for(asyncio.gather(*(a.stop() for a in agents)), 60)
            ctl.stop()
            await bus.close_clients()


async def converge(
    api: ApiClient, acks: Watch, network: str, hosts: list[str], opts
) -> tuple[list[float], str]:
    """API request → every hosting node acked ok a version newer than before, per attach;
    fewer than ``opts.runs`` samples once ``opts.conv_budget`` seconds are spent. Returns the
    samples and why there are fewer, if there are."""
    samples: list[float] = []
    began = time.perf_counter()
    for i in range(opts.runs):
        if time.perf_counter() - began > opts.conv_budget:
            return samples, f"; stopped at the {opts.conv_budget:.0f} s budget"
        floor = {h: acks.version.get(h, -1) for h in hosts}
        start = time.perf_counter()
        await api.nic_attach(network, hosts[i % len(hosts)], f"conv-{i}")
        try:
            samples.append(await acks.beyond(floor, opts.limit) - start)
        except TimeoutError:
            return samples, f"; attach {i + 1} not converged within {opts.limit:.0f} s"
    return samples, ""


def report_convergence(
    table: Table, label: str, result: tuple[list[float], str], rtt: float, extra: str = ""
) -> None:
    samples, note = result
    figure = "convergence: API change → all affected acks"
    if not samples:
        table.add(figure, label, f"no change converged{note}", f"API round trip {ms(rtt)}{extra}")
        return
    table.add(figure, label,
              f"p50 {ms(pct(samples, 0.5))}, p99 {ms(pct(samples, 0.99))} (n={len(samples)}{note})",
              f"API round trip {ms(rtt)}{extra}")  # fmt: skip


class Processes:
    """CPU seconds of a set of processes: their threads (``schedstat``, nanoseconds) plus the
    children they waited for (``cutime`` + ``cstime``: the agents' ``nft`` and ``ip`` runs)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids  # kind → pids

    @staticmethod
    def cpu(pid: int) -> float:
        total = 0.0
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    total += int((task / "schedstat").read_text().split()[0]) / 1e9
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[13]) + int(fields[14])) / Processes.TICK
        return total

    def sample(self) -> dict[str, float]:
        return {kind: sum(self.cpu(p) for p in pids) for kind, pids in self.pids.items()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {kind: after[kind] - before[kind] for kind in before}


async def lab_processes(lab) -> Processes:
    """The agents and their wireguard-go daemons (everything in the node namespaces)."""
    from lab.netns import netns_pids

    kinds: dict[str, list[int]] = {"agent": [], "wireguard-go": []}
    for node in lab.topology.nodes.values():
        for pid in await netns_pids(node.netns):
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                kinds["wireguard-go" if comm.startswith("wireguard") else "agent"].append(pid)
    return Processes(kinds)


async def bring_up(lab, count: int, budget: float) -> tuple[list[str], dict[str, float]]:
    """``count`` nodes at once: namespaces (4 at a time), ONE relay process listening in every
    namespace, every agent started before any is waited for, then registration and convergence
    watched for all together. (Adding nodes one by one, as ``Lab.add_node`` does, waits for each
    registration while every agent already up applies the mesh change the newcomer makes:
    97 nodes in 150 s on a loaded 2-core machine, growing with the count.) Returns the nodes
    registered within ``budget`` seconds and the seconds each step took."""
    from lab.cluster import NODE_NATS_PORT
    from lab.relay import start_relay

    steps: dict[str, float] = {}
    t = began = time.perf_counter()
    await lab.up(0)
    steps["nats-server + controller"] = time.perf_counter() - t
    names = [f"n{i}" for i in range(1, count + 1)]
    gate = asyncio.Semaphore(4)

    async def plug(index: int, name: str) -> None:
        async with gate:
            await lab.topology.add_node(name, index, ip_forward=False)

    t = time.perf_counter()
    await asyncio.gather(*(plug(i, n) for i, n in enumerate(names, 1)))
    lab.state.nodes.update({n: i for i, n in enumerate(names, 1)})
    lab.save()
    steps["namespaces + underlay"] = time.perf_counter() - t
    t = time.perf_counter()
    netns = [lab.topology.nodes[n].netns for n in names]
    await start_relay(netns, lab.bus_target, NODE_NATS_PORT, state_dir=lab.state_dir, name="relay")
    steps["relay"] = time.perf_counter() - t
    t = time.perf_counter()
    for name in names:
        await lab.start_agent(name)
    steps["agents started"] = time.perf_counter() - t
    t = time.perf_counter()
    api = await lab.connect()
    registered: set[str] = set()
    while time.perf_counter() - began < budget:
        with contextlib.suppress(ApiError):
            registered = {n.node.name for n in await api.node_list()}
        if registered >= set(names):
            break
        await asyncio.sleep(0.5)
    steps["registered"] = time.perf_counter() - t
    t = time.perf_counter()
    names = [n for n in names if n in registered]
    await lab.wait_converged(timeout=max(30.0, budget - (time.perf_counter() - began)),
                             nodes=set(names))  # fmt: skip
    steps["converged"] = time.perf_counter() - t
    return names, steps


async def converge_spaced(
    api: ApiClient, acks: Watch, network: str, hosts: list[str], node: str, opts, procs, idle
) -> tuple[list[float], str, dict[str, float]]:
    """Like ``converge``, alternating a NIC attach on ``node`` and its detach, each change two
    heartbeats after the last one converged (so the agents start from their steady state).
    Also the CPU each kind of process spent from the request to the last ack beyond its idle
    rate ``idle``, per change (``/proc`` is read before the request and after the last ack)."""
    samples: list[float] = []
    busy = dict.fromkeys(idle, 0.0)
    per_change = lambda: {k: v / max(len(samples), 1) for k, v in busy.items()}  # noqa: E731
    began = time.perf_counter()
    nic_id = None
    for i in range(opts.runs):
        if time.perf_counter() - began > opts.conv_budget:
            return samples, f"; stopped at the {opts.conv_budget:.0f} s budget", per_change()
        await asyncio.sleep(2 * opts.heartbeat)
        floor = {h: acks.version.get(h, -1) for h in hosts}
        before = procs.sample()
        start = time.perf_counter()
        if nic_id is None:
            nic_id = (await api.nic_attach(network, node, f"conv-{i}")).nic.id
        else:
            await api.nic_detach(nic_id)
            nic_id = None
        try:
            samples.append(await acks.beyond(floor, opts.limit) - start)
        except TimeoutError:
            note = f"; change {i + 1} not converged within {opts.limit:.0f} s"
            return samples, note, per_change()
        spent, window = Processes.delta(before, procs.sample()), time.perf_counter() - start
        for kind in busy:
            busy[kind] += spent[kind] - idle[kind] * window
    return samples, "", per_change()


# The floor's agent: nats-py on uvloop as the agent runs, nothing else. It reads its node's HEADs
# (the controller keeps publishing them) and answers each message on bench.floor.<node> with an
# ack carrying that message's version, as the agent acks a change.
FLOOR_AGENT = """
import asyncio, sys, time
import msgspec, nats, uvloop

async def main(node):
    nc = await nats.connect("nats://127.0.0.1:%d")
    subject = "bench.floor.ack." + node

    async def change(msg):
        version = msgspec.json.decode(msg.data)["version"]
        ack = {"node": node, "version": version, "ok": True, "sent_at": time.time()}
        await nc.publish(subject, msgspec.json.encode(ack))

    async def head(msg):
        msgspec.json.decode(msg.data)  # an unchanged heartbeat: nothing to do

    await nc.subscribe("bench.floor." + node, cb=change)
    await nc.subscribe("otherix.v1.desired." + node, cb=head)
    await asyncio.Event().wait()

uvloop.run(main(sys.argv[1]))
"""


class FloorAcks:
    """The floor agents' acks: the latest version per node and its arrival time."""

    def __init__(self):
        self.version: dict[str, int] = {}
        self.at: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg) -> None:
        ack = msgspec.json.decode(msg.data)
        self.version[ack["node"]], self.at[ack["node"]] = ack["version"], time.perf_counter()
        self.changed.set()

    async def all_at(self, nodes: list[str], version: int, timeout: float) -> float:
        async with asyncio.timeout(timeout):
            while any(self.version.get(n, -1) < version for n in nodes):
                self.changed.clear()
                await self.changed.wait()
        return max(self.at[n] for n in nodes)


async def floor(lab, opts, names: list[str], pair: list[str], size: int, table: Table) -> None:
    """The same-run floor: the real agents stopped (their wireguard-go stays, as the data plane
    does), one ``FLOOR_AGENT`` per node namespace, then ``opts.runs`` messages of ``size``
    bytes (the change HEADs' size) to all nodes and to two: publish → every ack, and the
    processes' CPU per change beyond their idle rate."""
    from lab.cluster import NODE_NATS_PORT

    gate = asyncio.Semaphore(10)

    async def stop(name: str) -> None:
        async with gate:
            await lab.stop_agent(name)

    await asyncio.gather(*(stop(n) for n in names))
    procs: list[asyncio.subprocess.Process] = []
    try:
        for name in names:
            procs.append(await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", lab.topology.nodes[name].netns, sys.executable, "-c",
                FLOOR_AGENT % NODE_NATS_PORT, name, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))  # fmt: skip
        acks = FloorAcks()
        await lab.nc.subscribe("bench.floor.ack.>", cb=acks.on_msg)
        version, began = 0, time.perf_counter()  # subscribed when it has answered (no flush)
        while any(n not in acks.version for n in names):
            if time.perf_counter() - began > 60:
                late = [n for n in names if n not in acks.version]
                table.add("FLOOR", f"{len(names)} minimal nats-py processes",
                          f"{len(late)} never answered within 60 s")  # fmt: skip
                return
            for n in names:
                if n not in acks.version:
                    await lab.nc.publish(f"bench.floor.{n}", msgspec.json.encode({"version": 0}))
            await asyncio.sleep(0.5)
        counted = Processes({"floor": [p.pid for p in procs]})
        await asyncio.sleep(2 * opts.heartbeat)
        before, t = counted.sample(), time.perf_counter()
        await asyncio.sleep(opts.heartbeats * opts.heartbeat)
        idle = Processes.delta(before, counted.sample())["floor"] / (time.perf_counter() - t)
        label = f"FLOOR: {len(names)} minimal nats-py processes (namespaces, same relay)"
        table.add("FLOOR: CPU per unchanged heartbeat (receive the HEAD, nothing else)", label,
                  f"{ms(idle * opts.heartbeat / len(names))} per node",
                  "agents stopped; their wireguard-go still up")  # fmt: skip
        pad = "x" * max(size - 40, 0)
        for hosts, what in ((names, f"all {len(names)} nodes"), (pair, "2 nodes")):
            samples, busy = [], 0.0
            for _ in range(opts.runs):
                await asyncio.sleep(opts.heartbeat)
                version += 1
                data = msgspec.json.encode({"version": version, "pad": pad})
                before, start = counted.sample(), time.perf_counter()
                for n in hosts:  # one publisher, one message per node, as the controller's
                    await lab.nc.publish(f"bench.floor.{n}", data)
                try:
                    samples.append(await acks.all_at(hosts, version, opts.limit) - start)
                except TimeoutError:
                    break
                window = time.perf_counter() - start
                busy += Processes.delta(before, counted.sample())["floor"] - idle * window
            note = "" if len(samples) == opts.runs else "; a message not acked"
            measured = (f"p50 {ms(pct(samples, 0.5))}, p99 {ms(pct(samples, 0.99))}"
                        f" (n={len(samples)}{note})") if samples else f"none acked{note}"  # fmt: skip
            table.add("FLOOR: publish → all acks", f"{label}, a {size} B message to {what}",
                      measured, f"the floor's CPU per change beyond idle"
                      f" {ms(busy / max(len(samples), 1))}")  # fmt: skip
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.wait(), 10)


async def real_agents(opts, table: Table) -> None:
    from lab.cluster import Lab  # root only; imported here so the rest runs without it
    from lab.netns import LabError

    want = opts.real_agents
    # health every 5 s, the agent's default (the lab's 1 s would make each of 100 agents read
    # its wireguard-go's 100 peers every second on top of the heartbeat)
    lab = Lab("otsc" + secrets.token_hex(2), heartbeat=opts.heartbeat, mesh=True, secure=False,
              health_interval=5.0)  # fmt: skip
    try:
        start = time.perf_counter()
        try:
            names, steps = await bring_up(lab, want, opts.real_budget)
        except LabError as e:
            table.add("lab bring-up", f"{want} real agents (namespaces)", f"failed: {e}"[:300])
            return
        up = time.perf_counter() - start
        label = f"{len(names)} real agents (namespaces)"
        note = "" if len(names) == want else f" ({want - len(names)} not registered within {opts.real_budget:.0f} s)"  # fmt: skip
        table.add("lab bring-up (all nodes at once, one relay)", label, f"{up:.1f} s{note}",
                  ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))  # fmt: skip
        api = await lab.connect()
        # every node hosts one NIC of "scale"; "pair" spans two nodes only
        await api.network_create("scale", "overlay", "10.77.0.0/16")
        await api.network_create("pair", "overlay", "10.78.0.0/16")
        gate = asyncio.Semaphore(8)

        async def attach(network: str, node: str) -> None:
            async with gate:
                await api.nic_attach(network, node, f"vm-{network}-{node}")

        t = time.perf_counter()
        pair = names[:2]
        await asyncio.gather(
            *(attach("scale", n) for n in names), *(attach("pair", n) for n in pair)
        )
        await lab.wait_converged(timeout=300, nodes=set(names))
        print(f"   {len(names) + 2} NICs attached and converged in {time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
        acks = Watch(ACK, only_ok=True)
        await acks.subscribe(lab.nc)
        await acks.beyond({n: -1 for n in names}, 30)
        procs = await lab_processes(lab)

        # idle: what 100 agents cost the machine per heartbeat
        await asyncio.sleep(2 * opts.heartbeat)
        before, t = procs.sample(), time.perf_counter()
        await asyncio.sleep(opts.heartbeats * opts.heartbeat)
        idle = {
            k: v / (time.perf_counter() - t)
            for k, v in Processes.delta(before, procs.sample()).items()
        }
        per_beat = sum(idle.values()) * opts.heartbeat
        table.add("agents' CPU per unchanged heartbeat (all agents + their wireguard-go)", label,
                  f"{ms(per_beat)} ({ms(per_beat / len(names))} per node; {sum(idle.values()) * 100:.0f} % of a core)",
                  f"agents {ms(idle['agent'] * opts.heartbeat / len(names))} + wireguard-go"
                  f" {ms(idle['wireguard-go'] * opts.heartbeat / len(names))} per node")  # fmt: skip

        rtt = await api_rtt(api, "scale")
        sizes: list[int] = []  # of the change HEADs node n1 gets: the floor's message size

        async def sized(msg) -> None:
            if msgspec.json.decode(msg.data).get("sections"):  # content attached: a change
                sizes.append(len(msg.data))

        await lab.nc.subscribe(DESIRED + pair[0], cb=sized)
        for network, hosts, what in (("scale", names, f"all {len(names)} nodes host it"),
                                     ("pair", pair, "2 of the nodes host it")):  # fmt: skip
            *result, busy = await converge_spaced(api, acks, network, hosts, pair[0], opts, procs, idle)  # fmt: skip
            report_convergence(table, f"{label}, NIC attach/detach, {what}", tuple(result), rtt,
                               f"; CPU from request to last ack beyond idle, per change: agents"
                               f" {ms(busy['agent'])}, their wireguard-go {ms(busy['wireguard-go'])}")  # fmt: skip
        if not opts.no_floor:
            print("-- the floor: minimal nats-py processes in the same namespaces", flush=True)
            await floor(lab, opts, names, pair, int(statistics.median(sizes or [300])), table)
    finally:
        await lab.down()


async def fdb_cold_apply(table: Table, runs: int = 3) -> None:
    """``bench fdb_apply`` at 10,000 entries, the best of ``runs`` for each side."""
    from bench.fdb_apply import measure  # root only

    results = [await measure(10_000) for _ in range(runs)]
    cold = min(r[0] for r in results)
    batch = min(r[3] for r in results)
    writes = results[0][2]
    table.add("cold apply of 10,000 FDB entries (links subsystem: observe, plan, apply)",
              "one agent", f"{ms(cold)} ({writes:,} writes), {cold / batch:.2f}× bridge -batch",
              f"`bridge -batch` of the same entries {ms(batch)} (best of {runs} each)")  # fmt: skip


def agent_steady(table: Table) -> None:
    """Helper G's bench (issue 10 item 5) in its own process, when the tree has it."""
    if not (ROOT / "bench" / "agent_steady.py").exists():
        table.add("agent CPU per unchanged heartbeat at 1,000 / 10,000 FDB entries", "one agent",
                  "not measured here: run `./dev bench agent_steady` (issue 10 item 5)",
                  "msgspec's raw decode of the same message (printed by that bench)")  # fmt: skip
        return
    print("-- agent steady state: bench.agent_steady", flush=True)
    code = "import asyncio, bench.agent_steady as b; asyncio.run(b.main())"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        text = out.stdout.strip() or out.stderr.strip()[-2000:]
    except subprocess.TimeoutExpired:
        text = "did not finish within 300 s"
    print(text, flush=True)
    table.add("agent CPU per unchanged heartbeat at 1,000 / 10,000 FDB entries", "one agent",
              "see `bench agent_steady` output above the table",
              "msgspec raw decode (in that output)")  # fmt: skip


async def main() -> None:
    argv = sys.argv[sys.argv.index("scale") + 1 :] if "scale" in sys.argv else []
    opts = parse([a for a in argv if a not in ("scale",)])
    began = time.perf_counter()
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="otscale-"))
    try:
        print("-- baseline: the controller with an empty intent", flush=True)
        empty = await empty_baseline(opts, work, table)
        for nodes in (int(n) for n in opts.nodes.split(",") if n):
            await controller_side(opts, nodes, work, table, empty)
        if opts.hollow_agents:
            print(f"-- {opts.hollow_agents} hollow agents", flush=True)
            await hollow_agents(opts, work, table)
        if opts.real_agents:
            if os.geteuid() != 0:
                table.add("convergence with real agents", "-", "skipped: needs root")
            else:
                print(f"-- up to {opts.real_agents} real agents", flush=True)
                await real_agents(opts, table)
        if os.geteuid() == 0:
            print("-- cold apply: bench.fdb_apply at 10,000 entries", flush=True)
            await fdb_cold_apply(table)
        agent_steady(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"bus: OPEN (plaintext, no identities); heartbeat {opts.heartbeat} s; {opts.nics} NICs"
          f" per hollow node, 4 overlays per node; one controller on {os.cpu_count()} cores")  # fmt: skip
    print("hollow nodes: records in the store, no agent; HOLLOW agents: the real agent.runner.Agent"
          " on an in-memory kernel, all in the bench's process (like kubemark)")  # fmt: skip
    table.print()
    print(f"wall time: {time.perf_counter() - began:.0f} s")
