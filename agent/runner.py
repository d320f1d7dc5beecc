"""The agent's main loop (on the NATS / uvloop side): register, receive, apply, ack, report.

Only the newest HEAD is kept (a slow apply never builds a backlog). Each HEAD is checked
(``agent.validate.accept_head``), the state it names is assembled from the sections it carries,
holds or fetches with ``section.get`` (``agent.assemble``) and checked whole
(``agent.validate.check_snapshot``), then each subsystem (WireGuard, links + FDB, nftables) is reconciled
against what the kernel has *now* (``agent.subsystem``: observe → plan → apply), and an ack says
which version the data plane holds; its error text is built here, from the typed errors.
Silence from the controller changes nothing: the data plane keeps its last good state.

The steady state (``agent.steady`` decides): while the kernel's notifications
(``agent.kernel_events``) show nothing of ours changed since the last full read of the kernel, a
heartbeat with the content last reconciled is skipped (no decode, no validation, no dump, no
write; only WireGuard, which has no notifications, is read; a change HEAD right after a read
that found the device as desired leaves it out), and a new snapshot is
planned against that read; writes of FDB entries, taps and our ``nft -f`` load are then known
without a dump when the notifications since are their echoes alone (``_advance``). Health
counts heartbeats skipped (no full read) and full ones.

A change costs what it changes: when a HEAD only gains and loses FDB entries of the snapshot
last applied cleanly (``agent.assemble.Assembler.change``), only those entries are checked
(``agent.validate.check_fdb_change``; anything it is not sure of goes through the whole check,
so refusals read the same) and, in a quiet heartbeat, planned (``Subsystem.plan_change``; a
subsystem they do not concern is not planned at all). The same for a HEAD whose mesh gained,
lost or changed peers (a node joined, left or moved): only those peers are checked
(``agent.validate.check_change``), and WireGuard sets only them (``apply_change``: one UAPI
set), while links and nftables, which do not read the mesh's peers, are not planned. And for
a HEAD that also gains and loses taps of this node (a VM's NIC attached or detached): only those
taps are checked, links plan only them (``agent.links.plan.plan_tap_change``: no FDB is
compared), and nftables, whose port security reads the taps, is planned whole from the snapshot
against the tables it last read (no ``nft list``). The taps written and their bridges are then
read back (``links.observe_devices``) and must be as the snapshot wants them
(``agent.links.plan.settle``); any other notification, or a read that differs, makes the next
heartbeat a full read.
"""

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client

from agent.announce import Announcer
from agent.assemble import Assembler, BadSection, FdbChange, MeshChange, TapChange, complete
from agent.errors import ApplyError, ApplyResult
from agent.kernel_events import Echoes, KernelEvents, NoDrift, fdb_echo
from agent.links.applier import LinkApplier
from agent.links.fdb_socket import NUD_NOARP, NUD_PERMANENT
from agent.links.model import AddFdb, AddPortFdb, DelPortFdb, FdbAction, LinkPlan, Observed
from agent.links.plan import advance, settle, written_devices
from agent.logs import FailureLog, NodeLog
from agent.metrics import NO_METRICS
from agent.nft.applier import NftApplier
from agent.state import AppliedState, load_applied, save_applied
from agent.steady import FULL, QUIET, SKIP, decide, same_snapshot
from agent.subsystem import Subsystem
from agent.validate import (
    Checked,
    Rejected,
    accept_head,
    check_change,
    check_snapshot,
    same_content,
)
from client.api import ApiClient, ApiError
from schemas import naming
from schemas.bus import cancel_and_wait
from schemas.codec import encode
from schemas.desired import Snapshot
from schemas.messages import Ack, Health, clip
from schemas.wire import SectionData, SectionGet

log = logging.getLogger(__name__)

# seconds: health refreshes the drop counters unless a reconcile read them this recently (a
# counters-only netlink dump, ``NftApplier.read_drops``: cheap enough for every report)
DROPS_MAX_AGE = 1.0


