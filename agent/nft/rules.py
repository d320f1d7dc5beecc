"""Pure nftables rule sets for the two tables Otherix owns: ``inet otherix`` and ``bridge otherix``.

snapshot → ``NftSpec`` (validated, typed values) → ``NftDesired`` (nft JSON commands, digest,
set contents) → ``render`` (one ``nft -j -f -`` transaction that replaces both tables, carrying
the drop counters over). ``parse_observed`` reads back ``nft -j list table``; ``plan`` compares.
No I/O here (``agent.nft.applier`` runs ``nft``); nothing here names any other table.

What the rules do (the README's "what a VM can reach" is this, in words):

- ``bridge otherix``: port security. A frame from a tap with port security is forwarded (to
  another port or to the host) only if its source MAC is the NIC's, its EtherType IPv4 or ARP
  (no IPv6, no VLAN tags), an IPv4 source the NIC's address (0.0.0.0 too is refused: there is no
  DHCP), an ARP packet Ethernet/IPv4 request or reply whose sender MAC and IP are the NIC's.
  The per-NIC values live in sets keyed by interface, so the rule count does not grow per NIC.
- ``inet otherix`` input: UDP to the VXLAN port only on ``otwg0``, from a current peer's
  tunnel address, to this node's own tunnel address. From a VM bridge, only ICMP echo to that
  bridge's own gateway and replies to connections the node made (a VM is never a client of the
  node: no DNS, no DHCP, no metadata service is offered); everything else, the node's other
  addresses and overlay bridges (no address, no way in) included, is dropped.
- ``inet otherix`` forward: from a VM bridge, frames bridged within it pass (br_netfilter shows
  them here with in = out = the bridge); routed packets only from NAT bridges, never into
  ``otwg0`` or the infrastructure prefixes (mesh, underlay), never with a source the bridge
  cannot route back to (strict reverse path). NAT networks keep their isolation from each other.

Every drop is counted in a named counter, one per reason (``REASONS``): the agent reports them
as ``Health.drops``. The digest of the rule set is stored in every rule's comment (nft 1.0.6
does not export table comments in JSON), so a no-op heartbeat is one read and zero writes.
"""

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping

import msgspec

from schemas.desired import Snapshot
from schemas.naming import PREFIX, VXLAN_PREFIX, WIREGUARD_IFNAME

TABLE = "otherix"
FAMILIES = ("inet", "bridge")
FAMILY = "inet"  # the routed-traffic table (NAT, isolation, VXLAN guard)
DIGEST_PREFIX = "otherix:"

# drop counters, one per reason
PS_MAC = "port_security_mac"  # source MAC is not the NIC's
PS_ETHERTYPE = "port_security_ethertype"  # neither IPv4 nor ARP (IPv6, VLAN tags, ...)
PS_IP = "port_security_ip"  # IPv4 source is not the NIC's address
PS_ARP = "port_security_arp"  # ARP not Ethernet/IPv4, or sender MAC/IP not the NIC's
PS_UNKNOWN = "port_security_unknown_tap"  # a port of ours nftables does not know (yet)
HOST = "host_isolation"  # a VM addressing the node itself
FORWARD = "forward_isolation"  # a VM routing into the mesh, the infrastructure, or spoofing
NETWORK = "network_isolation"  # into a NAT network from outside it, unsolicited
VXLAN = "vxlan_guard"  # VXLAN not from a current peer through the mesh to us
REASONS = (PS_MAC, PS_ETHERTYPE, PS_IP, PS_ARP, PS_UNKNOWN, HOST, FORWARD, NETWORK, VXLAN)

_IFNAME = re.compile(r"^ot[a-z0-9]{1,13}$")  # every device Otherix manages, ASCII only
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# --- the spec: what a snapshot asks of nftables, validated -----------------------------------------


class SecuredTap(msgspec.Struct, frozen=True, order=True):
    name: str
    mac: str | None  # None: the NIC has no MAC yet, nothing leaves the tap
    ip: str | None  # None: no IPv4 leaves the tap


class VmBridge(msgspec.Struct, frozen=True, order=True):
    name: str
    gateway: str | None = None  # the node's address on it (NAT networks only)


class VxlanGuard(msgspec.Struct, frozen=True, kw_only=True):
    ports: tuple[int, ...]
    local: str | None  # this node's tunnel address; None: accept no VXLAN at all
    # VNI → the current peers that host it (its FDB's destinations): a peer may send VXLAN only
    # into the networks it shares with us, not into any VNI (found by review)
    vnis: tuple[tuple[int, tuple[str, ...]], ...] = ()


