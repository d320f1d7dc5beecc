"""Agent CPU per unchanged heartbeat at 1,000 and 10,000 FDB entries, before and after the
steady-state skip, next to msgspec's raw decode of the same message.

Real agent code on a real namespace: ``agent.runner.Agent`` with its links (netlink thread),
nftables (``nft``) and WireGuard (``wireguard-go``, userspace) subsystems, run in a fresh
network namespace and a private mount namespace (wireguard-go's socket), exactly like a lab
agent; only the bus is a stub that keeps the acks. The snapshot: one overlay (bridge + VXLAN)
(two at 10,000 entries: at most 5,000 per VXLAN here) whose FDB spreads over a 50-peer
mesh, plus a NAT bridge network with one tap.

"after": ``Agent(events=KernelEvents)``, the shipped agent: an unchanged heartbeat skips the full
reconcile. "before": the same agent without notifications, which reconciles fully on every
heartbeat (decode, validate, observe, plan) — the old behaviour. CPU is ``time.process_time``
of the process (every thread, the netlink one included; not child processes such as ``nft``)
over ``HEARTBEATS`` calls of ``Agent.handle`` with the same bytes: the HEAD of an unchanged
heartbeat (``schemas.wire``), its sections held by the agent as if fetched before. A change is
the HEAD carrying the changed items as deltas, as the controller attaches them; its same-run
baseline is a like change on the same agent with the change path off (assembled, checked and
planned whole, as before issue 10 item 5). A separate
notification socket (a netlink monitor) checks that the skipped heartbeats wrote nothing.

A second table (``mesh_main``; alone: ``python -m bench.agent_steady --mesh``): one peer joining
and leaving a 1,000-peer mesh (wireguard-go with 1,000 peers), timed on the change path and,
on the same agent and kernel, the whole way, with the UAPI sets counted (and the peers each
names) and the heartbeat after each change.

A third (``tap_main``; alone: ``python -m bench.agent_steady --tap``): one NIC attached to and
detached from this node's NAT network at 1,000 and 10,000 FDB entries, timed the same way, with
nftables' replan from the snapshot (desired + plan, in process) timed alone.

"idle": the agent as it idles in a cluster, over ``--idle`` seconds (default 60) at a 1 s
heartbeat: the same HEAD fed on a 1 s timer, the health loop running at the agent's default
health interval (reports to the stub bus), wireguard-go's supervisor running, on uvloop like
``otherix-agent``. Agent CPU is the process's (every thread) plus its reaped child processes'
(``nft``), per heartbeat; wireguard-go's is read from ``/proc`` (its threads' run time). The
breakdown times each part by the same CPU clock (a nested part is taken out of its parent);
"rest" is what no part covers (event loop, timers, registration). No periodic full reconcile
falls in a window shorter than ``RESYNC_EVERY`` heartbeats: it is timed apart (median of 3) and
added amortised; any other full reconcile in the window is listed with its reason. The window
starts ``SETTLE_SECONDS`` after the devices came up, and the namespace sends nothing into the
mesh (see ``inner``). wireguard-go on its own (nothing reading it, the supervisor stopped) is
measured over ``QUIET_SECONDS`` before. NATS itself (the client's receive and publish) is not in
these figures.
"""

import asyncio
import contextlib
import contextvars
import json
import os
import resource
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lab.netns import netns_add, netns_del, run

HEARTBEATS = 30
CHANGES = 5  # one-entry changes timed per path
SIZES = (1_000, 10_000)
PEERS = 50
PER_VXLAN = 5_000
LAN = "otn0a0b0c0d"
ROOT = Path(__file__).resolve().parents[1]
IDLE_SECONDS = 60.0
SETTLE_SECONDS = 20.0  # from the devices' creation to the idle window
QUIET_SECONDS = 10.0  # wireguard-go with nothing reading it


