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
"""

import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from lab.netns import netns_add, netns_del, run

HEARTBEATS = 30
CHANGES = 5  # one-entry changes timed per path
SIZES = (1_000, 10_000)
PEERS = 50
PER_VXLAN = 5_000
LAN = "otn0a0b0c0d"
ROOT = Path(__file__).resolve().parents[1]


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


async def inner(entries: int) -> dict:
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
            after.events.close()
    finally:
        monitor.close()
        await wg.remove()
        nl.stop()
    return out


async def main() -> None:
    tag = secrets.token_hex(2)
    print(f"agent CPU per heartbeat (process time, median of {HEARTBEATS}; real netlink, nft "
          f"and wireguard-go in a namespace; {PEERS} mesh peers)", flush=True)  # fmt: skip
    for entries in SIZES:
        ns = f"otas{tag}"
        await netns_add(ns)
        try:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, "unshare", "-m", "sh", "-c",
                "mkdir -p /run/wireguard && mount -t tmpfs none /run/wireguard && exec \"$0\" \"$@\"",
                sys.executable, "-m", "bench.agent_steady", "--inner", str(entries),
                stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 600)
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
    await mesh_main()


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


async def mesh_inner(peers: int, entries: int) -> dict:
    """In the node's namespaces: converge on ``peers`` peers, then one peer joins and leaves
    ``CHANGES`` times each through the change path, then as many times the whole way (the
    change path off: checked and planned whole, as before), on the same agent and kernel."""
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

    await run("ip", "link", "set", "lo", "up")
    heads = {joined: head_for(mesh_snapshot(peers, entries, joined=joined)) for joined in (0, 1)}
    head = heads[0]
    nl = NetlinkThread()
    nl.start()
    links = LinkApplier(NetlinkLinks(nl, node="bench"))
    wg = WireGuardApplier(
        links, private_key=wgkeys.generate_private_key(), backend="userspace", node="bench"
    )
    monitor = KernelEvents.open()
    out: dict = {"peers": peers, "entries": entries}
    try:
        with tempfile.TemporaryDirectory() as state:
            config = AgentConfig(node="bench", state_dir=Path(state))
            agent = Agent(Bus(), config, links, NftApplier(), wg, events=KernelEvents.open())
            for section in head.sections:
                assert agent.assembler.offer(section)
            beat = encode(msgspec.structs.replace(head, sections=()))
            start = time.perf_counter()
            assert (await agent.handle(beat)).ok
            out["cold_ms"] = (time.perf_counter() - start) * 1000
            await agent.handle(beat)
            await asyncio.sleep(1.0)  # the kernel's link announcements after start-up settle
            await agent.handle(beat)
            await agent.handle(beat)
            sets: list[int] = []  # peers named by each UAPI set
            uapi = wg._backend.uapi  # type: ignore[union-attr]
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
            agent.events.close()
    finally:
        monitor.close()
        await wg.remove()
        nl.stop()
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inner"]:
        print(json.dumps(asyncio.run(inner(int(sys.argv[2])))), flush=True)
    elif sys.argv[1:2] == ["--mesh-inner"]:
        print(json.dumps(asyncio.run(mesh_inner(int(sys.argv[2]), int(sys.argv[3])))), flush=True)
    elif sys.argv[1:2] == ["--mesh"]:
        asyncio.run(mesh_main())
    else:
        asyncio.run(main())
