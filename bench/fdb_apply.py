"""Cold apply of an overlay snapshot with 1,000 and 10,000 FDB entries, next to `bridge -batch`.

Both sides run in fresh namespaces made here: the agent's links subsystem, observe → plan →
apply (creating bridge, VXLAN and every FDB entry from scratch), and `ip link add` + `bridge -batch` loading the
same entries. Each unicast (remote NIC) MAC is two kernel entries: the VXLAN device's (MAC → dst)
and the bridge's static one on the VXLAN port (learning off), so `bridge -batch` loads both too.
Also the steady-state cost: a no-op heartbeat (observe + plan, zero writes).
"""

import asyncio
import secrets
import tempfile
import time

from agent.links.applier import LinkApplier
from agent.links.netlink import NetlinkLinks
from agent.netlink_thread import NetlinkThread
from lab.netns import netns_add, netns_del, run
from schemas.desired import Bridge, FdbEntry, Snapshot, Vxlan

FLOOD = "00:00:00:00:00:00"


def snapshot(entries: int) -> Snapshot:
    fdb = [
        FdbEntry(mac="00:00:00:00:00:00", dst=f"100.64.{i // 250}.{i % 250 + 1}") for i in range(4)
    ]
    fdb += [
        FdbEntry(
            mac=f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01",
            dst=f"100.64.{i % 16}.{i % 250 + 1}",
        )  # fmt: skip
        for i in range(entries - len(fdb))
    ]
    return Snapshot(
        node="bench",
        version=1,
        bridges=(Bridge(name="otb1000", mtu=1390),),
        vxlans=(
            Vxlan(
                name="otvx1000",
                vni=1000,
                bridge="otb1000",
                local="100.64.0.1",
                mtu=1390,
                fdb=tuple(fdb),
            ),
        ),
    )


async def agent_cold(ns: str, snap: Snapshot) -> tuple[float, float, int]:
    nl = NetlinkThread(netns=ns)
    nl.start()
    links = LinkApplier(NetlinkLinks(nl))
    try:
        start = time.perf_counter()
        result = await links.apply(links.plan(snap, await links.observe()))
        cold = time.perf_counter() - start
        assert not result.errors, result.errors[:3]
        start = time.perf_counter()
        noop = links.plan(snap, await links.observe())
        steady = time.perf_counter() - start
        assert noop.actions == (), noop.actions[:3]
        return cold, steady, result.writes
    finally:
        nl.stop()


async def bridge_batch(ns: str, snap: Snapshot) -> float:
    vx = snap.vxlans[0]
    lines = [f"fdb append {e.mac} dev {vx.name} dst {e.dst} self permanent" for e in vx.fdb]
    lines += [f"fdb replace {e.mac} dev {vx.name} master static" for e in vx.fdb if e.mac != FLOOD]
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        start = time.perf_counter()
        await run("ip", "-n", ns, "link", "add", "otb1000", "mtu", "1390", "type", "bridge")
        await run("ip", "-n", ns, "link", "add", "otvx1000", "mtu", "1390", "type", "vxlan", "id", "1000",
                  "local", "100.64.0.1", "dstport", "4789", "nolearning")  # fmt: skip
        await run("ip", "-n", ns, "link", "set", "otvx1000", "master", "otb1000", "up")
        await run(
            "ip", "-n", ns, "link", "set", "otvx1000", "type", "bridge_slave", "learning", "off"
        )
        await run("ip", "-n", ns, "link", "set", "otb1000", "up")
        await run("bridge", "-n", ns, "-batch", f.name, timeout=300)
        elapsed = time.perf_counter() - start
    count = len((await run("bridge", "-n", ns, "fdb", "show", "dev", "otvx1000")).splitlines())
    assert count >= len(lines), count
    return elapsed


async def measure(entries: int) -> tuple[float, float, int, float]:
    """(agent cold apply s, no-op heartbeat s, writes, ``bridge -batch`` s) in fresh namespaces."""
    tag = secrets.token_hex(2)
    snap = snapshot(entries)
    ns_agent, ns_batch = f"otbf{tag}-a", f"otbf{tag}-b"
    await netns_add(ns_agent)
    await netns_add(ns_batch)
    try:
        cold, steady, writes = await agent_cold(ns_agent, snap)
        batch = await bridge_batch(ns_batch, snap)
    finally:
        await netns_del(ns_agent)
        await netns_del(ns_batch)
    return cold, steady, writes, batch


async def main() -> None:
    for entries in (1_000, 10_000):
        cold, steady, writes, batch = await measure(entries)
        print(f"{entries:>6} FDB entries: agent cold apply {cold * 1000:8.1f} ms ({writes} writes), "
              f"bridge -batch {batch * 1000:8.1f} ms, ratio {cold / batch:4.2f}x; "
              f"no-op heartbeat (observe+plan) {steady * 1000:6.1f} ms, 0 writes", flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
