"""The nftables applier: owns exactly one table, ``table inet otherix``, and IPv4 forwarding.

``render`` is pure: desired NAT subnets (+ optional "VXLAN only via otwg0" guard) → nft script.
``NftApplier`` observes the table with one read-only ``nft -j list`` and, when it differs,
replaces it in a single atomic ``nft -f -`` transaction. It never touches any other table.

The desired rule set's digest is stored in the table comment (for operators) and in every rule's
comment: nft 1.0.6 does not export table comments in JSON, rule comments it does.
"""

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import msgspec

from schemas.naming import VXLAN_PORT

log = logging.getLogger(__name__)

FAMILY, TABLE = "inet", "otherix"
DIGEST_PREFIX = "otherix:"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TIMEOUT = 10.0
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# Declaring the table first makes the delete valid whether or not it existed; the whole
# script is one transaction, so readers see the old table or the new one, never neither.
_DROP = f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"


class NftError(RuntimeError):
    """``nft`` failed; the message carries its exit code and stderr."""


class NftObserved(msgspec.Struct, frozen=True):
    exists: bool
    digest: str | None
    rule_count: int


class _Rules(msgspec.Struct, frozen=True):
    postrouting: tuple[str, ...]
    input: tuple[str, ...]
    forward: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.postrouting) + len(self.input) + len(self.forward)


def _rules(nat_subnets: Sequence[str], vxlan_only_via: str | None, vxlan_port: int) -> _Rules:
    # Validate everything that is pasted into the script (no nft injection from a snapshot).
    subnets = sorted({str(ipaddress.IPv4Network(s, strict=False)) for s in nat_subnets})
    nat = tuple(f"ip saddr {s} ip daddr != {s} masquerade" for s in subnets)
    guard: tuple[str, ...] = ()
    if vxlan_only_via is not None:
        if not _IFNAME.match(vxlan_only_via):
            raise ValueError(f"bad interface name {vxlan_only_via!r}")
        if not 0 < vxlan_port < 65536:
            raise ValueError(f"bad VXLAN port {vxlan_port}")
        guard = (f'udp dport {vxlan_port} iifname != "{vxlan_only_via}" drop',)
    # NAT networks behave like a home router's LAN: nothing enters one from another subnet
    # (another Otherix network on this node, or outside) unless it answers a connection made
    # from inside. Matching on addresses, not devices, keeps bridged traffic within one network
    # untouched even where br_netfilter sends it through this hook.
    isolation = tuple(
        rule
        for s in subnets
        for rule in (
            f"ip daddr {s} ip saddr != {s} ct state established,related accept",
            f"ip daddr {s} ip saddr != {s} drop",
        )
    )
    return _Rules(postrouting=nat, input=guard, forward=isolation)


def _digest(rules: _Rules) -> str:
    text = "\n".join(
        ["postrouting", *rules.postrouting, "input", *rules.input, "forward", *rules.forward]
    )
    return DIGEST_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def desired_digest(
    nat_subnets: Sequence[str], vxlan_only_via: str | None, vxlan_port: int = VXLAN_PORT
) -> str | None:
    rules = _rules(nat_subnets, vxlan_only_via, vxlan_port)
    return _digest(rules) if rules.count else None


