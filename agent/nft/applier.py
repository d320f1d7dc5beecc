"""The nftables subsystem: owns exactly two tables, ``inet otherix`` and ``bridge otherix``, and
IPv4 forwarding.

``observe`` reads both tables (two read-only ``nft -j list table``, run side by side: nft 1.0.6
cannot list two tables in one call) and the forwarding sysctl, and keeps the drop counters for
health; the pure ``agent.nft.rules.plan`` decides; ``read_drops`` refreshes only the drop
counters (one netlink dump, ``agent.nft.counters``: no process) for a health report; ``apply`` replaces both tables in a single
atomic ``nft -j -f -`` transaction built as JSON (or drops them) and turns forwarding on when NAT
needs it, and keeps the pids of the ``nft`` processes that committed (``commits``: the kernel
names the committing process in each transaction's last event, so the agent tells its own
loads' notifications from anyone else's, ``agent.kernel_events``). It never touches any other
table or sysctl.
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from agent.errors import ApplyError, ApplyResult, NftError
from agent.links.model import Observed
from agent.logs import NodeLog
from agent.nft import counters
from agent.nft.rules import (
    FAMILIES,
    TABLE,
    NftDesired,
    NftObserved,
    NftPlan,
    desired,
    parse_observed,
    plan,
    spec,
)
from agent.subsystem import Subsystem
from schemas.desired import Snapshot
from schemas.naming import WIREGUARD_IFNAME

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TIMEOUT = 10.0


class NftApplier(Subsystem[NftDesired, NftObserved, NftPlan, NftObserved]):
    """Runs ``nft`` (optionally under a command prefix such as ``ip netns exec NS``)."""

    name = "nftables"
    fdb_reads = "destinations"  # the VXLAN guard's peers (agent.subsystem)
    # the guard keeps the FDB destinations that are peers' addresses; in a snapshot that passed
    # validation every destination is one, so the peers alone never change the rule set
    mesh_reads = False

    def __init__(self, nft: str = "nft", prefix: Sequence[str] = (), node: str | None = None):
        self._nft = nft
        self._prefix = tuple(prefix)
        self.log = NodeLog(logging.getLogger(__name__), node)
        self.drops: dict[str, int] = {}  # packets per drop reason, as last observed
        self.drops_at = 0.0  # time.monotonic() of that observation
        self.rule_count = 0  # rules in our tables as last applied (agent.metrics reads it)
        self.commits: list[int] = []  # pids of the ``nft -f`` processes of the last apply
        self.last_pid: int | None = None  # of the last process run

    def desired(self, snapshot: Snapshot) -> NftDesired:
        # the guard is the agent's own choice: VXLAN only through the mesh (otwg0)
        return desired(spec(snapshot, WIREGUARD_IFNAME))

    async def observe(self, seen: Observed | None = None) -> NftObserved:
        # both finish before any error is raised: no nft process outlives its reader
        listings = await asyncio.gather(*map(self._list, FAMILIES), return_exceptions=True)
        for failed in (x for x in listings if isinstance(x, BaseException)):
            raise failed
        tables = parse_observed(*(x for x in listings if isinstance(x, dict)))
        self.drops = tables.drops
        self.drops_at = time.monotonic()
        return msgspec.structs.replace(tables, forwarding=await self._forwarding())

    async def read_drops(self) -> dict[str, int]:
        """The drop counters now, for health: one netlink dump of our counters in this
        namespace; under a command prefix (another namespace) the whole ``observe``."""
        if self._prefix:
            await self.observe()
            return self.drops
        try:
            found = await asyncio.to_thread(counters.read)  # a blocking recv: off the loop
        except OSError as e:
            raise NftError(f"reading the drop counters failed: {e}", op="observe") from None
        self.drops = {name: c.packets for name, c in sorted(found.items())}
        self.drops_at = time.monotonic()
        return self.drops

    async def _list(self, family: str) -> dict | None:
        """One of our tables as ``nft -j`` prints it; None when it does not exist."""
        rc, out, err = await self._run([self._nft, "-j", "list", "table", family, TABLE])
        if rc == 0:
            return json.loads(out)
        if "No such file or directory" in err:
            return None
        raise NftError(
            f"nft list table {family} {TABLE} failed (exit {rc}): {err.strip()}", op="observe"
        )

    def plan(self, desired: NftDesired, observed: NftObserved) -> NftPlan:
        return plan(desired, observed)

    async def apply(self, plan: NftPlan) -> ApplyResult[NftObserved]:
        self.commits = []
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
            self.rule_count = reached.rule_count
            return ApplyResult(writes, reached, tuple(errors))
        if plan.digest is None:
            self.log.info("nft: deleting tables %s %s", " and ".join(FAMILIES), TABLE)
        else:
            self.log.info(
                "nft: replacing tables %s %s (%d rules, %s)",
                " and ".join(FAMILIES), TABLE, plan.rule_count, plan.digest,
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
                forwarding=True if forwarding else plan.before.forwarding if plan.before else None,
                sets=plan.sets if plan.digest else {},
                counters=plan.before.counters if plan.before and plan.digest else {},
            )
        self.rule_count = reached.rule_count
        return ApplyResult(writes, reached, tuple(errors))

    async def reconcile(self, desired, seen=None, **kwargs) -> ApplyResult[NftObserved]:
        """``Subsystem.reconcile``; after writes that were all our own loads, the tables are
        known to hold what was loaded, as the next quiet reconcile's observation (the runner
        asks for one only while the notifications since show nothing but those loads' commits,
        ``agent.kernel_events``): the next change needs no ``nft list``."""
        result = await super().reconcile(desired, seen, **kwargs)
        if result.writes and not result.errors and result.writes == len(self.commits):
            self._quiet_observed = result.reached
        return result

    async def load(self, batch: str) -> None:
        """One ``nft -j -f -`` transaction (JSON): all of it or nothing."""
        self.last_pid = None
        rc, _, err = await self._run([self._nft, "-j", "-f", "-"], stdin=batch)
        if self.last_pid is not None:
            self.commits.append(self.last_pid)
        if rc != 0:
            raise NftError(
                f"nft -j -f failed (exit {rc}): {err.strip()}\n--- batch ---\n{batch[:4000]}",
                op="load",
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
        """(exit code, stdout, stderr) of ``argv``, whose pid is kept in ``last_pid`` (under the
        prefix too: ``ip netns exec`` execs the command, so the pid stays)."""
        # nft reads JSON by opening /dev/stdin, which fails on the socket asyncio (and uvloop)
        # use for a PIPE: hand it an in-memory file instead
        source = _memfile(stdin) if stdin is not None else asyncio.subprocess.DEVNULL
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._prefix,
                *argv,
                stdin=source,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            if stdin is not None:
                os.close(source)
        self.last_pid = proc.pid
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NftError(f"{' '.join(argv)} timed out after {TIMEOUT}s", temporary=True) from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


def _memfile(text: str) -> int:
    fd = os.memfd_create("otherix-nft")
    data = text.encode()
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