class NftSpec(msgspec.Struct, frozen=True, kw_only=True):
    nat_subnets: tuple[str, ...] = ()
    bridges: tuple[VmBridge, ...] = ()
    secured_taps: tuple[SecuredTap, ...] = ()
    taps: tuple[str, ...] = ()  # every tap: a bridge port, never an input device of its own
    infrastructure: tuple[str, ...] = ()
    vxlan_guard: VxlanGuard | None = None
    mesh: str = WIREGUARD_IFNAME


def _ifname(name: str) -> str:
    if not _IFNAME.match(name):
        raise ValueError(f"bad interface name {name!r}")
    return name


def _mac(mac: str) -> str | None:
    if not mac:
        return None
    mac = mac.lower()
    if not _MAC.match(mac) or int(mac[:2], 16) & 1:
        raise ValueError(f"bad unicast MAC {mac!r}")
    return mac


def _ip(value: str) -> str | None:
    return str(ipaddress.IPv4Address(value)) if value else None


def _nets(values: Iterable[str]) -> tuple[str, ...]:
    nets = [ipaddress.IPv4Network(v, strict=False) for v in values]
    return tuple(str(n) for n in ipaddress.collapse_addresses(nets))


def spec(snapshot: Snapshot, mesh: str = WIREGUARD_IFNAME) -> NftSpec:
    """The snapshot's nftables part; a ValueError for any value that is not what it claims."""
    guard = None
    if snapshot.vxlans:  # the guard is the agent's choice: VXLAN only through the mesh
        ports = sorted({v.port for v in snapshot.vxlans})
        if not all(0 < p < 65536 for p in ports):
            raise ValueError(f"bad VXLAN port in {ports}")
        wg = snapshot.wireguard
        peers = {
            ipaddress.IPv4Network(ip, strict=False)
            for p in (wg.peers if wg else ())
            for ip in p.allowed_ips
        }
        # a peer is one /32 (set lookup); only wider ones are scanned: O(dsts), not dsts × peers
        hosts = {n.network_address for n in peers if n.prefixlen == 32}
        wider = [n for n in peers if n.prefixlen != 32]
        guard = VxlanGuard(
            ports=tuple(ports),
            local=str(ipaddress.IPv4Interface(wg.address).ip) if wg else None,
            vnis=tuple(
                (
                    v.vni,
                    tuple(
                        sorted(  # each distinct dst parsed once: thousands share a few peers
                            dst
                            for dst in {e.dst for e in v.fdb}
                            for addr in (ipaddress.IPv4Address(dst),)
                            if addr in hosts or any(addr in n for n in wider)
                        )
                    ),
                )
                for v in sorted(snapshot.vxlans, key=lambda v: v.vni)
            ),
        )
    return NftSpec(
        # one entry per network, never collapsed: 10.0.0.0/24 and 10.0.1.0/24 merged into a /23
        # would let the two networks reach each other unmasqueraded (found by review)
        nat_subnets=tuple(
            sorted({str(ipaddress.IPv4Network(s, strict=False)) for s in snapshot.nat_subnets})
        ),
        bridges=tuple(
            sorted(
                VmBridge(
                    _ifname(b.name),
                    str(ipaddress.IPv4Interface(b.address).ip) if b.address else None,
                )
                for b in snapshot.bridges
            )
        ),
        secured_taps=tuple(
            sorted(
                SecuredTap(_ifname(t.name), _mac(t.mac), _ip(t.ip))
                for t in snapshot.taps
                if t.port_security
            )
        ),
        taps=tuple(sorted(_ifname(t.name) for t in snapshot.taps)),
        infrastructure=_nets(snapshot.infrastructure),
        vxlan_guard=guard,
        mesh=_ifname(mesh),
    )


# --- nft JSON expressions ----------------------------------------------------------------------


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _field(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _concat(*items) -> dict:
    return {"concat": list(items)}


def _count(name: str) -> dict:
    return {"counter": name}


_DROP, _ACCEPT, _RETURN = {"drop": None}, {"accept": None}, {"return": None}
# the VNI in a VXLAN header: after the 8-byte UDP header and 4 bytes of flags, 24 bits
_VNI = {"payload": {"base": "th", "offset": 96, "len": 24}}
_NO_ROUTE_BACK = _match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, False)


def _element(net: str):
    """An interval set element as ``nft -j list`` prints it (a /32 is a plain address)."""
    n = ipaddress.IPv4Network(net)
    if n.prefixlen == 32:
        return str(n.network_address)
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


