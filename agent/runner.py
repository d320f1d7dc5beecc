"""The agent's main loop (on the NATS / uvloop side): register, receive, apply, ack, report.

Only the newest snapshot is kept (a slow apply never builds a backlog). Each snapshot is checked
(``agent.validate``), then WireGuard, netlink and nftables are reconciled against what the kernel
has *now*, and an ack says which version the data plane holds. Silence from the controller
changes nothing: the data plane keeps its last good state.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client

from agent import plan as planner
from agent.model import CreateBridge, CreateTap, CreateVxlan, DeleteLink
from agent.netlink import NetlinkThread
from agent.nft import NftApplier
from agent.state import AppliedState, load_applied, save_applied
from agent.validate import Rejected, accept
from client.api import ApiClient, ApiError
from schemas import naming
from schemas.codec import encode
from schemas.desired import Snapshot
from schemas.messages import Ack, Health

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    node: str
    state_dir: Path
    underlay_ip: str | None = None
    wg_listen_port: int = naming.WIREGUARD_PORT
    health_interval: float = 5.0


class Agent:
    def __init__(
        self,
        nc: Client,
        config: AgentConfig,
        netlink: NetlinkThread,
        nft: NftApplier,
        wireguard=None,
    ):
        self.nc, self.config = nc, config
        self.netlink, self.nft, self.wireguard = netlink, nft, wireguard
        self.applied: AppliedState = load_applied(config.state_dir)
        self.started_at = time.time()
        self.counters = {"received": 0, "applied": 0, "rejected": 0, "apply_errors": 0}
        self.last_error: str | None = None
        self.last_snapshot_at = 0.0
        self.devices = 0
        self.tunnel_address: str | None = None
        self._latest: bytes | None = None
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            naming.desired_subject(self.config.node), cb=self._on_snapshot
        )
        self._tasks = [
            asyncio.create_task(self._worker(), name="apply"),
            asyncio.create_task(self._health_loop(), name="health"),
            asyncio.create_task(self._register(), name="register"),
        ]
        log.info("agent %s: started, applied version %d", self.config.node, self.applied.version)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sub is not None:
            await self._sub.unsubscribe()

    # --- registration ---------------------------------------------------------------------------

    def registration(self) -> dict:
        fields: dict = {"name": self.config.node, "underlay_ip": self.config.underlay_ip}
        if self.wireguard is not None:  # only built with an underlay address (agent.main)
            fields.update(
                wg_public_key=self.wireguard.public_key, wg_listen_port=self.config.wg_listen_port
            )
        return fields

    async def _register(self) -> None:
        """Retry until the controller answers: a request/reply round trip is the positive signal."""
        client, delay = ApiClient(self.nc, timeout=2.0), 0.2
        while True:
            try:
                await client.node_register(**self.registration())
            except ApiError as e:
                if e.code < 500:
                    log.error("agent %s: registration refused: %s", self.config.node, e)
                    self.last_error = f"registration refused: {e}"
                else:
                    log.warning(
                        "agent %s: registration failed (%s); retrying in %.1fs",
                        self.config.node,
                        e,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("agent %s: registered", self.config.node)
            return

    # --- snapshots ------------------------------------------------------------------------------

    async def _on_snapshot(self, msg) -> None:
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
                log.exception("agent %s: apply crashed", self.config.node)
                await self._ack(
                    Ack(
                        node=self.config.node,
                        version=0,
                        applied_version=self.applied.version,
                        ok=False,
                        error=f"internal error: {e}",
                    )
                )

    async def handle(self, raw: bytes) -> Ack:
        self.last_snapshot_at = time.time()
        try:
            snap = accept(raw, self.config.node, self.applied.version)
        except Rejected as e:
            self.counters["rejected"] += 1
            self.last_error = str(e)
            log.warning("agent %s: snapshot refused: %s", self.config.node, e)
            ack = Ack(
                node=self.config.node,
                version=e.version,
                applied_version=self.applied.version,
                ok=False,
                error=str(e),
                sent_at=time.time(),
            )
            await self._ack(ack)
            return ack
        started = time.perf_counter()
        changes, errors = await self.reconcile(snap)
        elapsed = (time.perf_counter() - started) * 1000
        if errors:
            self.counters["apply_errors"] += 1
            self.last_error = f"version {snap.version}: " + "; ".join(errors)
            log.error(
                "agent %s: version %d applied with %d error(s): %s",
                self.config.node,
                snap.version,
                len(errors),
                self.last_error,
            )
        else:
            self.counters["applied"] += 1
            self.last_error = None
            if self.applied.version != snap.version or self.applied.digest != snap.digest:
                self.applied = AppliedState(version=snap.version, digest=snap.digest)
                save_applied(self.config.state_dir, self.applied)
            if changes:
                log.info(
                    "agent %s: version %d applied, %d change(s) in %.1f ms",
                    self.config.node,
                    snap.version,
                    changes,
                    elapsed,
                )
        ack = Ack(
            node=self.config.node,
            version=snap.version,
            applied_version=self.applied.version,
            digest=snap.digest,
            ok=not errors,
            error=self.last_error if errors else None,
            duration_ms=round(elapsed, 3),
            changes=changes,
            sent_at=time.time(),
        )
        await self._ack(ack)
        return ack

    async def reconcile(self, snap: Snapshot) -> tuple[int, list[str]]:
        """Bring WireGuard, links/FDB and nftables to the snapshot; report writes and errors."""
        changes, errors = 0, []
        observed = await self.netlink.observe()  # one dump serves WireGuard and the planner
        if snap.wireguard is not None:
            if self.wireguard is None:
                errors.append("snapshot asks for the WireGuard mesh but this agent runs without it")
            else:
                self.tunnel_address = snap.wireguard.address.split("/")[0]
                link = observed.links.get(snap.wireguard.name)
                try:
                    changes += await self.wireguard.apply(snap.wireguard, link)
                except Exception as e:
                    errors.append(f"wireguard {snap.wireguard.name}: {e}")
        actions = planner.plan(snap, observed)  # otwg0 is left to the WireGuard applier
        if actions:
            result = await self.netlink.apply(actions)
            changes += result.done
            errors += result.errors
        created = {a.name for a in actions if isinstance(a, CreateBridge | CreateTap | CreateVxlan)}
        deleted = {a.name for a in actions if isinstance(a, DeleteLink)}
        self.devices = len((set(observed.links) - deleted) | created)
        try:
            changes += await self.nft.apply(snap.nat_subnets, snap.vxlan_only_via)
        except Exception as e:
            errors.append(f"nftables: {e}")
        return changes, errors

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
            last_error=self.last_error,
            last_snapshot_at=self.last_snapshot_at,
            devices=self.devices,
            wireguard_backend=backend,
            wg_public_key=key,
            tunnel_ip=tunnel,
            peers=peers,
        )

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.nc.publish(
                    naming.health_subject(self.config.node), encode(await self.health())
                )
            except Exception as e:
                log.warning("agent %s: could not publish health: %s", self.config.node, e)
            await asyncio.sleep(self.config.health_interval)
