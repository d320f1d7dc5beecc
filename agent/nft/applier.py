"""The nftables subsystem: owns exactly one table, ``table inet otherix``, and IPv4 forwarding.

``observe`` reads the table with one read-only ``nft -j list`` and the forwarding sysctl; the
pure ``agent.nft.rules.plan`` decides; ``apply`` replaces the table in a single atomic
``nft -f -`` transaction (or drops it) and turns forwarding on when NAT needs it. It never
touches any other table or sysctl.
"""

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from agent.errors import ApplyError, ApplyResult, NftError
from agent.links.model import Observed
from agent.logs import NodeLog
from agent.nft.rules import (
    FAMILY,
    TABLE,
    NftDesired,
    NftObserved,
    NftPlan,
    desired,
    parse_observed,
    plan,
)
from agent.subsystem import Subsystem
from schemas.desired import Snapshot
from schemas.naming import WIREGUARD_IFNAME

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TIMEOUT = 10.0


class NftApplier(Subsystem[NftDesired, NftObserved, NftPlan, NftObserved]):
    """Runs ``nft`` (optionally under a command prefix such as ``ip netns exec NS``)."""

    name = "nftables"

    def __init__(self, nft: str = "nft", prefix: Sequence[str] = (), node: str | None = None):
        self._nft = nft
        self._prefix = tuple(prefix)
        self.log = NodeLog(logging.getLogger(__name__), node)

    def desired(self, snapshot: Snapshot) -> NftDesired:
        # the guard is the agent's own choice: VXLAN only through the mesh, when it has overlays
        return desired(snapshot.nat_subnets, WIREGUARD_IFNAME if snapshot.vxlans else None)

    async def observe(self, seen: Observed | None = None) -> NftObserved:
        rc, out, err = await self._run([self._nft, "-j", "list", "table", FAMILY, TABLE])
        if rc == 0:
            table = parse_observed(json.loads(out))
        elif "No such file or directory" in err:
            table = NftObserved(exists=False, digest=None, rule_count=0)
        else:
            raise NftError(
                f"nft list table {FAMILY} {TABLE} failed (exit {rc}): {err.strip()}", op="observe"
            )
        return NftObserved(
            exists=table.exists,
            digest=table.digest,
            rule_count=table.rule_count,
            forwarding=await self._forwarding(),
        )

    def plan(self, desired: NftDesired, observed: NftObserved) -> NftPlan:
        return plan(desired, observed)

    async def apply(self, plan: NftPlan) -> ApplyResult[NftObserved]:
        writes = 0
        errors: list[ApplyError] = []
        forwarding = None
        if plan.enable_forwarding:
            try:
                await self._enable_forwarding()
                writes, forwarding = writes + 1, True
            except NftError as e:
                errors.append(e)
        if plan.load is None:
            reached = NftObserved(
                exists=plan.digest is not None, digest=plan.digest, rule_count=plan.rule_count
            )
            return ApplyResult(writes, reached, tuple(errors))
        if plan.digest is None:
            self.log.info("nft: deleting table %s %s", FAMILY, TABLE)
        else:
            self.log.info(
                "nft: replacing table %s %s (%d rules, %s)",
                FAMILY, TABLE, plan.rule_count, plan.digest,
            )  # fmt: skip
        try:
            await self.load(plan.load)
        except NftError as e:
            errors.append(e)  # one transaction: the old table is still there
            reached = plan.before or NftObserved(exists=False, digest=None, rule_count=0)
        else:
            writes += 1
            reached = NftObserved(
                exists=plan.digest is not None,
                digest=plan.digest,
                rule_count=plan.rule_count,
                forwarding=forwarding,
            )
        return ApplyResult(writes, reached, tuple(errors))

    async def load(self, script: str) -> None:
        rc, _, err = await self._run([self._nft, "-f", "-"], stdin=script)
        if rc != 0:
            raise NftError(
                f"nft -f failed (exit {rc}): {err.strip()}\n--- script ---\n{script}", op="load"
            )

    async def _forwarding(self) -> bool:
        if not self._prefix:  # our own namespace: plain file I/O, no subprocess
            try:
                return IP_FORWARD.read_text().strip() != "0"
            except OSError as e:
                raise NftError(f"reading {IP_FORWARD} failed: {e}", op="observe") from None
        rc, out, err = await self._run(["sysctl", "-n", "net.ipv4.ip_forward"])
        if rc != 0:  # the target namespace is only reachable through the prefix
            raise NftError(f"reading net.ipv4.ip_forward failed: {err.strip()}", op="observe")
        return out.strip() != "0"

    async def _enable_forwarding(self) -> None:
        """NAT needs routing: turn IPv4 forwarding on (planned only when it is off)."""
        if not self._prefix:
            try:
                IP_FORWARD.write_text("1\n")
            except OSError as e:
                raise NftError(f"enabling IPv4 forwarding failed: {e}", op="forwarding") from None
        else:
            rc, _, err = await self._run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            if rc != 0:
                raise NftError(
                    f"enabling net.ipv4.ip_forward failed: {err.strip()}", op="forwarding"
                )
        self.log.info("nft: enabled IPv4 forwarding")

    async def _run(self, argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self._prefix,
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NftError(f"{' '.join(argv)} timed out after {TIMEOUT}s", temporary=True) from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()