class _Table:
    """Sets, chains and rules of one table, in order, as nft JSON objects (without family)."""

    def __init__(self, family: str):
        self.family = family
        self.counters: list[str] = []
        self.sets: list[dict] = []
        self.chains: list[dict] = []
        self.rules: list[dict] = []

    def set(self, name: str, type_, elements: Iterable, interval: bool = False) -> str:
        spec: dict = {"name": name, "type": type_}
        if interval:
            spec["flags"] = ["interval"]
        elements = sorted(elements, key=_canonical)
        if elements:
            spec["elem"] = elements
        self.sets.append(spec)
        return "@" + name

    def chain(self, name: str, hook: tuple[str, str, int] | None = None) -> str:
        spec: dict = {"name": name}
        if hook is not None:
            spec.update(type=hook[0], hook=hook[1], prio=hook[2], policy="accept")
        self.chains.append(spec)
        return name

    def rule(self, chain: str, *expr: dict) -> None:
        for e in expr:
            if "counter" in e and e["counter"] not in self.counters:
                self.counters.append(e["counter"])
        self.rules.append({"chain": chain, "expr": list(expr)})

    @property
    def empty(self) -> bool:
        return not self.rules


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _bridge_table(spec: NftSpec) -> _Table:
    t = _Table("bridge")
    if not spec.taps:
        return t
    pre = t.chain("prerouting", ("filter", "prerouting", -200))  # before any bridging decision
    iif = _meta("iifname")
    # Links bridge a new tap before these rules are loaded, and a failed load would leave it so:
    # a frame from a port of ours that is neither a tap known here nor a VXLAN port is dropped
    # (fail closed), so no VM sends a frame past port security before its rules are in force.
    known = t.set("taps", "ifname", list(spec.taps))
    t.rule(pre, _match(iif, f"{PREFIX}*"), _match(iif, f"{VXLAN_PREFIX}*", "!="),
           _match(iif, known, "!="), _count(PS_UNKNOWN), _DROP)  # fmt: skip
    if not spec.secured_taps:
        return t
    taps = spec.secured_taps
    secured = t.set("secured", "ifname", [tap.name for tap in taps])
    macs = t.set(
        "nic_mac", ["ifname", "ether_addr"], [_concat(x.name, x.mac) for x in taps if x.mac]
    )
    ips = t.set("nic_ip", ["ifname", "ipv4_addr"], [_concat(x.name, x.ip) for x in taps if x.ip])
    ps = t.chain("port_security")
    t.rule(pre, _match(iif, secured), {"jump": {"target": ps}})
    t.rule(ps, _match(_concat(iif, _field("ether", "saddr")), macs, "!="), _count(PS_MAC), _DROP)
    ether_type = _field("ether", "type")
    t.rule(ps, _match(ether_type, {"set": ["ip", "arp"]}, "!="), _count(PS_ETHERTYPE), _DROP)
    t.rule(ps, _match(_concat(iif, _field("ip", "saddr")), ips, "!="), _count(PS_IP), _DROP)
    arp_shape = _concat(*(_field("arp", f) for f in ("htype", "ptype", "hlen", "plen")))
    t.rule(ps, _match(arp_shape, {"set": [_concat(1, "ip", 6, 4)]}, "!="), _count(PS_ARP), _DROP)
    ops = {"set": ["request", "reply"]}
    t.rule(ps, _match(_field("arp", "operation"), ops, "!="), _count(PS_ARP), _DROP)
    for field, allowed in (("saddr ether", macs), ("saddr ip", ips)):
        sender = _concat(iif, _field("arp", field))
        t.rule(ps, _match(sender, allowed, "!="), _count(PS_ARP), _DROP)
    return t