def snapshot(entries: int, version: int = 1, extra: int = 0):
    from agent.wireguard import keys as wgkeys
    from controller.compute import snapshot_digest
    from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan, WgPeer, WireGuard

    peers = tuple(
        WgPeer(
            public_key=wgkeys.public_key(wgkeys.hex_to_b64(f"{i + 1:064x}")),
            endpoint=f"198.18.0.{i + 2}:51820",
            allowed_ips=(f"100.64.0.{i + 2}/32",),
            node=f"peer{i}",
        )
        for i in range(PEERS)
    )
    overlays = -(-entries // PER_VXLAN)  # the agent takes at most 8,192 per VXLAN device
    vxlans, bridges = [], [Bridge(name=LAN, mtu=1500, address="10.77.0.1/24", network="lan")]
    for k in range(overlays):
        count = min(PER_VXLAN, entries - k * PER_VXLAN) + (extra if k == 0 else 0)
        fdb = [FdbEntry(mac="00:00:00:00:00:00", dst=f"100.64.0.{i + 2}") for i in range(4)]
        fdb += [
            FdbEntry(
                mac=f"02:{k:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01",
                dst=f"100.64.0.{i % PEERS + 2}",
            )  # fmt: skip
            for i in range(count - len(fdb))
        ]
        vni = 1000 + k
        bridges.append(Bridge(name=f"otb{vni}", mtu=1390, network=f"ov{k}"))
        vxlans.append(Vxlan(name=f"otvx{vni}", vni=vni, bridge=f"otb{vni}", local="100.64.0.1",
                            mtu=1390, fdb=tuple(fdb)))  # fmt: skip
    snap = Snapshot(
        node="bench",
        version=version,
        bridges=tuple(bridges),
        taps=(
            Tap(
                name="ot0123456789ab", bridge=LAN, mtu=1500, mac="02:aa:00:00:00:01", ip="10.77.0.2"
            ),
        ),  # fmt: skip
        nat_subnets=("10.77.0.0/24",),
        vxlans=tuple(vxlans),
        wireguard=WireGuard(
            name="otwg0", address="100.64.0.1/16", listen_port=51820, mtu=1440, peers=peers
        ),
        infrastructure=("100.64.0.0/16", "198.18.0.0/24"),
    )
    import msgspec

    return msgspec.structs.replace(snap, digest=snapshot_digest(snap))


class Bus:
    def __init__(self):
        self.published: list[bytes] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append(data)


def cpu_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1000


def change_head(old, new):
    """``new``'s HEAD as the controller sends it after ``old``: each changed section attached as
    a delta from ``old``'s version (the items added or replaced, the keys removed)."""
    import msgspec

    from schemas.wire import Item, SectionData, item_key

    before = {s.name: s for s in old.sections}
    attached = []
    for section in new.sections:
        was = before.get(section.name)
        if was is not None and was.digest == section.digest:
            continue
        had = {bytes(u) for u in was.upserts} if was else set()
        keys = {item_key(msgspec.json.decode(bytes(u), type=Item)) for u in section.upserts}
        removals = tuple(
            k for k in (item_key(msgspec.json.decode(u, type=Item)) for u in had) if k not in keys
        )
        upserts = tuple(u for u in section.upserts if bytes(u) not in had)
        attached.append(
            SectionData(
                name=section.name,
                version=new.version,
                digest=section.digest,
                base=was.version if was else 0,
                upserts=upserts,
                removals=removals,
            )
        )
    return msgspec.structs.replace(new, sections=tuple(attached))


async def heartbeats(agent, raw: bytes, count: int = HEARTBEATS) -> tuple[float, int, int]:
    """Median CPU per ``handle(raw)`` in ms, total writes, acks not ok."""
    samples, writes, failed = [], 0, 0
    for _ in range(count):
        start = time.process_time()
        ack = await agent.handle(raw)
        samples.append(time.process_time() - start)
        writes += ack.changes
        failed += not ack.ok
    return cpu_ms(samples), writes, failed


async def timed_changes(agent, entries: int, last, version: int, after_each):
    """``CHANGES`` one-entry changes, each a HEAD with its delta from ``last``: CPU per
    ``handle`` (samples), total writes, and the last HEAD and version; ``after_each(version,
    heartbeat)`` runs after each change, untimed."""
    import msgspec

    from agent.assemble import head_for
    from schemas.codec import encode

    samples, writes = [], 0
    for _ in range(CHANGES):
        version += 1
        new_head = head_for(snapshot(entries, version=version, extra=version - 1))
        change = encode(change_head(last, new_head))
        start = time.process_time()
        ack = await agent.handle(change)
        samples.append(time.process_time() - start)
        writes += ack.changes
        await after_each(version, encode(msgspec.structs.replace(new_head, sections=())))
        last = new_head
    return samples, writes, last, version


def agent_cpu() -> float:
    """This process's CPU (every thread) plus that of its reaped children (``nft``), seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def daemon_cpu(pid: int) -> float:
    """A process's CPU so far (the run time of each of its threads), seconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass  # a thread that just ended
    return total / 1e9


_part: contextvars.ContextVar[list | None] = contextvars.ContextVar("part", default=None)


class Parts:
    """CPU (``agent_cpu``) per named part of the agent's work: wraps coroutine methods of
    objects; a part called inside another is taken out of its parent (per task)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, attr: str, name) -> None:
        """``name``: the part's name, or a function of the call's result giving it."""
        original = getattr(obj, attr)

        def enter():
            parent, frame = _part.get(), [0.0]
            return parent, frame, _part.set(frame), agent_cpu()

        def leave(parent, frame, token, start, result) -> None:
            _part.reset(token)
            spent = agent_cpu() - start
            if parent is not None:
                parent[0] += spent
            part = name(result) if callable(name) else name
            self.cpu[part] += spent - frame[0]
            self.calls[part] += 1

        async def timed(*args, **kwargs):
            entered, result = enter(), None
            try:
                result = await original(*args, **kwargs)
                return result
            finally:
                leave(*entered, result)

        def timed_sync(*args, **kwargs):
            entered, result = enter(), None
            try:
                result = original(*args, **kwargs)
                return result
            finally:
                leave(*entered, result)

        setattr(obj, attr, timed if asyncio.iscoroutinefunction(original) else timed_sync)


async def idle(agent, raw: bytes, seconds: float, devices_up: float) -> dict:
    """The agent idling over ``seconds`` at a 1 s heartbeat (see the module docstring)."""
    from agent.steady import RESYNC_EVERY

    pid = await agent.wireguard.daemon_pid()
    # wireguard-go on its own: nothing reads it, not even the supervisor (its own timers)
    wg = agent.wireguard
    await wg._stop_supervisor()
    await asyncio.sleep(0.5)
    wg0 = daemon_cpu(pid)
    await asyncio.sleep(QUIET_SECONDS)
    wg_alone = (daemon_cpu(pid) - wg0) / QUIET_SECONDS
    wg._supervisor = asyncio.create_task(wg._supervise())
    # the periodic full reconcile, timed apart
    samples, full = [], Parts()
    full.wrap(agent.links, "observe", "links observe (link and FDB dump)")
    full.wrap(agent.nft, "observe", "nft observe")
    full.wrap(agent.wireguard, "observe", "WireGuard observe")
    full.wrap(agent.links, "plan", "links plan")
    for _ in range(3):
        agent._since_full = RESYNC_EVERY - 1
        start = agent_cpu()
        await agent.handle(raw)
        samples.append(agent_cpu() - start)
    periodic_ms = cpu_ms(samples)
    # the kernel announces each bridge port once more about 15 s after it came up (the bridge's
    # forward delay), which the agent answers with a full reconcile: a node idles long after
    await asyncio.sleep(max(0.0, devices_up + SETTLE_SECONDS - time.monotonic()))
    for obj, attr in ((agent.links, "observe"), (agent.nft, "observe"),
                      (agent.wireguard, "observe"), (agent.links, "plan")):  # fmt: skip
        delattr(obj, attr)
    await asyncio.sleep(1.0)
    await agent.handle(raw)

    parts = Parts()
    reconciled = agent.counters["reconciled"]
    parts.wrap(agent, "handle", "HEAD handling")
    parts.wrap(agent, "check_mesh", "WireGuard check (a UAPI get on every second HEAD)")
    if hasattr(agent.nft, "read_drops"):  # before it, the health loop ran ``observe``
        parts.wrap(agent.nft, "read_drops", "nft drop counters (health)")
    parts.wrap(agent.nft, "observe", "nft observe (both tables; before read_drops, health's too)")
    parts.wrap(agent.links, "observe", "links observe (full reconcile)")
    parts.wrap(agent.wireguard, "peers", "WireGuard peer read (health)")
    parts.wrap(agent, "health", "health report (build)")
    backend = agent.wireguard._backend
    parts.wrap(backend, "alive", "wireguard-go supervisor (alive)")
    published = len(agent.nc.published)
    import agent.runner as runner

    decide, why = runner.decide, []

    def decide_noted(**kwargs):
        mode, reason = decide(**kwargs)
        if mode != "skip":
            why.append(reason)
        return mode, reason

    runner.decide = decide_noted
    agent._since_full = 0  # no periodic reconcile in the window: it is added amortised

    async def feed(beats: int, t0: float) -> None:
        for k in range(beats):
            await asyncio.sleep(max(0.0, t0 + k - time.monotonic()))
            await agent.handle(raw)

    beats = int(seconds)
    t0 = time.monotonic() + 0.05
    cpu0, wg0 = agent_cpu(), daemon_cpu(pid)
    health = None
    try:
        await asyncio.sleep(0.5)  # the health loop half a heartbeat after the HEADs
        health = asyncio.create_task(agent._health_loop())
        await feed(beats, t0)
        await asyncio.sleep(max(0.0, t0 + beats - time.monotonic()))
    finally:
        if health is not None:
            health.cancel()
            await asyncio.gather(health, return_exceptions=True)
    total, wg_cpu = agent_cpu() - cpu0, daemon_cpu(pid) - wg0
    runner.decide = decide
    for attr in ("handle", "check_mesh", "health"):
        delattr(agent, attr)  # the instance wrappers off, the class methods back
    return {
        "beats": beats,
        "full_in_window": agent.counters["reconciled"] - reconciled,
        "why": why,
        "health_reports": len(agent.nc.published) - published - beats,  # the rest are acks
        "agent_ms": total / beats * 1000,
        "periodic_ms": periodic_ms,
        "periodic_parts": {k: v / 3 * 1000 for k, v in full.cpu.items()},
        "resync_every": RESYNC_EVERY,
        "wg_ms": wg_cpu / beats * 1000,
        "wg_alone_ms": wg_alone * 1000,
        "parts": {k: (v / beats * 1000, parts.calls[k]) for k, v in parts.cpu.items()},
    }


async def inner(entries: int, idle_seconds: float = IDLE_SECONDS) -> dict:
    """In the node's namespaces: build the agent, converge, then measure."""
    import msgspec

    from agent.assemble import head_for
    from agent.kernel_events import KernelEvents
    from agent.links.applier import LinkApplier
    from agent.links.netlink import NetlinkLinks
    from agent.netlink_thread import NetlinkThread
    from agent.nft.applier import NftApplier
    from agent.runner import Agent, AgentConfig
    from agent.wireguard import keys as wgkeys
    from agent.wireguard.applier import WireGuardApplier
    from schemas.codec import encode
    from schemas.desired import Snapshot

    await run("ip", "link", "set", "lo", "up")
    # nothing into the mesh: the new bridges' IGMP reports flood over VXLAN to the 50 peers, and
    # wireguard-go would then retry handshakes with them (none exists here) for about 100 s at
    # about 3 ms of CPU per second, hiding what the agent costs it (a table of the bench's own)
    await run("nft", "add table inet bench; add chain inet bench out { type filter hook output "
              "priority 0; oifname otwg0 drop; }")  # fmt: skip
    snap = snapshot(entries)
    head = head_for(snap)
    raw = encode(msgspec.structs.replace(head, sections=()))  # an unchanged heartbeat
    nl = NetlinkThread()
    nl.start()
    links = LinkApplier(NetlinkLinks(nl, node="bench"))
    wg = WireGuardApplier(
        links, private_key=wgkeys.generate_private_key(), backend="userspace", node="bench"
    )
    monitor = KernelEvents.open()  # independent of the agent's: did anything write?
    out: dict = {"entries": entries, "bytes": len(encode(snap)), "head_bytes": len(raw)}
    try:
        with tempfile.TemporaryDirectory() as state:
            agents = {}
            for label, events in (("after", KernelEvents.open()), ("before", None)):
                config = AgentConfig(node="bench", state_dir=Path(state) / label)
                config.state_dir.mkdir()
                agents[label] = Agent(Bus(), config, links, NftApplier(), wg, events=events)
                for section in head.sections:  # held, as if fetched
                    assert agents[label].assembler.offer(section)
            after = agents["after"]
            start = time.perf_counter()
            first = await after.handle(raw)  # cold apply
            out["cold_ms"] = (time.perf_counter() - start) * 1000
            devices_up = time.monotonic()
            assert first.ok, first.error
            await after.handle(raw)  # the heartbeat after a write re-observes
            # the kernel announces link state (a bridge's carrier) for a moment after devices
            # come up; a heartbeat later the node is idle, which is what is measured
            await asyncio.sleep(1.0)
            await after.handle(raw)
            monitor.drain()
            monitor.know(link.index for link in (await links.observe()).links.values())
            cpu, writes, failed = await heartbeats(after, raw)
            out["after_ms"], out["after_writes"], out["after_failed"] = cpu, writes, failed
            out["after_kernel_events"] = monitor.drain()
            out["skipped"] = after.counters["skipped"]
            cpu, writes, failed = await heartbeats(agents["before"], raw, 10)
            out["before_ms"], out["before_writes"], out["before_failed"] = cpu, writes, failed
            samples, whole = [], encode(snap)
            for _ in range(HEARTBEATS):
                start = time.process_time()
                msgspec.json.decode(whole, type=Snapshot)
                samples.append(time.process_time() - start)
            out["decode_ms"] = cpu_ms(samples)
            # changes of one FDB entry each (a new NIC's entry, to a destination the VXLAN
            # has): through the change path, each followed by a heartbeat that verifies it
            await after.handle(raw)  # settle: anything the kernel announced meanwhile is read
            full = after.counters["reconciled"]
            used: list[bool] = []
            change_path = after._fdb_change

            def watched(snap):
                found = change_path(snap)
                used.append(found is not None)
                return found

            after._fdb_change = watched  # type: ignore[method-assign]

            async def first_beats(version: int, beat: bytes) -> None:
                if version == 2:
                    start = time.process_time()
                    ack = await after.handle(beat)
                    out["verify_ms"] = (time.process_time() - start) * 1000
                    out["verify_writes"] = ack.changes
                out["back_to_skip_ms"] = (await heartbeats(after, beat, 3))[0]

            samples, writes, last, version = await timed_changes(
                after, entries, head, 1, first_beats
            )
            out["change_ms"], out["change_writes"] = cpu_ms(samples), writes / CHANGES
            out["change_full"] = after.counters["reconciled"] - full
            out["change_path"] = used.count(True)
            # the same-run baseline: like changes the whole way (assembled, checked and planned
            # whole, as before the change path), on the same agent and kernel
            after._fdb_change = lambda snap: None  # type: ignore[method-assign]

            async def settle(version: int, beat: bytes) -> None:
                await heartbeats(after, beat, 3)

            samples, writes, last, version = await timed_changes(
                after, entries, last, version, settle
            )
            out["whole_ms"], out["whole_writes"] = cpu_ms(samples), writes / CHANGES
            after._fdb_change = change_path  # type: ignore[method-assign]
            beat = encode(msgspec.structs.replace(last, sections=()))  # the version held now
            await heartbeats(after, beat, 3)
            out["idle"] = await idle(after, beat, idle_seconds, devices_up)
            after.events.close()
    finally:
        monitor.close()
        await wg.remove()
        nl.stop()
    return out


def print_idle(entries: int, r: dict) -> None:
    # a window as long as the resync interval has its own periodic reconcile
    amortised = r["periodic_ms"] / r["resync_every"] if r["beats"] < r["resync_every"] else 0.0
    print(
        f"{entries:>6} FDB entries, idle agent over {r['beats']} s at a 1 s heartbeat (HEADs on "
        f"a 1 s timer, health loop at the default interval, {r['health_reports']} reports): "
        f"agent {r['agent_ms'] + amortised:5.2f} ms CPU per heartbeat with its nft children "
        f"({r['agent_ms']:.2f} in the window + the periodic full reconcile "
        f"{r['periodic_ms']:.1f} ms / {r['resync_every']}), wireguard-go {r['wg_ms']:5.2f} ms "
        f"(on its own, nothing reading it: {r['wg_alone_ms']:.2f} ms per second)",
        flush=True,
    )
    if r["why"]:
        print(
            f"         {r['full_in_window']} full reconcile(s) in the window: {', '.join(r['why'])}"
        )
    parts = sorted(r["parts"].items(), key=lambda kv: -kv[1][0])
    rest = r["agent_ms"] - sum(ms for ms, _ in r["parts"].values())
    for name, (ms, calls) in [*parts, ("rest (event loop, timers, registration)", (rest, 0))]:
        print(f"         {ms:6.3f} ms  {name}" + (f" ({calls} calls)" if calls else ""))
    print(
        f"         {amortised:6.3f} ms  periodic full reconcile, amortised (each: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in r["periodic_parts"].items())
        + ")",
        flush=True,
    )


async def main() -> None:
    argv = sys.argv
    idle_seconds = float(argv[argv.index("--idle") + 1]) if "--idle" in argv else IDLE_SECONDS
    sizes = SIZES
    if "--sizes" in argv:  # e.g. --sizes 10000
        sizes = tuple(int(x) for x in argv[argv.index("--sizes") + 1].split(","))
    tag = secrets.token_hex(2)
    print(f"agent CPU per heartbeat (process time, median of {HEARTBEATS}; real netlink, nft "
          f"and wireguard-go in a namespace; {PEERS} mesh peers)", flush=True)  # fmt: skip
    results = []
    for entries in sizes:
        ns = f"otas{tag}"
        await netns_add(ns)
        try:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, "unshare", "-m", "sh", "-c",
                "mkdir -p /run/wireguard && mount -t tmpfs none /run/wireguard && exec \"$0\" \"$@\"",
                sys.executable, "-m", "bench.agent_steady", "--inner", str(entries),
                str(idle_seconds),
                stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 600 + idle_seconds)
        finally:
            await netns_del(ns)
        if proc.returncode != 0:
            raise RuntimeError(f"agent_steady --inner {entries} failed (exit {proc.returncode})")
        r = json.loads(out.decode().strip().splitlines()[-1])
        print(
            f"{r['entries']:>6} FDB entries ({r['bytes'] // 1000} KB state, {r['head_bytes']} B "
            f"HEAD): unchanged heartbeat "
            f"{r['after_ms']:6.2f} ms ({r['after_writes']} writes, kernel events "
            f"{'seen' if r['after_kernel_events'] else 'none'}, {r['skipped']} skipped) vs "
            f"before {r['before_ms']:6.1f} ms; msgspec decode {r['decode_ms']:5.2f} ms; "
            f"one-entry change {r['change_ms']:6.2f} ms ({r['change_writes']:.0f} writes, "
            f"{r['change_full']} of {CHANGES} full, {r['change_path']} by the change path) vs "
            f"the whole path {r['whole_ms']:6.1f} ms ({r['whole_writes']:.0f} writes), "
            f"next heartbeat {r['verify_ms']:6.1f} ms ({r['verify_writes']} writes), "
            f"then {r['back_to_skip_ms']:5.2f} ms; cold apply {r['cold_ms']:7.1f} ms",
            flush=True,
        )
        results.append(r)
    for r in results:
        print_idle(r["entries"], r["idle"])
    await mesh_main()
    await tap_main()