def render(
    nat_subnets: Sequence[str], vxlan_only_via: str | None, vxlan_port: int = VXLAN_PORT
) -> str:
    """Full ``nft -f`` script replacing our table; "" when nothing is wanted."""
    rules = _rules(nat_subnets, vxlan_only_via, vxlan_port)
    if not rules.count:
        return ""
    digest = _digest(rules)
    lines = [_DROP.rstrip("\n"), f"table {FAMILY} {TABLE} {{", f'\tcomment "{digest}"']
    if rules.postrouting:
        lines += ["\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat;"]
        lines += [f'\t\t{r} comment "{digest}"' for r in rules.postrouting]
        lines.append("\t}")
    if rules.input:
        # before the default filter priority so another table's accept cannot let it through
        lines += ["\tchain input {", "\t\ttype filter hook input priority filter - 10;"]
        lines += [f'\t\t{r} comment "{digest}"' for r in rules.input]
        lines.append("\t}")
    if rules.forward:
        lines += ["\tchain forward {", "\t\ttype filter hook forward priority filter - 10;"]
        lines += [f'\t\t{r} comment "{digest}"' for r in rules.forward]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_observed(listing: dict) -> NftObserved:
    """``nft -j list table inet otherix`` output → what we compare against."""
    digests: set[str | None] = set()
    count = 0
    table_comment = None
    for item in listing.get("nftables", ()):
        if "table" in item:
            table_comment = item["table"].get("comment")  # newer nft versions export it
        elif "rule" in item:
            count += 1
            digests.add(item["rule"].get("comment"))
    if table_comment and table_comment.startswith(DIGEST_PREFIX):
        digest = table_comment
    else:  # every rule must carry the same digest, otherwise the table is not ours as rendered
        digest = digests.pop() if len(digests) == 1 else None
    return NftObserved(exists=True, digest=digest, rule_count=count)


class NftApplier:
    """Runs ``nft`` (optionally under a command prefix such as ``ip netns exec NS``)."""

    def __init__(self, nft: str = "nft", prefix: Sequence[str] = ()):
        self._nft = nft
        self._prefix = tuple(prefix)

    async def observe(self) -> NftObserved:
        rc, out, err = await self._run([self._nft, "-j", "list", "table", FAMILY, TABLE])
        if rc != 0:
            if "No such file or directory" in err:
                return NftObserved(exists=False, digest=None, rule_count=0)
            raise NftError(f"nft list table {FAMILY} {TABLE} failed (exit {rc}): {err.strip()}")
        return parse_observed(json.loads(out))

    async def apply(
        self,
        nat_subnets: Sequence[str],
        vxlan_only_via: str | None,
        vxlan_port: int = VXLAN_PORT,
    ) -> int:
        """Converge the table (and forwarding); returns the number of writes made."""
        script = render(nat_subnets, vxlan_only_via, vxlan_port)
        writes = await self._ensure_forwarding() if nat_subnets else 0
        observed = await self.observe()
        if not script:
            if not observed.exists:
                return writes
            log.info("nft: deleting table %s %s", FAMILY, TABLE)
            await self._load(_DROP)
            return writes + 1
        rules = _rules(nat_subnets, vxlan_only_via, vxlan_port)
        if observed.digest == _digest(rules) and observed.rule_count == rules.count:
            return writes
        log.info(
            "nft: replacing table %s %s (%d rules, %s)", FAMILY, TABLE, rules.count, _digest(rules)
        )
        await self._load(script)
        return writes + 1

    async def _load(self, script: str) -> None:
        rc, _, err = await self._run([self._nft, "-f", "-"], stdin=script)
        if rc != 0:
            raise NftError(f"nft -f failed (exit {rc}): {err.strip()}\n--- script ---\n{script}")

    async def _ensure_forwarding(self) -> int:
        """NAT needs routing: turn IPv4 forwarding on, writing only when it is off."""
        if not self._prefix:  # our own namespace: plain file I/O, no subprocess
            if IP_FORWARD.read_text().strip() != "0":
                return 0
            IP_FORWARD.write_text("1\n")
        else:  # the target namespace is only reachable through the prefix
            rc, out, err = await self._run(["sysctl", "-n", "net.ipv4.ip_forward"])
            if rc != 0:
                raise NftError(f"reading net.ipv4.ip_forward failed: {err.strip()}")
            if out.strip() != "0":
                return 0
            rc, _, err = await self._run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            if rc != 0:
                raise NftError(f"enabling net.ipv4.ip_forward failed: {err.strip()}")
        log.info("nft: enabled IPv4 forwarding")
        return 1

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
            raise NftError(f"{' '.join(argv)} timed out after {TIMEOUT}s") from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()