@dataclass
class Change:
    """A HEAD that differs from the snapshot last applied cleanly (``base``) only by these FDB
    entries (per VXLAN), these peers (``mesh``: None when the mesh is the same) and these taps
    (``taps``: None when they are the same), checked by ``agent.validate.check_change``
    (``checked``: as ``check_snapshot`` would return)."""

    fdb: dict[str, FdbChange]
    mesh: MeshChange | None
    base: Snapshot
    checked: Checked
    taps: TapChange | None = None


@dataclass
class AgentConfig:
    node: str
    state_dir: Path
    underlay_ip: str | None = None
    wg_listen_port: int = naming.WIREGUARD_PORT
    health_interval: float = 5.0


class Agent:
    metrics = NO_METRICS  # agent.metrics.AgentMetrics.watch sets the real one

    def __init__(
        self,
        nc: Client,
        config: AgentConfig,
        links: LinkApplier,
        nft: NftApplier,
        wireguard=None,
        announcer: Announcer | None = None,
        events: KernelEvents | NoDrift | None = None,
    ):
        self.nc, self.config = nc, config
        self.links, self.nft, self.wireguard = links, nft, wireguard
        # in this order: the mesh first, then the devices and FDB riding on it, then nftables
        self.subsystems: list[Subsystem] = (
            [links, nft] if wireguard is None else [wireguard, links, nft]
        )
        self.log = NodeLog(log, config.node)
        self.failures = FailureLog(self.log)
        # gratuitous ARP for new NICs (issue 9); agent.main passes one, tests may leave it out
        self.announcer = announcer
        # kernel notifications; without them every heartbeat is a full reconcile
        self.events = events
        self.applied: AppliedState = load_applied(config.state_dir)
        self.assembler = Assembler(config.node)  # the sections held, in memory only
        self.api = ApiClient(nc, timeout=2.0)
        self.started_at = time.time()
        self.counters = {"received": 0, "applied": 0, "rejected": 0, "apply_errors": 0,
                         "fetches": 0, "skipped": 0, "reconciled": 0,
                         "fdb_changes": 0, "mesh_changes": 0, "tap_changes": 0}  # fmt: skip
        self.last_error: str | None = None
        self.last_snapshot_at = 0.0
        self.devices = 0
        self._reached: dict[str, frozenset[str]] = {}  # managed devices each subsystem last reached
        self.taps: dict[str, bool] = {}  # this node's taps → carrier, as last observed
        self.tunnel_address: str | None = None
        self.registered = False
        self._snapshot_gap = 1.0  # recent time between snapshots: how long silence may last
        self._latest: bytes | None = None
        self._wakeup = asyncio.Event()
        self._report_now = asyncio.Event()  # health at once: a tap appeared, went or got carrier
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        # the steady state (agent.steady): the last snapshot reconciled without an error (and its
        # bytes), the kernel as the last full reconcile read it, whether every heartbeat since
        # was clean (no error, no write) and how many heartbeats ago that read was
        self._last: tuple[bytes, Snapshot] | None = None
        self._seen: Observed | None = None
        self._clean = False
        self._since_full = 0
        self._writes: dict[str, int] = {}  # per subsystem, in the last reconcile
        self._peer_writes = False  # WireGuard's writes then were peers only (``apply_change``)
        # WireGuard has no notifications: every heartbeat reads the device; a change HEAD just
        # after a read that found it as desired does not
        self._wg_read_last = False
        # the snapshot being applied as assembled and checked, and the last one applied cleanly
        self._assembled: tuple[Snapshot, Checked] | None = None
        self._base: tuple[Snapshot, Checked] | None = None

    async def start(self) -> None:
        # a bounded queue: only the newest snapshot matters, and a flood of duplicates beyond
        # this is dropped (counted as slow-consumer messages), never kept in memory
        self._sub = await self.nc.subscribe(
            naming.desired_subject(self.config.node),
            cb=self._on_snapshot,
            pending_msgs_limit=64,
            pending_bytes_limit=32 * 2**20,
        )
        self._tasks = [
            asyncio.create_task(self._worker(), name="apply"),
            asyncio.create_task(self._health_loop(), name="health"),
            asyncio.create_task(self._registration(), name="register"),
        ]
        log.info("agent %s: started, applied version %d", self.config.node, self.applied.version)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self.announcer is not None:
            await self.announcer.close()
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self.events is not None:
            self.events.close()

    async def farewell(self, timeout: float = 2.0) -> bool:
        """On SIGTERM: a last ack of the version the data plane holds (with its digest) and a
        last health report, flushed within ``timeout``; nothing in the kernel is touched, so the
        controller learns where this node stands and VMs keep forwarding. True if flushed."""
        applied = self.applied
        ack = Ack(
            node=self.config.node,
            version=applied.version,
            applied_version=applied.version,
            digest=applied.digest,
            ok=self.last_error is None,
            error=clip(self.last_error),
            sent_at=time.time(),
        )
        try:
            async with asyncio.timeout(timeout):
                await self._ack(ack)
                await self.nc.publish(
                    naming.health_subject(self.config.node), encode(await self.health())
                )
                await self.nc.flush(timeout=max(timeout / 2, 0.1))
        except Exception as e:  # a bus that is down must not keep the agent from exiting
            log.warning("agent %s: last ack not flushed: %s", self.config.node, e or "timeout")
            return False
        log.info("agent %s: last ack sent (version %d)", self.config.node, applied.version)
        return True

    # --- registration ---------------------------------------------------------------------------

    def registration(self) -> dict:
        fields: dict = {"name": self.config.node, "underlay_ip": self.config.underlay_ip}
        if self.wireguard is not None:  # only built with an underlay address (agent.main)
            fields.update(
                wg_public_key=self.wireguard.public_key, wg_listen_port=self.config.wg_listen_port
            )
        return fields

    def silent(self, now: float) -> bool:
        """No snapshot for several heartbeats: the controller may not know this node (removed,
        or its store lost); registering again is cheap, idempotent and brings it back."""
        return now - self.last_snapshot_at > max(3 * self._snapshot_gap, 2.0)

    async def _registration(self) -> None:
        """Register at start (a request/reply round trip is the positive signal), then again
        whenever snapshots stop coming; a refusal is logged once, with what to do about it."""
        client, delay, refused = ApiClient(self.nc, timeout=2.0), 0.2, None
        while True:
            if self.registered and not self.silent(time.time()):
                await asyncio.sleep(min(self._snapshot_gap, 1.0))
                continue
            try:
                await client.node_register(**self.registration())
            except ApiError as e:
                if e.code < 500:  # refused: retry slowly, an admin may fix it meanwhile
                    if str(e) != refused:
                        self.log.error("registration refused: %s", e)
                    refused, delay = str(e), 5.0
                    self.last_error = f"registration refused: {e}"
                else:
                    self.log.warning("registration failed (%s); retrying in %.1fs", e, delay)
                    delay = min(delay * 2, 5.0)
                await asyncio.sleep(delay)
                continue
            if not self.registered or refused:
                self.log.info("registered")
            if refused and self.last_error and self.last_error.startswith("registration"):
                self.last_error = None
            self.registered, refused, delay = True, None, 0.2
            self.last_snapshot_at = max(self.last_snapshot_at, time.time())  # give it time

    # --- snapshots ------------------------------------------------------------------------------

    async def _on_snapshot(self, msg) -> None:
        now = time.time()
        if self.last_snapshot_at:
            self._snapshot_gap = min(max(now - self.last_snapshot_at, 0.05), 60.0)
        self.last_snapshot_at = now
        self.counters["received"] += 1
        self._latest = msg.data  # newer replaces older: no backlog
        self._wakeup.set()

    async def _worker(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            raw, self._latest = self._latest, None
            if raw is None:
                continue
            try:
                await self.handle(raw)
            except Exception as e:  # never let one bad apply kill the loop
                self.log.exception("apply crashed")
                self.metrics.head_done("failed")
                await self._ack(
                    Ack(
                        node=self.config.node,
                        version=0,
                        applied_version=self.applied.version,
                        ok=False,
                        error=clip(f"internal error: {e}"),
                    )
                )

    async def _fetch(self, req: SectionGet) -> SectionData:
        self.counters["fetches"] += 1
        return await self.api.section_get(req)

    async def _refuse(self, e: Rejected) -> Ack:
        self.counters["rejected"] += 1
        self.metrics.refused(e)
        self.last_error = str(e)
        log.warning("agent %s: snapshot refused: %s", self.config.node, e)
        ack = Ack(
            node=self.config.node,
            version=e.version,
            applied_version=self.applied.version,
            ok=False,
            error=clip(str(e)),
            sent_at=time.time(),
        )
        await self._ack(ack)
        return ack

    async def handle(self, raw: bytes) -> Ack | None:
        """One HEAD: assemble, check, reconcile, ack. None when a section moved on while it was
        fetched (a newer HEAD is on its way; the data plane is left as it is). A HEAD with the
        content last reconciled (an unchanged heartbeat's HEAD is the same bytes) is neither
        decoded nor assembled nor validated again."""
        self.metrics.head_started()
        last_raw, last = self._last or (None, None)
        if self.events is not None and last is not None and same_content(raw, last_raw, last):
            return await self.apply_snapshot(last, raw, same=True)
        try:
            head = accept_head(raw, self.config.node, self.applied.version)
        except Rejected as e:
            return await self._refuse(e)
        try:
            snap = await complete(self.assembler, head, self._fetch)
        except (ApiError, BadSection) as e:  # the data plane keeps its state; next HEAD retries
            self.counters["apply_errors"] += 1
            self.metrics.head_done("incomplete")
            self.last_error = f"version {head.version}: sections not complete: {e}"
            log.warning("agent %s: %s", self.config.node, self.last_error)
            ack = Ack(
                node=self.config.node,
                version=head.version,
                applied_version=self.applied.version,
                ok=False,
                error=clip(self.last_error),
                sent_at=time.time(),
            )
            await self._ack(ack)
            return ack
        if snap is None:
            self.metrics.head_done("incomplete")
            log.debug(
                "agent %s: version %d moved on while fetching", self.config.node, head.version
            )
            return None
        change = self._fdb_change(snap)
        checked = change.checked if change is not None else None
        if checked is None:
            try:
                checked = check_snapshot(snap, known=last)
            except Rejected as e:
                return await self._refuse(e)
        self._assembled = (snap, checked)
        return await self.apply_snapshot(snap, raw, change=change)

    def _fdb_change(self, snap: Snapshot) -> Change | None:
        """When ``snap`` only gains and loses FDB entries and peers of the snapshot last applied
        cleanly and the change passes ``agent.validate.check_change`` (work proportional to it):
        the entries per VXLAN and the peers. None when that is not so or not sure: the whole
        snapshot is then checked and planned."""
        base = self._base
        if base is None or self._last is None or self._last[1] is not base[0]:
            return None
        fdb = self.assembler.change()
        if fdb is None:
            return None
        mesh: MeshChange | None = self.assembler.mesh_change()
        if not (mesh.gained or mesh.lost):
            mesh = None
        taps: TapChange | None = self.assembler.tap_change()
        if not (taps.gained or taps.lost):
            taps = None
        checked = check_change(snap, base[0], base[1], fdb, mesh, taps)
        if checked is None:
            return None
        return Change(fdb, mesh, base[0], checked, taps)

    async def apply_snapshot(
        self,
        snap: Snapshot,
        raw: bytes | None = None,
        same: bool | None = None,
        change: Change | None = None,
    ) -> Ack:
        """Reconcile an accepted snapshot as much as this heartbeat needs (``agent.steady``),
        then ack. ``same``: it carries the content last reconciled cleanly; None: compare the
        assembled snapshot's version and digest with the last one's. ``change``: it only
        gains and loses these FDB entries and peers of the last one (``_fdb_change``)."""
        if same is None:
            last = self._last[1] if self._last else None
            same = self.events is not None and same_snapshot(snap, last)
        started = time.perf_counter()
        mode, reason = decide(
            same_content=same,
            clean=self._clean and self._seen is not None,
            kernel_changed=self._kernel_changed(),
            since_full=self._since_full,
        )
        if mode == SKIP:
            changes, errors = await self.check_mesh(snap)
        else:
            changes, errors = await self.reconcile(
                snap, quiet=mode == QUIET, change=change if mode == QUIET else None
            )
        self.counters["reconciled" if mode == FULL else "skipped"] += 1
        self._since_full = 0 if mode == FULL else self._since_full + 1
        # a heartbeat that wrote is followed by a full one, unless it wrote only FDB entries,
        # taps (read back) and our nft loads, and the notifications show nothing but their echoes
        self._clean = not errors and (not changes or (mode != SKIP and await self._advance(snap)))
        self._last = None if errors else (raw, snap)
        if change is not None and not errors and mode == QUIET:  # not when reconciled whole
            for kind in _kinds(change):
                self.counters[f"{kind}_changes"] += 1
        if not errors and self._assembled is not None and self._assembled[0] is snap:
            self.assembler.mark()  # the base of the next change (``_fdb_change``)
            self._base = self._assembled
        self._assembled = None
        elapsed = (time.perf_counter() - started) * 1000
        self.metrics.reconciled(snap, self.applied, changes, errors)
        self.failures.record(errors)  # the first failure of a kind, then "in sync again"
        if errors:
            self.counters["apply_errors"] += 1
            self.last_error = f"version {snap.version}: " + "; ".join(map(str, errors))
        else:
            self.counters["applied"] += 1
            self.last_error = None
            if self.applied.version != snap.version or self.applied.digest != snap.digest:
                self.applied = AppliedState(version=snap.version, digest=snap.digest)
                save_applied(self.config.state_dir, self.applied)
            # every VM of a network reaches a new NIC at once, even at a reused address
            if self.announcer is not None:
                self.announcer.update(snap.taps, self._snapshot_gap)
            if changes:
                log.info(
                    "agent %s: version %d applied (%s), %d change(s) in %.1f ms%s",
                    self.config.node,
                    snap.version,
                    reason,
                    changes,
                    elapsed,
                    _path(change, quiet=mode == QUIET),
                )
        ack = Ack(
            node=self.config.node,
            version=snap.version,
            applied_version=self.applied.version,
            digest=snap.digest,
            ok=not errors,
            error=clip(self.last_error) if errors else None,
            duration_ms=round(elapsed, 3),
            changes=changes,
            sent_at=time.time(),
        )
        await self._ack(ack)
        return ack

    async def _advance(self, snap: Snapshot) -> bool:
        """After a reconcile whose only writes were FDB entries, taps (a VM's NIC attached or
        detached: created, enslaved, learning off, up, or deleted), one ``nft -f`` load and
        WireGuard peers (which no link dump shows): know the kernel state they reached without
        a dump, when the notifications since are the echoes of those writes and nothing else.
        FDB entries are known from the writes (``agent.links.plan.advance``); the taps written
        and their bridges are read back, after the notifications, and must be as ``snap`` wants
        them (``agent.links.plan.settle``); nftables' commits are known by the ``nft`` pids.
        WireGuard verified its peers itself (``apply_change``; when it could not, its next
        ``check`` reconciles it whole)."""
        if self.events is None or self._seen is None:
            return False
        alone = {self.links.name, self.nft.name}
        alone |= {self.wireguard.name} if self._peer_writes else set()
        if any(writes for name, writes in self._writes.items() if name not in alone):
            return False
        plan = self.links.applied
        actions = plan.actions if plan is not None else ()
        nft_wrote = bool(self._writes.get(self.nft.name))
        if not actions and not nft_wrote:
            return self._peer_writes  # peers set, nothing else written
        devices = written_devices(self._seen, actions, snap)
        echoes = _echoes(plan, devices) if plan is not None and devices is not None else Echoes()
        if devices is None or echoes is None:
            return False
        echoes.nft_pids = frozenset(getattr(self.nft, "commits", ())) if nft_wrote else frozenset()
        try:
            if self.events.drain(echoes):
                return False  # something else changed too: the next heartbeat reads it all
            # after the drain: whatever happened to these devices before it shows in the read
            read = await self.links.observe_devices(devices) if devices else None
        except Exception as e:  # unreadable: the next heartbeat reads it all
            self.log.warning("written devices not read back (%s): full reconcile next", e)
            return False
        after = (
            advance(self._seen, actions)
            if read is None
            else settle(self._seen, actions, snap, read)
        )
        if after is None or _moved_onto(after, devices, echoes.macs):
            return False
        self._seen = after
        if read is not None:
            self._know(after)
            self._note_taps(snap, after)
        return True

    def _kernel_changed(self) -> bool:
        """Drain the notifications; True when something of ours may have changed."""
        if self.events is None:
            return True
        try:
            return self.events.drain()
        except OSError as e:  # unreadable: assume the worst, a full reconcile finds out
            self.log.warning("kernel notifications unreadable (%s): full reconcile", e)
            return True

    async def check_mesh(self, snap: Snapshot) -> tuple[int, list[ApplyError]]:
        """A skipped heartbeat's one kernel read: WireGuard has no notifications, so its device
        is observed and planned (zero writes when equal) against the last link dump, on every
        heartbeat (only a change HEAD may leave it out, ``_reconcile_one``)."""
        if snap.wireguard is None or self.wireguard is None:
            return 0, []
        result, errors = await self._reconcile_one(self.wireguard, snap, self._seen, check=True)
        return (result.writes if result else 0), errors

    async def _reconcile_one(
        self,
        sub: Subsystem,
        snap: Snapshot,
        seen: Observed | None,
        check: bool = False,
        quiet: bool = False,
        change: Change | None = None,
    ) -> tuple[ApplyResult | None, list[ApplyError]]:
        try:
            desired = sub.desired(snap)
            if desired is None:
                return None, []  # silence never tears down
            result = None
            apply_change = getattr(sub, "apply_change", None)
            if check and change is not None and change.mesh is not None and apply_change:
                result = await apply_change(
                    desired, change.base.wireguard, change.mesh.gained, change.mesh.lost
                )  # only the touched peers, when WireGuard knows its device holds the base
                self._peer_writes = result is not None
            holds = getattr(sub, "holds", None)
            if result is None and quiet and self._wg_read_last and holds and holds(desired):
                # a change HEAD (FDB entries, taps) right after a HEAD that read the device and
                # found it as desired leaves the read out; every unchanged heartbeat reads, so
                # drift is still found by the next heartbeat, as without this
                self._wg_read_last = False
                return ApplyResult(writes=0, reached=frozenset({desired.name})), []
            if sub is self.wireguard:
                self._wg_read_last = True  # every way below reads the device
            if result is None and check:  # WireGuard's cheap read for a heartbeat without news
                result = await sub.check(desired, seen)
            elif result is None:
                fdb = change.fdb if change is not None else None
                taps = change.taps if change is not None else None
                result = await sub.reconcile(desired, seen, quiet=quiet, change=fdb, taps=taps)
        except ApplyError as e:
            return None, [e]
        except ValueError as e:  # the plan refused the snapshot: nothing was written
            return None, [ApplyError(sub.name, "plan", str(e), temporary=False)]
        except Exception as e:  # an unexpected failure must not hide the other subsystems
            self.log.exception("%s: reconcile crashed", sub.name)
            return None, [ApplyError(sub.name, "reconcile", f"{type(e).__name__}: {e}")]
        return result, list(result.errors)

    async def reconcile(
        self, snap: Snapshot, quiet: bool = False, change: Change | None = None
    ) -> tuple[int, list[ApplyError]]:
        """Bring every subsystem to the snapshot; report writes and typed errors. ``quiet``: the
        kernel still holds what the last full reconcile read (``agent.steady``): plan against
        that, reading only WireGuard, which has no notifications. ``change`` (quiet only): the
        snapshot is the last one but for these FDB entries and peers; a subsystem they do not
        concern (``Subsystem.concerned``, ``mesh_reads``) is as its last reconcile left it, and
        is not planned; WireGuard sets only the peers (``apply_change``)."""
        changes, errors = 0, list[ApplyError]()
        self.links.applied, self._writes, self._peer_writes = None, {}, False
        if quiet and self._seen is not None:
            seen = self._seen
        else:  # one link dump per heartbeat serves every subsystem
            seen = self._seen = await self.links.observe()
            if self.events is not None:  # neighbour and address events name links by ifindex
                self._know(seen)
        self._note_taps(snap, seen)
        if snap.wireguard is not None:
            self.tunnel_address = snap.wireguard.address.split("/")[0]
            if self.wireguard is None:
                errors.append(
                    ApplyError(
                        snap.wireguard.name, "mesh",
                        "snapshot asks for the WireGuard mesh but this agent runs without it",
                        temporary=False,
                    )
                )  # fmt: skip
        for sub in self.subsystems:
            check = quiet and sub is self.wireguard  # its link is in ``seen``, its peers are read
            if quiet and change is not None and not check and not _concerns(change, sub):
                continue
            result, failed = await self._reconcile_one(
                sub, snap, seen, check=check, quiet=quiet, change=change
            )
            errors += failed
            if result is None:
                continue
            changes += result.writes
            self._writes[sub.name] = result.writes
            if sub is self.links or sub is self.wireguard:  # managed devices that exist now
                self._reached[sub.name] = frozenset(result.reached)
        # a subsystem a change did not concern (skipped above) still holds what it last reached
        self.devices = len(frozenset().union(*self._reached.values()))
        return changes, errors

    def _know(self, seen: Observed) -> None:
        """Tell the notifications what is ours as ``seen`` (``KernelEvents.know``)."""
        assert self.events is not None
        bridges = {
            link.index: (name.encode(), link.up, link.mtu)
            for name, link in seen.links.items()
            if link.kind == "bridge" and link.master is None
        }
        self.events.know((link.index for link in seen.links.values()), bridges)

    def _note_taps(self, snap: Snapshot, seen: Observed) -> None:
        """This node's taps and their carrier as ``seen``; health at once when they changed."""
        wanted_taps = {t.name for t in snap.taps}
        taps = {name: link.carrier for name, link in seen.links.items() if name in wanted_taps}
        if taps != self.taps:
            self.taps = taps
            self._report_now.set()

    async def _ack(self, ack: Ack) -> None:
        try:
            await self.nc.publish(naming.ack_subject(self.config.node), encode(ack))
        except Exception as e:
            log.warning("agent %s: could not publish ack: %s", self.config.node, e)

    # --- health ---------------------------------------------------------------------------------

    async def health(self) -> Health:
        peers = ()
        backend = key = tunnel = None
        if self.wireguard is not None:
            backend, key = self.wireguard.backend_name, self.wireguard.public_key
            try:
                peers = tuple(await self.wireguard.peers())
                self.metrics.peers_read(peers)
            except Exception as e:
                log.debug("agent %s: no WireGuard peers to report: %s", self.config.node, e)
            tunnel = self.tunnel_address
        return Health(
            node=self.config.node,
            applied_version=self.applied.version,
            ok=self.last_error is None,
            started_at=self.started_at,
            sent_at=time.time(),
            snapshots_received=self.counters["received"],
            snapshots_applied=self.counters["applied"],
            snapshots_rejected=self.counters["rejected"],
            apply_errors=self.counters["apply_errors"],
            last_error=clip(self.last_error),
            last_snapshot_at=self.last_snapshot_at,
            devices=self.devices,
            taps=self.taps,
            wireguard_backend=backend,
            wg_public_key=key,
            tunnel_ip=tunnel,
            peers=peers,
            drops=self.nft.drops,
            heartbeats_skipped=self.counters["skipped"],
            heartbeats_reconciled=self.counters["reconciled"],
        )

    async def _health_loop(self) -> None:
        while True:
            if self._last is not None and time.monotonic() - self.nft.drops_at > DROPS_MAX_AGE:
                try:  # skipped heartbeats read no counters: refresh them for the report
                    await self.nft.read_drops()
                except Exception as e:
                    log.debug("agent %s: drop counters not read: %s", self.config.node, e)
            try:
                await self.nc.publish(
                    naming.health_subject(self.config.node), encode(await self.health())
                )
            except Exception as e:
                log.warning("agent %s: could not publish health: %s", self.config.node, e)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.health_interval):
                    await self._report_now.wait()
            self._report_now.clear()