# --- one peer joins / leaves (issue 10 item 5, mesh changes) --------------------------------------

MESH_SIZES = ((1_000, 1_000), (1_000, 10_000))  # (peers, FDB entries)


def mesh_snapshot(peers: int, entries: int, version: int = 1, joined: bool = False):
    """``peers`` mesh peers (plus one more when ``joined``: the node that joins and leaves) and
    ``entries`` FDB entries over the first 50 of them, one overlay per 5,000 entries."""
    from hashlib import sha256

    import msgspec

    from agent.wireguard import keys as wgkeys
    from controller.compute import snapshot_digest
    from schemas.desired import WgPeer

    base = snapshot(entries, version=version)
    mesh = tuple(
        WgPeer(
            public_key=wgkeys.public_key(wgkeys.hex_to_b64(sha256(b"%d" % i).hexdigest())),
            endpoint=f"198.18.{(i + 2) >> 8}.{(i + 2) & 255}:51820",
            allowed_ips=(f"100.64.{(i + 2) >> 8}.{(i + 2) & 255}/32",),
            node=f"peer{i}",
        )
        for i in range(peers + joined)
    )
    wg = msgspec.structs.replace(base.wireguard, peers=mesh)
    snap = msgspec.structs.replace(base, wireguard=wg, infrastructure=("100.64.0.0/16",
                                   "198.18.0.0/16"))  # fmt: skip
    return msgspec.structs.replace(snap, digest=snapshot_digest(snap))