def _inet_table(spec: NftSpec) -> _Table:
    t = _Table("inet")
    iif, oif = _meta("iifname"), _meta("oifname")
    saddr, daddr = _field("ip", "saddr"), _field("ip", "daddr")
    if spec.nat_subnets:
        post = t.chain("postrouting", ("nat", "postrouting", 100))
        for s in spec.nat_subnets:
            t.rule(post, _match(saddr, _element(s)), _match(daddr, _element(s), "!="),
                   {"masquerade": None})  # fmt: skip
    bridges = spec.bridges
    guard = spec.vxlan_guard
    # Frames to link-local group MACs (01:80:c2:00:00:0X) skip the bridge's hooks and reach the
    # host stack with the tap itself as input device, past port security (found by review):
    # nothing legitimate arrives on a tap, which is only ever a bridge port.
    taps = t.set("taps", "ifname", spec.taps) if spec.taps else None
    if guard is not None or bridges:
        inp = t.chain("input", ("filter", "input", -10))  # before the default filter priority
        if taps is not None:
            t.rule(inp, _match(iif, taps), _count(HOST), _DROP)
        if guard is not None:
            vx = t.chain("vxlan_guard")
            t.rule(inp, _match(_field("udp", "dport"), {"set": list(guard.ports)}), {"jump": {"target": vx}})  # fmt: skip
            for vni, senders in guard.vnis if guard.local is not None else ():
                if senders:
                    t.rule(vx, _match(iif, spec.mesh), _match(daddr, guard.local),
                           _match(_VNI, vni), _match(saddr, {"set": list(senders)}), _RETURN)  # fmt: skip
            t.rule(vx, _count(VXLAN), _DROP)
        if bridges:
            vm_bridges = t.set("vm_bridges", "ifname", [b.name for b in bridges])
            gateways = t.set(
                "gateways",
                ["ifname", "ipv4_addr"],
                [_concat(b.name, b.gateway) for b in bridges if b.gateway],
            )
            host = t.chain("vm_to_host")
            t.rule(inp, _match(iif, vm_bridges), {"jump": {"target": host}})
            t.rule(host, _NO_ROUTE_BACK, _count(HOST), _DROP)
            ct_state = {"ct": {"key": "state"}}
            t.rule(host, _match(ct_state, ["established"], "in"), _ACCEPT)
            to_gateway = _match(_concat(iif, daddr), gateways)
            # ICMP errors "related" to the node's flows only towards the VM's own gateway: one
            # quoting the node's WireGuard flow to its underlay address lowered the node's path
            # MTU to a peer (found by review)
            t.rule(host, _match(ct_state, ["related"], "in"), to_gateway, _ACCEPT)
            echo = _match(_field("icmp", "type"), "echo-request")
            t.rule(host, to_gateway, echo, _ACCEPT)
            t.rule(host, _count(HOST), _DROP)
    if bridges or spec.nat_subnets:
        fwd = t.chain("forward", ("filter", "forward", -10))
        if bridges:
            bridged = t.set(
                "bridged", ["ifname", "ifname"], [_concat(b.name, b.name) for b in bridges]
            )
            routed = t.set("routed", "ifname", [b.name for b in bridges if b.gateway])
            vm = t.chain("vm_forward")
            if taps is not None:
                t.rule(fwd, _match(iif, taps), _count(FORWARD), _DROP)
            t.rule(fwd, _match(iif, vm_bridges), {"jump": {"target": vm}})
            t.rule(vm, _match(_concat(iif, oif), bridged), _RETURN)
            t.rule(vm, _match(oif, spec.mesh), _count(FORWARD), _DROP)
            if spec.infrastructure:
                infra = t.set(
                    "infrastructure", "ipv4_addr", map(_element, spec.infrastructure), True
                )
                t.rule(vm, _match(daddr, infra), _count(FORWARD), _DROP)
            t.rule(vm, _match(iif, routed, "!="), _count(FORWARD), _DROP)
            t.rule(vm, _NO_ROUTE_BACK, _count(FORWARD), _DROP)
        # NAT networks behave like a home router's LAN: nothing enters one from another subnet
        # unless it answers a connection made from inside. Addresses, not devices, so bridged
        # traffic within one network (br_netfilter) is untouched.
        ct_state = {"ct": {"key": "state"}}
        for s in spec.nat_subnets:
            into = (_match(daddr, _element(s)), _match(saddr, _element(s), "!="))
            t.rule(fwd, *into, _match(ct_state, ["established", "related"], "in"), _ACCEPT)
            t.rule(fwd, *into, _count(NETWORK), _DROP)
    return t


# --- desired, render, observed, plan ---------------------------------------------------------


class Counter(msgspec.Struct, frozen=True):
    packets: int = 0
    bytes: int = 0


class NftDesired(msgspec.Struct, frozen=True, kw_only=True):
    """The wanted tables, computed once per heartbeat: digest None (no rules) for no table."""

    rule_count: int
    digest: str | None
    forwarding: bool  # NAT needs IPv4 forwarding on
    sets: dict[str, tuple[str, ...]] = {}  # "family set" → canonical elements
    tables: tuple[dict, ...] = ()  # per table: family, counters, sets, chains, rules


class NftObserved(msgspec.Struct, frozen=True):
    exists: bool  # any of our tables
    digest: str | None
    rule_count: int
    forwarding: bool | None = None  # net.ipv4.ip_forward, None when not read
    sets: dict[str, tuple[str, ...]] = {}
    counters: dict[str, Counter] = {}

    @property
    def drops(self) -> dict[str, int]:
        return {name: c.packets for name, c in sorted(self.counters.items())}


