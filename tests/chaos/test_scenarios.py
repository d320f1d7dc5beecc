"""Chaos scenarios: a lossy, duplicating, reordering bus, kills and a partition, under churn.

One 3-node lab (overlay across all nodes, a VM on each) runs every scenario with the fault proxy
(lab.natsfault) between nats-server and the controller and agents. Every frame the controller
and agents publish feeds a History, whose invariants (applied versions never go down, every ack
names a version published for its node) are checked on every event. Each scenario ends the same
way: faults stop, every node acks the latest version within CONVERGE_HEARTBEATS heartbeats, each
node's kernel equals its desired snapshot exactly (lab.conformance), every write the controller
acknowledged is in its intent, the established VM-to-VM path lost at most MAX_LOSS of its pings
meanwhile, and every NIC attached during the churn is reachable from every VM of its network.

A scenario prints one summary line (seed, heartbeats to converge, data-path loss, invariant
checks); the lines are repeated at the end of the run. OTHERIX_CHAOS_SEED replays a run.
"""

import asyncio
import contextlib
import ipaddress
import os
import random
import signal
import time

import pytest
import pytest_asyncio

from lab.cluster import Lab
from lab.conformance import wait_conformant
from lab.invariants import History, IntentLedger, PingProbe
from lab.netns import alive
from schemas.errors import ApiError
from tests.chaos import report
from tests.chaos.hollow import hollow_nics, hollow_node, write_intent
from tests.e2e.helpers import ensure_network, ensure_vms, lab_fixture, warm_up