def restamp(head, version: int):
    """``head`` (whole sections) as published at ``version``: every section and ref at it (an
    agent adopts a section it holds at the same digest under the new version)."""
    import msgspec

    from schemas.wire import Ref

    sections = tuple(msgspec.structs.replace(d, version=version) for d in head.sections)
    refs = tuple(Ref(r.name, version, r.digest) for r in head.refs)
    return msgspec.structs.replace(head, version=version, sections=sections, refs=refs)


@contextlib.asynccontextmanager
async def real_agent(head):
    """The shipped agent in this namespace (real netlink, nft and wireguard-go, kernel events
    on) holding the sections of ``head``; yields it and the HEAD alone as a heartbeat's bytes.
    wireguard-go is removed and the netlink thread stopped after."""
    import msgspec

    from agent.kernel_events import KernelEvents
    from agent.links.applier import LinkApplier
    from agent.links.netlink import NetlinkLinks
    from agent.netlink_thread import NetlinkThread
    from agent.nft.applier import NftApplier
    from agent.runner import Agent, AgentConfig
    from agent.wireguard import keys as wgkeys
    from agent.wireguard.applier import WireGuardApplier
    from schemas.codec import encode

    nl = NetlinkThread()
    nl.start()
    links = LinkApplier(NetlinkLinks(nl, node="bench"))
    wg = WireGuardApplier(
        links, private_key=wgkeys.generate_private_key(), backend="userspace", node="bench"
    )
    try:
        with tempfile.TemporaryDirectory() as state:
            config = AgentConfig(node="bench", state_dir=Path(state))
            agent = Agent(Bus(), config, links, NftApplier(), wg, events=KernelEvents.open())
            for section in head.sections:
                assert agent.assembler.offer(section)
            yield agent, encode(msgspec.structs.replace(head, sections=()))
            agent.events.close()
    finally:
        await wg.remove()
        nl.stop()