class NftPlan(msgspec.Struct, frozen=True, kw_only=True):
    enable_forwarding: bool = False
    load: str | None = None  # an ``nft -j -f -`` batch (replace or drop our tables), None = keep
    digest: str | None = None  # what the tables hold after ``load``
    rule_count: int = 0
    before: NftObserved | None = None  # the tables as observed: what stays if ``load`` fails
    sets: dict[str, tuple[str, ...]] = {}  # what the sets hold after ``load``, as observed

    @property
    def writes(self) -> int:
        return self.enable_forwarding + (self.load is not None)


def desired(spec: NftSpec) -> NftDesired:
    tables = tuple(
        {
            "family": t.family,
            "counters": tuple(t.counters),
            "sets": tuple(t.sets),
            "chains": tuple(t.chains),
            "rules": tuple(t.rules),
        }
        for t in (_inet_table(spec), _bridge_table(spec))
        if not t.empty
    )
    count = sum(len(t["rules"]) for t in tables)
    digest = (
        DIGEST_PREFIX + hashlib.sha256(_canonical(tables).encode()).hexdigest()[:16]
        if count
        else None
    )
    sets = {
        f"{t['family']} {s['name']}": tuple(_canonical(e) for e in s.get("elem", ()))
        for t in tables
        for s in t["sets"]
    }
    return NftDesired(
        rule_count=count,
        digest=digest,
        forwarding=bool(spec.nat_subnets),
        sets=sets,
        tables=tables,
    )


def _flush_ours() -> list[dict]:
    # Declaring each table first makes its delete valid whether or not it existed; the whole
    # batch is one transaction, so readers see the old tables or the new ones, never neither.
    ours = [{"family": f, "name": TABLE} for f in FAMILIES]
    return [{"add": {"table": t}} for t in ours] + [{"delete": {"table": t}} for t in ours]


DROP = json.dumps({"nftables": _flush_ours()})


def render(want: NftDesired, counters: Mapping[str, Counter] = {}) -> str:
    """One ``nft -j -f -`` batch replacing both tables; drop counters carry ``counters`` over."""
    if want.digest is None:
        return DROP
    cmds: list[dict] = [{"metainfo": {"json_schema_version": 1}}, *_flush_ours()]
    for t in want.tables:
        where = {"family": t["family"], "table": TABLE}
        cmds.append({"add": {"table": {"family": t["family"], "name": TABLE}}})
        for name in t["counters"]:
            kept = counters.get(name, Counter())
            cmds.append({"add": {"counter": {**where, "name": name, "packets": kept.packets, "bytes": kept.bytes}}})  # fmt: skip
        cmds += [{"add": {"set": {**where, **s}}} for s in t["sets"]]
        cmds += [{"add": {"chain": {**where, **c}}} for c in t["chains"]]
        cmds += [{"add": {"rule": {**where, **r, "comment": want.digest}}} for r in t["rules"]]
    return json.dumps({"nftables": cmds})


def parse_observed(*listings: dict) -> NftObserved:
    """``nft -j list table`` outputs of our existing tables → what we compare against."""
    digests: set[str | None] = set()
    count = 0
    sets: dict[str, tuple[str, ...]] = {}
    counters: dict[str, Counter] = {}
    for listing in listings:
        for item in listing.get("nftables", ()):
            if "rule" in item:
                count += 1
                digests.add(item["rule"].get("comment"))
            elif "set" in item:
                s = item["set"]
                elements = sorted(_canonical(e) for e in s.get("elem", ()))
                sets[f"{s.get('family')} {s.get('name')}"] = tuple(elements)
            elif "counter" in item:
                c = item["counter"]
                counters[c["name"]] = Counter(c.get("packets", 0), c.get("bytes", 0))
    # every rule must carry the same digest, otherwise the tables are not ours as rendered
    digest = digests.pop() if len(digests) == 1 else None
    return NftObserved(
        exists=bool(listings), digest=digest, rule_count=count, sets=sets, counters=counters
    )


def plan(want: NftDesired, observed: NftObserved) -> NftPlan:
    enable = want.forwarding and observed.forwarding is False
    sets = {}
    if want.digest is None:
        load = DROP if observed.exists else None
    elif (
        observed.digest == want.digest
        and observed.rule_count == want.rule_count
        and observed.sets == (sets := {k: tuple(sorted(v)) for k, v in want.sets.items()})
    ):
        load = None
    else:
        load = render(want, observed.counters)
        sets = sets or {k: tuple(sorted(v)) for k, v in want.sets.items()}
    return NftPlan(
        enable_forwarding=enable,
        load=load,
        digest=want.digest,
        rule_count=want.rule_count,
        before=observed,
        sets=sets,
    )