pytestmark = [
    pytest.mark.netns,
    pytest.mark.chaos,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

HEARTBEAT = 0.5
NODES = ["n1", "n2", "n3"]
# After the last fault ends: one heartbeat to publish, one to deliver and apply, the rest is slack
# for a 2-core machine running three agents, a controller, nats-server and this test.
CONVERGE_HEARTBEATS = 6
# A partitioned agent first has to reconnect: nats-py's reconnect wait (up to 2 s with jitter).
RECONNECT_HEARTBEATS = 12
MAX_LOSS = 0.02  # the data plane never depends on the bus: any loss is a scheduling hiccup
SEED = int(os.environ.get("OTHERIX_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
OVERLAY, SUBNET = "ov", "10.70.0.0/24"
VMS = {"a1": "n1", "a2": "n2", "a3": "n3"}

lab = lab_fixture(nodes=len(NODES), mesh=True, heartbeat=HEARTBEAT, faults=True)


@pytest_asyncio.fixture(loop_scope="module")
async def chaos(lab: Lab) -> "Chaos":
    await ensure_network(lab, OVERLAY, "overlay", SUBNET)
    await ensure_vms(lab, OVERLAY, VMS)
    await warm_up(lab, list(VMS))
    if not hasattr(lab, "scenarios"):
        proxy = await lab.start_faults(SEED)
        status = await (await lab.connect()).status()
        history = History(start={n.node.name: n.applied_version for n in status.nodes})
        proxy.observe(history.observe)
        lab.scenarios = Chaos(lab, history)
    lab.scenarios.ledger = IntentLedger()
    lab.faults.clear(SEED)
    return lab.scenarios


class Chaos:
    """The operator's side of a scenario: churn through the API (straight to nats-server, never
    faulted), acknowledged writes in a ledger, and the checks every scenario ends with."""

    def __init__(self, lab: Lab, history: History):
        self.lab, self.history = lab, history
        self.ledger = IntentLedger()
        self.rng = random.Random(SEED)
        self.churned: dict[str, tuple[str, str, str, str]] = {}  # vm → nic id, node, mac, ip
        self.serial = 0

    async def api(self):
        return await self.lab.connect()

    async def attach(self, vm: str, node: str, mac: str | None = None, ip: str | None = None):
        nic = (await (await self.api()).nic_attach(OVERLAY, node, vm, mac=mac, ip=ip)).nic
        self.ledger.nic_attached(nic.id, OVERLAY, node)
        self.churned[vm] = (nic.id, node, nic.mac, nic.ip)

    async def detach(self, vm: str) -> tuple[str, str, str, str]:
        nic_id, node, mac, ip = self.churned.pop(vm)
        await (await self.api()).nic_detach(nic_id)
        self.ledger.nic_detached(nic_id)
        return nic_id, node, mac, ip

    async def step(self) -> str:
        """One random change: attach, detach, move a NIC to another node (detach, then attach
        with the same MAC and address, as a live migration does), or a network's life."""
        self.serial += 1
        choice = self.rng.choice(["attach", "attach", "detach", "move", "network"])
        if choice == "detach" and self.churned:
            await self.detach(self.rng.choice(sorted(self.churned)))
        elif choice == "move" and self.churned:
            vm = self.rng.choice(sorted(self.churned))
            _, node, mac, ip = await self.detach(vm)
            await self.attach(vm, self.rng.choice([n for n in NODES if n != node]), mac, ip)
        elif choice == "network":
            api, name = await self.api(), f"tmp{self.serial}"
            await api.network_create(name, "bridge", f"10.71.{self.serial % 250}.0/24")
            self.ledger.network_created(name)
            nic = (await api.nic_attach(name, self.rng.choice(NODES), f"t{self.serial}")).nic
            self.ledger.nic_attached(nic.id, name, nic.node)
            await api.network_delete(name, force=True)
            self.ledger.network_deleted(name)
            self.ledger.nic_detached(nic.id)
        else:
            choice = "attach"
            await self.attach(f"c{self.serial}", self.rng.choice(NODES))
        return choice

    async def churn(self, heartbeats: int, tolerate: bool = False) -> int:
        """Two changes per heartbeat for ``heartbeats`` heartbeats; with ``tolerate``, a write
        the controller did not acknowledge (it is down) is skipped: its outcome is unknown and
        the ledger records only acknowledged writes."""
        done, deadline = 0, time.monotonic() + heartbeats * HEARTBEAT
        while time.monotonic() < deadline:
            try:
                await self.step()
                done += 1
            except ApiError:
                if not tolerate:
                    raise
            await asyncio.sleep(HEARTBEAT / 2)
        return done

    async def settle(self, name: str, probe: PingProbe | None, new_vm: str | None = None) -> int:
        """Faults off; the checks every scenario ends with; the summary line."""
        self.lab.faults.clear()
        self.lab.faults.heal()
        self.lab.faults.unstall()
        heartbeats = await self.history.wait_converged(
            NODES, within_heartbeats=CONVERGE_HEARTBEATS, heartbeat=HEARTBEAT
        )
        await wait_conformant(self.lab, NODES, timeout=10)
        lost = await self.ledger.verify(await self.api())
        assert not lost, "acknowledged intent lost:\n" + "\n".join(lost)
        self.history.assert_ok()
        loss = "n/a"
        if probe is not None:
            result = await probe.stop()
            loss = f"{result.loss:.1%} ({result.lost}/{result.sent})"
            assert result.loss <= MAX_LOSS, f"{name}: data path lost {loss}"
        if new_vm is not None:
            await self.reachable_from_all(new_vm)
        report.add(
            f"{name}: seed={SEED} converged in {heartbeats} heartbeat(s), data-path loss {loss},"
            f" {self.history.checks} invariant checks, {self.ledger.writes} acknowledged writes"
        )
        return heartbeats

    async def reachable_from_all(self, vm: str) -> None:
        """Within one heartbeat: a single ping from every other VM of the overlay gets through."""
        ip = self.lab.vms[vm].ip
        others = [v for v in VMS if v != vm]
        results = await asyncio.gather(
            *(self.lab.ping(v, ip, count=1, timeout=max(1, HEARTBEAT * 2)) for v in others)
        )
        assert all(results), (
            f"{vm} ({ip}) not reached from {dict(zip(others, results, strict=True))}"
        )

    def probe(self) -> PingProbe:
        """The established path: a1 (n1) → a2 (n2), across the overlay and the mesh."""
        return PingProbe(self.lab.vms["a1"].netns, self.lab.vms["a2"].ip, interval=0.1)


async def _vm_during(chaos: Chaos, vm: str, node: str) -> None:
    """A real VM attached while faults are on (its node may not ack yet)."""
    with contextlib.suppress(KeyError):
        await chaos.lab.vm_rm(vm)
    await chaos.lab.vm_add(vm, OVERLAY, node)


async def test_lossy_bus_under_churn(chaos: Chaos):
    """30 % of snapshots (on their way to agents) and 30 % of acks (on their way to the
    controller) dropped for 20 heartbeats while NICs are attached, detached and moved and a
    network is created and deleted."""
    faults = chaos.lab.faults
    faults.add_rule("drop", "otherix.v1.desired.*", direction="to_client", p=0.3)
    faults.add_rule("drop", "otherix.v1.ack.*", direction="to_server", p=0.3)
    async with chaos.probe() as probe:
        churn = asyncio.create_task(chaos.churn(20))
        await _vm_during(chaos, "v1", "n3")
        await churn
        stats = faults.stats()
        await chaos.settle("lossy bus under churn", probe, new_vm="v1")
    dropped = sum(r["dropped"] for r in stats["rules"])
    assert dropped > 0, stats  # the faults really happened


async def test_duplicated_and_reordered(chaos: Chaos):
    """Snapshots duplicated and delayed by up to three heartbeats, so older versions arrive
    after newer ones; acks duplicated. Applied versions must never go down."""
    faults = chaos.lab.faults
    faults.add_rule("delay", "otherix.v1.desired.*", direction="to_client", p=0.4,
                    delay=HEARTBEAT / 2, jitter=HEARTBEAT * 2.5)  # fmt: skip
    faults.add_rule("duplicate", "otherix.v1.desired.*", direction="to_client", p=0.5, copies=3)
    faults.add_rule("duplicate", "otherix.v1.ack.*", direction="to_server", p=0.5, copies=3)
    async with chaos.probe() as probe:
        churn = asyncio.create_task(chaos.churn(20))
        await _vm_during(chaos, "v2", "n2")
        await churn
        await asyncio.sleep(HEARTBEAT * 3.5)  # let every delayed frame land before judging
        stats = faults.stats()
        await chaos.settle("duplicated and reordered", probe, new_vm="v2")
    assert sum(r["delayed"] for r in stats["rules"]) > 0, stats
    assert sum(r["duplicated"] for r in stats["rules"]) > 0, stats


async def test_node_partitioned_then_healed(chaos: Chaos):
    """n3 cut off from NATS for 30 heartbeats while the operator keeps changing things: n1 and
    n2 converge meanwhile, n3's data plane keeps forwarding, and after the heal n3 catches up."""
    lab = chaos.lab
    probe = PingProbe(lab.vms["a3"].netns, lab.vms["a1"].ip, interval=0.1)
    async with probe:
        cut_at = time.monotonic()
        assert lab.faults.partition("n3") > 0
        await chaos.churn(15)
        others = await chaos.history.wait_converged(
            ["n1", "n2"], within_heartbeats=CONVERGE_HEARTBEATS, heartbeat=HEARTBEAT
        )
        await asyncio.sleep(max(0.0, cut_at + 30 * HEARTBEAT - time.monotonic()))
        assert not chaos.history.converged("n3"), "n3 followed the churn through a partition"
        lab.faults.heal("n3")
        heartbeats = await chaos.history.wait_converged(
            NODES, within_heartbeats=RECONNECT_HEARTBEATS, heartbeat=HEARTBEAT
        )
        await chaos.settle("node partitioned for 30 heartbeats", probe)
    report.add(
        f"  (n1, n2 converged during the partition in {others}; n3 after heal in {heartbeats})"
    )


async def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not alive(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pid {pid} survived SIGKILL")


def _pid(lab: Lab, name: str) -> int:
    return int((lab.state_dir / f"{name}.pid").read_text().split()[0])


@pytest.mark.parametrize(
    "victims", [("controller",), ("nats-server",), ("controller", "nats-server")]
)
async def test_killed_mid_churn(chaos: Chaos, victims: tuple[str, ...]):
    """SIGKILL the controller, nats-server (restarted on its JetStream store) or both while the
    operator is changing things; nothing acknowledged is lost, the data plane keeps going."""
    lab = chaos.lab
    async with chaos.probe() as probe:
        churn = asyncio.create_task(chaos.churn(12, tolerate=True))
        await asyncio.sleep(HEARTBEAT * 4)
        if "nats-server" in victims:
            await lab.close()  # the lab's own client would reconnect on its own; start clean
        for victim in victims:
            await _kill(_pid(lab, victim))
        await asyncio.sleep(HEARTBEAT * 4)  # down for four heartbeats
        if "nats-server" in victims:
            await lab.start_nats()
        if "controller" in victims:
            await lab.start_controller(wait=False)
        await lab.wait_api(timeout=30)
        await churn
        await chaos.settle(f"{' and '.join(victims)} SIGKILLed mid-churn", probe)


async def test_agent_killed_mid_large_apply(chaos: Chaos):
    """n1 receives a snapshot with thousands of new FDB entries and its agent is SIGKILLed while
    writing them; restarted, it completes the state without deleting (or re-adding) anything
    that was already correct."""
    lab, api = chaos.lab, await chaos.api()
    count, net, subnet = 4000, "big", "10.72.0.0/16"
    await ensure_network(lab, net, "overlay", subnet)
    if not [n for n in await api.nic_list(network=net) if n.nic.node == "n1"]:
        await api.nic_attach(net, "n1", "big-vm")
    await lab.wait_converged()
    vni = (await api.network_show(net)).network.vni
    vxlan = f"otvx{vni}"

    # thousands of NICs on a hollow node, written to the store as a restarted controller finds them
    await lab.stop_controller()
    tunnel = str(ipaddress.ip_network("100.64.0.0/16")[-2])
    hollow = hollow_node("hollow1", "198.18.0.200", tunnel)
    nc = await lab.nats_client("controller")
    try:
        await write_intent(nc, hollow, hollow_nics(net, subnet, hollow.name, count))
    finally:
        await nc.close()

    await lab.start_controller(wait=False)
    async with FdbMonitor(lab, "n1", complete=False) as before_kill:
        # the first hollow entry in the kernel: n1's agent is applying; freeze it right there
        await before_kill.wait_for(b"02:ee:", timeout=30)
        os.kill(lab.agent_pid("n1"), signal.SIGSTOP)
        await lab.kill_agent("n1")
    present = await _hollow_fdb(lab, vxlan)
    assert 0 < len(present) < 2 * count, f"agent not caught mid-apply: {len(present)} entries"
    async with FdbMonitor(lab, "n1") as after:
        await lab.start_agent("n1")
        heartbeats = await chaos.history.wait_converged(
            NODES, within_heartbeats=CONVERGE_HEARTBEATS * 4, heartbeat=HEARTBEAT
        )
        await wait_conformant(lab, ["n1"], timeout=20)
    deleted = [e for e in after.lines if e.startswith("Deleted") and vxlan in e]
    readded = [e for e in after.lines if _fdb_key(e) in present]
    assert not deleted, f"restarted agent deleted correct entries: {deleted[:5]}"
    assert not readded, f"restarted agent re-added entries that were there: {readded[:5]}"
    assert len(await _hollow_fdb(lab, vxlan)) == 2 * count  # a VXLAN and a bridge entry each
    report.add(
        f"agent SIGKILLed mid-apply: seed={SEED} killed with {len(present)} of {2 * count} FDB"
        f" entries written, converged in {heartbeats} heartbeat(s) after restart, 0 deleted,"
        f" 0 re-added, {chaos.history.checks} invariant checks"
    )
    # leave the lab as the other scenarios expect it
    await api.node_remove("hollow1", force=True)
    await api.network_delete(net, force=True)
    await lab.wait_converged()
    chaos.history.assert_ok()


def _fdb_key(line: str) -> tuple[str, str]:
    """An FDB entry as (MAC, kind): the VXLAN's own entry (MAC → tunnel) or the bridge's
    (MAC → the VXLAN port); the agent writes both for every remote MAC."""
    return line.split()[0], "bridge" if " master " in line else "vxlan"


async def _hollow_fdb(lab: Lab, vxlan: str) -> set[tuple[str, str]]:
    out = await lab.exec_node("n1", "bridge", "fdb", "show", "dev", vxlan)
    return {_fdb_key(line) for line in out.splitlines() if line.startswith("02:ee:")}


class FdbMonitor:
    """``bridge monitor fdb`` in a node namespace, read continuously (a full pipe would make the
    kernel drop events); refuses to vouch for anything if the kernel dropped some anyway."""

    def __init__(self, lab: Lab, node: str, complete: bool = True):
        self.complete = complete  # every event matters (not just the first of a kind)
        self.argv = ["ip", "netns", "exec", lab.node_netns(node), "bridge", "monitor", "fdb"]
        self.lines: list[str] = []
        self.seen = asyncio.Event()
        self.wanted = b""

    async def __aenter__(self) -> "FdbMonitor":
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self.reader = asyncio.create_task(self._read())
        await asyncio.sleep(0.2)  # the monitor's socket is bound before anything happens
        return self

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode().strip())
            if self.wanted and self.wanted in line:
                self.seen.set()

    async def wait_for(self, text: bytes, timeout: float) -> None:
        self.wanted = text
        if any(text.decode() in line for line in self.lines):
            return
        await asyncio.wait_for(self.seen.wait(), timeout)

    async def __aexit__(self, *exc) -> None:
        await asyncio.sleep(0.5)  # the last events reach the pipe
        self.proc.terminate()
        await self.reader
        err = await self.proc.stderr.read()
        await self.proc.wait()
        if self.complete:
            assert b"No buffer space" not in err, "bridge monitor lost events; the check is void"


async def test_detach_then_attach_reusing_an_address(chaos: Chaos):
    """The VMs' ARP caches hold a NIC's MAC; the NIC goes, a new one comes with the same address
    and a new MAC: every VM reaches it within one heartbeat of its node's ack."""
    lab, api = chaos.lab, await chaos.api()
    with contextlib.suppress(KeyError):
        await lab.vm_rm("r2")
    old = await lab.vm_add("r1", OVERLAY, "n3")
    await lab.wait_converged()
    for vm in VMS:  # fill every VM's ARP cache with r1's MAC
        assert await lab.ping(vm, old.ip, timeout=5)
    await lab.vm_rm("r1")
    await lab.wait_converged()
    new = await lab.vm_add("r2", OVERLAY, "n1", ip=old.ip)
    assert new.mac != old.mac
    await lab.wait_converged()
    await chaos.reachable_from_all("r2")
    report.add(f"detach-then-attach at {old.ip}: reachable from {len(VMS)} VMs on the first ping")
    await api.status()