async def mesh_inner(peers: int, entries: int) -> dict:
    """In the node's namespaces: converge on ``peers`` peers, then one peer joins and leaves
    ``CHANGES`` times each through the change path, then as many times the whole way (the
    change path off: checked and planned whole, as before), on the same agent and kernel."""
    import msgspec

    from agent.assemble import head_for
    from agent.kernel_events import KernelEvents
    from schemas.codec import encode

    await run("ip", "link", "set", "lo", "up")
    heads = {joined: head_for(mesh_snapshot(peers, entries, joined=joined)) for joined in (0, 1)}
    head = heads[0]
    monitor = KernelEvents.open()
    out: dict = {"peers": peers, "entries": entries}
    try:
        async with real_agent(head) as (agent, beat):
            start = time.perf_counter()
            assert (await agent.handle(beat)).ok
            out["cold_ms"] = (time.perf_counter() - start) * 1000
            await agent.handle(beat)
            await asyncio.sleep(1.0)  # the kernel's link announcements after start-up settle
            await agent.handle(beat)
            await agent.handle(beat)
            sets: list[int] = []  # peers named by each UAPI set
            uapi = agent.wireguard._backend.uapi  # type: ignore[union-attr]
            uapi_set = uapi.set

            async def counted(text: str) -> None:
                sets.append(text.count("public_key="))
                await uapi_set(text)

            uapi.set = counted
            change_path = agent._fdb_change
            version, last = 1, head
            for label in ("change", "whole"):
                if label == "whole":
                    agent._fdb_change = lambda snap: None  # type: ignore[method-assign]
                cpu, wall, writes, verify, skip = [], [], 0, [], []
                full, by_path = agent.counters["reconciled"], agent.counters["mesh_changes"]
                sets.clear()
                monitor.drain()
                for i in range(2 * CHANGES):  # join, leave, join, ...
                    version += 1
                    new = restamp(heads[(i + 1) % 2], version)
                    raw = encode(change_head(last, new))
                    start, t0 = time.process_time(), time.perf_counter()
                    ack = await agent.handle(raw)
                    cpu.append(time.process_time() - start)
                    wall.append(time.perf_counter() - t0)
                    assert ack.ok, ack.error
                    writes += ack.changes
                    beat = encode(msgspec.structs.replace(new, sections=()))
                    start = time.process_time()
                    assert (await agent.handle(beat)).ok  # verifies WireGuard's write
                    verify.append(time.process_time() - start)
                    skip.append((await heartbeats(agent, beat, 3))[0] / 1000)
                    last = new
                out[label] = {
                    "join_ms": cpu_ms(cpu[0::2]),
                    "leave_ms": cpu_ms(cpu[1::2]),
                    "wall_ms": cpu_ms(wall),
                    "writes": writes / (2 * CHANGES),
                    "uapi_sets": len(sets) / (2 * CHANGES),
                    "uapi_peers": sum(sets) / (2 * CHANGES),
                    "full": agent.counters["reconciled"] - full,
                    "by_path": agent.counters["mesh_changes"] - by_path,
                    "verify_ms": cpu_ms(verify),
                    "skip_ms": cpu_ms(skip),
                    "kernel_events": bool(monitor.drain()),
                }
            agent._fdb_change = change_path  # type: ignore[method-assign]
    finally:
        monitor.close()
    return out