def _concerns(change: Change, sub: Subsystem) -> bool:
    """Whether ``sub``'s desired state may differ from its last: the FDB entries concern it,
    or the peers (taps) changed and it reads them (no entries changed: nothing of the FDB did)."""
    fdb = bool(change.fdb) and sub.concerned(change.fdb.values())
    taps = change.taps is not None and sub.tap_reads
    return fdb or taps or (change.mesh is not None and sub.mesh_reads)


def _kinds(change: Change) -> list[str]:
    """What a change touched (one HEAD may carry several: a node joining with a VM's NIC)."""
    kinds = [kind for kind, part in (("tap", change.taps), ("mesh", change.mesh)) if part]
    return kinds + ["fdb"] if change.fdb or not kinds else kinds


def _path(change: Change | None, quiet: bool) -> str:
    """For the log: how a change was checked and planned (tests look for it)."""
    if change is None:
        return ""
    what = "checked" if not quiet else "checked and planned"
    parts = []
    if (t := change.taps) is not None:
        parts.append(f"taps: +{len(t.gained)} -{len(t.lost)}")
    if (m := change.mesh) is not None:
        parts.append(f"mesh: peers +{len(m.gained)} -{len(m.lost)}")
    if change.fdb or not parts:
        parts.append("FDB")
    return f"; {what} by the change path ({', '.join(parts)})"


