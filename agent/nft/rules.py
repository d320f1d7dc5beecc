"""Pure nftables rules for ``table inet otherix``: desired rule set, script, digest, plan.

Desired NAT subnets (+ optional "VXLAN only via otwg0" guard) → ``NftDesired`` (rules, digest
and the ``nft -f`` script, computed once per heartbeat); ``parse_observed`` reads back
``nft -j list``; ``plan`` compares the two. No I/O here (``agent.nft.applier`` runs ``nft``).

The desired rule set's digest is stored in the table comment (for operators) and in every rule's
comment: nft 1.0.6 does not export table comments in JSON, rule comments it does.
"""

import hashlib
import ipaddress
import re
from collections.abc import Sequence

import msgspec

from schemas.naming import VXLAN_PORT

FAMILY, TABLE = "inet", "otherix"
DIGEST_PREFIX = "otherix:"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
# Declaring the table first makes the delete valid whether or not it existed; the whole
# script is one transaction, so readers see the old table or the new one, never neither.
DROP = f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"


class NftObserved(msgspec.Struct, frozen=True):
    exists: bool
    digest: str | None
    rule_count: int
    forwarding: bool | None = None  # net.ipv4.ip_forward, None when not read


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


class NftDesired(msgspec.Struct, frozen=True, kw_only=True):
    """The wanted table, computed once per heartbeat: script is "" (digest None) for no table."""

    rule_count: int
    digest: str | None
    script: str
    forwarding: bool  # NAT needs IPv4 forwarding on


class NftPlan(msgspec.Struct, frozen=True, kw_only=True):
    enable_forwarding: bool = False
    load: str | None = None  # an ``nft -f`` script (replace or drop our table), None = keep
    digest: str | None = None  # what the table holds after ``load``
    rule_count: int = 0
    before: NftObserved | None = None  # the table as observed: what stays if ``load`` fails

    @property
    def writes(self) -> int:
        return self.enable_forwarding + (self.load is not None)


def desired(
    nat_subnets: Sequence[str], vxlan_only_via: str | None, vxlan_port: int = VXLAN_PORT
) -> NftDesired:
    """Validates everything pasted into the script (no nft injection from a snapshot)."""
    rules = _rules(nat_subnets, vxlan_only_via, vxlan_port)
    digest = _digest(rules) if rules.count else None
    return NftDesired(
        rule_count=rules.count,
        digest=digest,
        script=_render(rules, digest) if digest else "",
        forwarding=bool(nat_subnets),
    )


def plan(want: NftDesired, observed: NftObserved) -> NftPlan:
    enable = want.forwarding and observed.forwarding is False
    if not want.script:
        load = DROP if observed.exists else None
    elif observed.digest == want.digest and observed.rule_count == want.rule_count:
        load = None
    else:
        load = want.script
    return NftPlan(
        enable_forwarding=enable,
        load=load,
        digest=want.digest,
        rule_count=want.rule_count,
        before=observed,
    )


def desired_digest(
    nat_subnets: Sequence[str], vxlan_only_via: str | None, vxlan_port: int = VXLAN_PORT
) -> str | None:
    return desired(nat_subnets, vxlan_only_via, vxlan_port).digest


def render(
    nat_subnets: Sequence[str], vxlan_only_via: str | None, vxlan_port: int = VXLAN_PORT
) -> str:
    """Full ``nft -f`` script replacing our table; "" when nothing is wanted."""
    return desired(nat_subnets, vxlan_only_via, vxlan_port).script


def _render(rules: _Rules, digest: str) -> str:
    lines = [DROP.rstrip("\n"), f"table {FAMILY} {TABLE} {{", f'\tcomment "{digest}"']
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