async def _in_node(*args: str) -> dict:
    """``python -m bench.agent_steady ARGS`` in a fresh network namespace and a private mount
    namespace (wireguard-go's socket), as a lab agent runs; its last line of output, as JSON."""
    ns = f"otam{secrets.token_hex(2)}"
    await netns_add(ns)
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, "unshare", "-m", "sh", "-c",
            "mkdir -p /run/wireguard && mount -t tmpfs none /run/wireguard && exec \"$0\" \"$@\"",
            sys.executable, "-m", "bench.agent_steady", *args,
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 900)
    finally:
        await netns_del(ns)
    if proc.returncode != 0:
        raise RuntimeError(f"agent_steady {' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


async def mesh_main() -> None:
    """The table of one peer joining / leaving: the change path vs the whole path."""
    print(f"one peer joins / leaves ({CHANGES} joins and {CHANGES} leaves, medians; agent "
          "process time, the netlink thread included, wireguard-go not; real netlink, nft and "
          "wireguard-go in a namespace)", flush=True)  # fmt: skip
    print("| peers | FDB entries | path | CPU join / leave | wall | writes | UAPI sets (peers "
          "named) | full reads | next heartbeat | then |", flush=True)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for peers, entries in MESH_SIZES:
        r = await _in_node("--mesh-inner", str(peers), str(entries))
        for label, name in (("change", "change path"), ("whole", "whole path")):
            m = r[label]
            print(
                f"| {peers:,} | {entries:,} | {name} ({m['by_path']} by it) | "
                f"{m['join_ms']:.2f} / {m['leave_ms']:.2f} ms | {m['wall_ms']:.2f} ms | {m['writes']:.0f} | "
                f"{m['uapi_sets']:.0f} ({m['uapi_peers']:.0f}) | {m['full']} | "
                f"{m['verify_ms']:.2f} ms | {m['skip_ms']:.2f} ms |",
                flush=True,
            )


# --- one NIC attached / detached on this node (issue 10 item 5, tap changes) -------------------

TAP_SIZES = (1_000, 10_000)  # FDB entries


def tap_snapshot(entries: int, attached: bool):
    """``snapshot(entries)``, with one more NIC on the NAT network when ``attached``."""
    import msgspec

    from controller.compute import snapshot_digest
    from schemas.desired import Tap

    snap = snapshot(entries)
    if attached:
        nic = Tap(name="ot0123456789ac", bridge=LAN, mtu=1500, mac="02:aa:00:00:00:02",
                  ip="10.77.0.3")  # fmt: skip
        snap = msgspec.structs.replace(snap, taps=(*snap.taps, nic))
    return msgspec.structs.replace(snap, digest=snapshot_digest(snap))


async def tap_inner(entries: int) -> dict:
    """In the node's namespaces: converge on ``entries`` FDB entries, then one NIC is attached
    and detached ``CHANGES`` times each through the change path, then as many times the whole
    way (the change path off), on the same agent and kernel; and nftables' replan alone."""
    import msgspec

    from agent.assemble import head_for
    from schemas.codec import encode

    await run("ip", "link", "set", "lo", "up")
    # nothing into the mesh (see ``inner``)
    await run("nft", "add table inet bench; add chain inet bench out { type filter hook output "
              "priority 0; oifname otwg0 drop; }")  # fmt: skip
    snaps = {k: tap_snapshot(entries, attached=bool(k)) for k in (0, 1)}
    heads = {k: head_for(snap) for k, snap in snaps.items()}
    head = heads[0]
    out: dict = {"entries": entries}
    async with real_agent(head) as (agent, beat):
        for _ in range(2):
            assert (await agent.handle(beat)).ok
        await asyncio.sleep(1.0)  # the kernel's link announcements after start-up settle
        await agent.handle(beat)
        await agent.handle(beat)
        nft_parts = []  # nftables' replan from the snapshot, in process (no ``nft`` run)
        tables = agent.nft._quiet_observed or await agent.nft.observe()
        for _ in range(CHANGES):
            start = time.process_time()
            agent.nft.plan(agent.nft.desired(snaps[1]), tables)
            nft_parts.append(time.process_time() - start)
        out["nft_replan_ms"] = cpu_ms(nft_parts)
        change_path = agent._fdb_change
        version, last = 1, head
        for label in ("change", "whole"):
            if label == "whole":
                agent._fdb_change = lambda snap: None  # type: ignore[method-assign]
            cpu, wall, writes, verify, skip = [], [], 0, [], []
            full, by_path = agent.counters["reconciled"], agent.counters["tap_changes"]
            for i in range(2 * CHANGES):  # attach, detach, attach, ...
                version += 1
                new = restamp(heads[(i + 1) % 2], version)
                raw = encode(change_head(last, new))
                start, t0 = agent_cpu(), time.perf_counter()
                ack = await agent.handle(raw)
                cpu.append(agent_cpu() - start)
                wall.append(time.perf_counter() - t0)
                assert ack.ok, ack.error
                writes += ack.changes
                beat = encode(msgspec.structs.replace(new, sections=()))
                start = agent_cpu()
                assert (await agent.handle(beat)).ok  # the full read after a write
                verify.append(agent_cpu() - start)
                skip.append((await heartbeats(agent, beat, 3))[0] / 1000)
                last = new
            out[label] = {
                "attach_ms": cpu_ms(cpu[0::2]),
                "detach_ms": cpu_ms(cpu[1::2]),
                "wall_ms": cpu_ms(wall),
                "writes": writes / (2 * CHANGES),
                "full": agent.counters["reconciled"] - full,
                "by_path": agent.counters["tap_changes"] - by_path,
                "verify_ms": cpu_ms(verify),
                "skip_ms": cpu_ms(skip),
            }
        agent._fdb_change = change_path  # type: ignore[method-assign]
    return out


async def tap_main() -> None:
    """The table of one NIC attached / detached on this node: the change path vs the whole."""
    print(f"one NIC attached / detached on this node ({CHANGES} of each, medians; agent process "
          "time with its nft runs, the netlink thread included, wireguard-go not; real netlink, "
          f"nft and wireguard-go in a namespace; {PEERS} mesh peers)", flush=True)  # fmt: skip
    print("| FDB entries | path | CPU attach / detach | wall | writes | full reads | next "
          "heartbeat | then | nft replan alone |", flush=True)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for entries in TAP_SIZES:
        r = await _in_node("--tap-inner", str(entries))
        for label, name in (("change", "change path"), ("whole", "whole path")):
            m = r[label]
            print(
                f"| {entries:,} | {name} ({m['by_path']} by it) | "
                f"{m['attach_ms']:.2f} / {m['detach_ms']:.2f} ms | {m['wall_ms']:.2f} ms | "
                f"{m['writes']:.0f} | {m['full']} | {m['verify_ms']:.2f} ms | "
                f"{m['skip_ms']:.2f} ms | {r['nft_replan_ms']:.2f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inner"]:
        import uvloop  # as otherix-agent runs

        print(json.dumps(uvloop.run(inner(int(sys.argv[2]), float(sys.argv[3])))), flush=True)
    elif sys.argv[1:2] == ["--mesh-inner"]:
        print(json.dumps(asyncio.run(mesh_inner(int(sys.argv[2]), int(sys.argv[3])))), flush=True)
    elif sys.argv[1:2] == ["--mesh"]:
        asyncio.run(mesh_main())
    elif sys.argv[1:2] == ["--tap-inner"]:
        print(json.dumps(asyncio.run(tap_inner(int(sys.argv[2])))), flush=True)
    elif sys.argv[1:2] == ["--tap"]:
        asyncio.run(tap_main())
    else:
        asyncio.run(main())