def _moved_onto(seen: Observed, devices: frozenset[str], macs: set[bytes]) -> bool:
    """Whether an entry announced on a device written (``Echoes.macs``) carries a MAC that
    ``seen`` has on a port not written of a bridge written: someone moved it from there onto
    the tap or the bridge (the read-back reads only the devices written). Our own writes there
    announce the taps' NIC MACs, which are on those taps, and the kernel's own entries carry
    device addresses, never a NIC's MAC. Costs the links, only when there are such events."""
    if not macs:
        return False
    names = {mac.hex(":") for mac in macs}
    return any(
        link.master in devices and not names.isdisjoint(seen.port_fdb.get(name, ()))
        for name, link in seen.links.items()
        if name not in devices
    )


def _echoes(plan: LinkPlan, devices: frozenset[str] = frozenset()) -> Echoes | None:
    """What the plan's writes announce: the event of every FDB entry it wrote (``fdb_echo``: an
    add with its dst and state, a delete with its dst) on a device not in ``devices`` (the links
    it wrote, read back: each of their events is an echo); None if it wrote anything else, or
    an entry on a device whose ifindex it does not know."""
    fdb = set()
    dsts: dict[str, bytes] = {}
    for a in plan.actions:
        if not isinstance(a, FdbAction):
            if a.name not in devices:
                return None
            continue
        device = a.port if isinstance(a, AddPortFdb | DelPortFdb) else a.device
        if device in devices:
            continue
        if not (index := plan.indexes.get(device)):
            return None
        mac = bytes.fromhex(a.mac.replace(":", ""))
        packed = b""
        if dst := getattr(a, "dst", None):  # a few tunnel addresses for many entries
            if (packed := dsts.get(dst, b"")) == b"":
                packed = dsts[dst] = socket.inet_aton(dst)  # as the FDB socket writes it
        added = isinstance(a, AddFdb | AddPortFdb)  # a bridge entry is static, ours permanent
        state = NUD_NOARP if isinstance(a, AddPortFdb) else NUD_PERMANENT
        fdb.add(fdb_echo(added, index, mac, packed, state))
    return Echoes(
        fdb=frozenset(fdb),
        devices=frozenset(d.encode() for d in devices),
        indexes={i for d in devices if (i := plan.indexes.get(d))},  # a new tap's comes by name
    )
