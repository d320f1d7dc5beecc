"""Conformance: does a lab node's kernel equal its desired snapshot, exactly?

Three parts, kept apart so the comparison is testable without a kernel:

- ``desired_snapshot``: the node's latest desired state, read from the bus with the node's own
  identity (a HEAD, assembled from its sections as the agent does). It is the only place here
  that knows how desired state reaches a node.
- ``observe``: what the kernel holds, read INDEPENDENTLY of the agent's code, with the standard
  tools run inside the node's namespace (``ip -d -j addr``: ``ip -d -j link`` plus addresses;
  ``bridge -j fdb``, ``nft -j list ruleset``, ``sysctl net.ipv4.ip_forward``), and ``wg show
  otwg0 dump`` inside the agent's mount + net namespace (wireguard-go's UAPI socket lives on a
  private tmpfs there). Never runs a tool outside the lab's namespaces.
- ``compare``: pure, snapshot + ``KernelView`` → one readable line per difference. Devices not
  named ``ot…`` are never read into the view, so they can never be reported.

What is desired is derived here from the snapshot (devices, MTUs, masters, addresses, FDBs, flood
lists, peers), not from the agent's planner. nftables is the one exception: the expected rule
set is rendered with the agent's pure ``agent.nft.rules``. That is not circular: the rules are
the snapshot's meaning (the agent's unit tests and the isolation e2e tests check what they do),
and the observed side is the kernel's own listing, so a flushed, stale, edited or partial table
is still caught; what this cannot catch is a wrong rule *design*, which is not conformance.
"""

import asyncio
import contextlib
import ipaddress
import json
import time

import msgspec

from agent.assemble import Assembler, BadSection, complete
from agent.nft import rules as nft_rules
from client.api import ApiClient, ApiError
from lab.netns import run
from schemas import naming
from schemas.codec import decode
from schemas.desired import Snapshot
from schemas.wire import Head

FLOOD_MAC = "00:00:00:00:00:00"
# what a desired device's kind may read as: wireguard-go's otwg0 is a tun device
_KINDS = {
    "bridge": {"bridge"},
    "tap": {"tun"},
    "vxlan": {"vxlan"},
    "wireguard": {"wireguard", "tun"},
}


class ConformanceError(Exception):
    """The desired state or the kernel could not be read (not a difference: nothing to compare)."""


# --- the kernel as observed ---------------------------------------------------------------------


class LinkView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    mtu: int
    up: bool
    master: str | None = None
    addresses: frozenset[str] = frozenset()  # IPv4 "ip/prefixlen"
    vni: int | None = None  # VXLAN only
    local: str | None = None
    port: int | None = None
    learning: bool | None = None  # VXLAN device learning
    port_learning: bool | None = None  # as a bridge port


class PeerView(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str | None
    allowed_ips: frozenset[str]


class WgView(msgspec.Struct, frozen=True, kw_only=True):
    public_key: str
    listen_port: int
    peers: dict[str, PeerView] = {}


class KernelView(msgspec.Struct, frozen=True, kw_only=True):
    links: dict[str, LinkView] = {}  # ot* devices only
    vxlan_fdb: dict[str, frozenset[tuple[str, str]]] = {}  # otvx* → (mac, dst), every entry
    vxlan_learned: dict[str, frozenset[tuple[str, str]]] = {}  # of those, the non-permanent
    port_fdb: dict[str, dict[str, str]] = {}  # bridge → mac → port (static entries on ot* ports)
    port_learned: dict[str, frozenset[str]] = {}  # ot* port → MACs the bridge learned there
    wireguard: WgView | None = None
    wireguard_error: str | None = None  # why otwg0 could not be read (it exists)
    # family → our table as {"chains": {...}, "sets": {...}, "rules": {...}, "counters": {...}}
    nft: dict[str, dict] = {}
    forwarding: bool | None = None  # net.ipv4.ip_forward (None: not read)


def parse_links(addr_json: list[dict]) -> dict[str, LinkView]:
    """``ip -d -j addr show`` → the ``ot…`` devices."""
    links = {}
    for item in addr_json:
        name = item["ifname"]
        if not naming.is_managed(name):
            continue
        info = item.get("linkinfo", {})
        data = info.get("info_data") or {}
        slave = info.get("info_slave_data") or {}
        vxlan = info.get("info_kind") == "vxlan"
        links[name] = LinkView(
            name=name,
            kind=info.get("info_kind", ""),
            mtu=item["mtu"],
            up="UP" in item.get("flags", ()),
            master=item.get("master"),
            addresses=frozenset(
                f"{a['local']}/{a['prefixlen']}"
                for a in item.get("addr_info", ())
                if a.get("family") == "inet"
            ),
            vni=data.get("id") if vxlan else None,
            local=data.get("local") if vxlan else None,
            port=data.get("port") if vxlan else None,
            learning=data.get("learning") if vxlan else None,
            port_learning=slave.get("learning")
            if info.get("info_slave_kind") == "bridge"
            else None,
        )
    return links


def parse_fdb(fdb_json: list[dict], links: dict[str, LinkView]) -> dict:
    """``bridge -j fdb show`` → the entries on ``ot…`` ports and ``otvx*`` devices. The
    kernel's own ``permanent`` bridge entries (a port's own address) are not anyone's intent."""
    vxlan: dict[str, set] = {}
    learned_vx: dict[str, set] = {}
    port: dict[str, dict[str, str]] = {}
    learned_port: dict[str, set] = {}
    for e in fdb_json:
        dev, mac = e.get("ifname", ""), e.get("mac", "").lower()
        if not naming.is_managed(dev):
            continue
        state = e.get("state", "")
        link = links.get(dev)
        if "dst" in e and link is not None and link.kind == "vxlan":
            vxlan.setdefault(dev, set()).add((mac, e["dst"]))
            if state != "permanent":
                learned_vx.setdefault(dev, set()).add((mac, e["dst"]))
        elif e.get("master") and state != "permanent":
            if state == "static":
                port.setdefault(e["master"], {})[mac] = dev
            else:
                learned_port.setdefault(dev, set()).add(mac)
    return {
        "vxlan_fdb": {k: frozenset(v) for k, v in vxlan.items()},
        "vxlan_learned": {k: frozenset(v) for k, v in learned_vx.items()},
        "port_fdb": port,
        "port_learned": {k: frozenset(v) for k, v in learned_port.items()},
    }


def parse_wg_dump(text: str) -> WgView:
    """``wg show otwg0 dump``: the device line, then one line per peer (tab-separated)."""
    lines = [line.split("\t") for line in text.strip().splitlines()]
    if not lines or len(lines[0]) < 3:
        raise ConformanceError(f"unexpected wg dump: {text[:200]!r}")
    peers = {}
    for f in lines[1:]:
        endpoint = None if f[2] == "(none)" else f[2]
        allowed = frozenset() if f[3] in ("(none)", "") else frozenset(f[3].split(","))
        peers[f[0]] = PeerView(endpoint=endpoint, allowed_ips=allowed)
    return WgView(public_key=lines[0][1], listen_port=int(lines[0][2]), peers=peers)


def parse_nft(ruleset_json: dict) -> dict[str, dict]:
    """``nft -j list ruleset`` → our tables (``<family> otherix``) as comparable values."""
    tables: dict[str, dict] = {}
    for item in ruleset_json.get("nftables", ()):
        kind, body = next(iter(item.items()))
        if kind == "metainfo" or body.get("family") not in nft_rules.FAMILIES:
            continue
        if body.get("table", body.get("name")) != nft_rules.TABLE:
            continue  # another program's table
        if kind == "table":
            tables.setdefault(body["family"], _empty_table())
            continue
        table = tables.setdefault(body["family"], _empty_table())
        if kind == "chain":
            table["chains"][body["name"]] = _chain_value(body)
        elif kind == "set":
            table["sets"][body["name"]] = _set_value(body)
        elif kind == "rule":
            table["rules"].setdefault(body["chain"], []).append(_norm(body["expr"]))
        elif kind == "counter":
            table["counters"].add(body["name"])
    return tables


def _empty_table() -> dict:
    return {"chains": {}, "sets": {}, "rules": {}, "counters": set()}


def _chain_value(chain: dict) -> str:
    if "hook" not in chain:
        return "regular"
    return f"{chain.get('type')} hook {chain['hook']} prio {chain.get('prio')} policy {chain.get('policy')}"


def _set_value(s: dict) -> tuple:
    elements = sorted(json.dumps(_norm(e), sort_keys=True) for e in s.get("elem", ()))
    return (json.dumps(s.get("type")), tuple(sorted(s.get("flags", ()))), tuple(elements))


def _norm(value):
    """nft prints a one-element anonymous set or list as the element itself."""
    if isinstance(value, dict):
        if set(value) == {"set"} and isinstance(value["set"], list) and len(value["set"]) == 1:
            return _norm(value["set"][0])
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return _norm(value[0]) if len(value) == 1 else [_norm(v) for v in value]
    return value


def expected_nft(snapshot: Snapshot) -> dict[str, dict]:
    """Our tables as the snapshot wants them, in the same shape as ``parse_nft``'s."""
    want = nft_rules.desired(nft_rules.spec(snapshot))
    tables = {}
    for t in want.tables:
        table = _empty_table()
        table["chains"] = {c["name"]: _chain_value(c) for c in t["chains"]}
        table["sets"] = {s["name"]: _set_value(s) for s in t["sets"]}
        for r in t["rules"]:
            table["rules"].setdefault(r["chain"], []).append(_norm(r["expr"]))
        table["counters"] = set(t["counters"])
        tables[t["family"]] = table
    return tables


# --- the comparison (pure) ----------------------------------------------------------------------


class _Want(msgspec.Struct, kw_only=True):
    kind: str  # key of _KINDS
    mtu: int
    master: str | None = None
    addresses: frozenset[str] = frozenset()
    vxlan: tuple[int, str, int] | None = None  # vni, local, port


def _wanted_links(s: Snapshot) -> dict[str, _Want]:
    want: dict[str, _Want] = {}
    for b in s.bridges:
        addrs = frozenset({_iface(b.address)}) if b.address else frozenset()
        want[b.name] = _Want(kind="bridge", mtu=b.mtu, addresses=addrs)
    for v in s.vxlans:
        want[v.name] = _Want(
            kind="vxlan", mtu=v.mtu, master=v.bridge, vxlan=(v.vni, v.local, v.port)
        )
    for t in s.taps:
        want[t.name] = _Want(kind="tap", mtu=t.mtu, master=t.bridge)
    if s.wireguard is not None:
        wg = s.wireguard
        want[wg.name] = _Want(
            kind="wireguard", mtu=wg.mtu, addresses=frozenset({_iface(wg.address)})
        )
    return want


def _iface(address: str) -> str:
    return str(ipaddress.IPv4Interface(address))


def _wanted_vxlan_fdb(s: Snapshot) -> dict[str, set[tuple[str, str]]]:
    """Per VXLAN: every flood (BUM) destination, and one dst per unicast MAC (the lowest, should
    a snapshot repeat a MAC: one unicast MAC has one entry in the kernel)."""
    want = {}
    for v in s.vxlans:
        entries: set[tuple[str, str]] = set()
        unicast: dict[str, str] = {}
        for e in v.fdb:
            mac = e.mac.lower()
            if mac == FLOOD_MAC or int(mac[:2], 16) & 1:
                entries.add((mac, e.dst))
            else:
                unicast[mac] = min(e.dst, unicast.get(mac, e.dst))
        want[v.name] = entries | set(unicast.items())
    return want


def _wanted_port_fdb(s: Snapshot) -> dict[str, dict[str, str]]:
    """Per bridge: MAC → port. Remote NICs on the VXLAN port, local NICs on their tap (a local
    tap wins a MAC wanted on both, e.g. a NIC moving here)."""
    want: dict[str, dict[str, str]] = {b.name: {} for b in s.bridges}
    bridge_of = {v.name: v.bridge for v in s.vxlans}
    for name, entries in _wanted_vxlan_fdb(s).items():
        for mac, _ in entries:
            if mac != FLOOD_MAC and not int(mac[:2], 16) & 1:
                want.setdefault(bridge_of[name], {})[mac] = name
    for t in sorted(s.taps, key=lambda t: t.name, reverse=True):
        if t.mac:
            want.setdefault(t.bridge, {})[t.mac.lower()] = t.name
    return want


def compare(snapshot: Snapshot, view: KernelView) -> list[str]:
    """Every difference between what ``snapshot`` wants and what the kernel has, one line each;
    empty when they are equal. Pure."""
    diffs: list[str] = []
    want = _wanted_links(snapshot)
    for name, w in sorted(want.items()):
        link = view.links.get(name)
        if link is None:
            diffs.append(f"{name}: {w.kind} missing")
            continue
        if link.kind not in _KINDS[w.kind]:
            diffs.append(f"{name}: kind {link.kind or '?'}, desired {w.kind}")
        if link.mtu != w.mtu:
            diffs.append(f"{name}: mtu {link.mtu}, desired {w.mtu}")
        if link.master != w.master:
            diffs.append(f"{name}: master {link.master}, desired {w.master}")
        if not link.up:
            diffs.append(f"{name}: down, desired up")
        if link.addresses != w.addresses:
            diffs.append(
                f"{name}: addresses {sorted(link.addresses)}, desired {sorted(w.addresses)}"
            )
        if w.master is not None and link.port_learning is not False:
            diffs.append(f"{name}: bridge port learning {link.port_learning}, desired off")
        if w.vxlan is not None:
            vni, local, port = w.vxlan
            for what, have, wanted in (
                ("vni", link.vni, vni),
                ("local", link.local, local),
                ("port", link.port, port),
                ("learning", link.learning, False),
            ):
                if have != wanted:
                    diffs.append(f"{name}: {what} {have}, desired {wanted}")
    for name, link in sorted(view.links.items()):
        if name not in want:
            kind = "tap" if link.kind == "tun" and name != naming.WIREGUARD_IFNAME else link.kind
            diffs.append(f"{name}: stray {kind or 'device'}, not desired")

    diffs += _compare_vxlan_fdb(snapshot, view, want)
    diffs += _compare_port_fdb(snapshot, view)
    diffs += _compare_wireguard(snapshot, view)
    diffs += _compare_nft(snapshot, view)
    if snapshot.nat_subnets and view.forwarding is False:  # the agent turns it on, never off
        diffs.append("sysctl: net.ipv4.ip_forward 0, desired 1 (NAT networks)")
    return diffs


def _compare_vxlan_fdb(snapshot: Snapshot, view: KernelView, want_links: dict) -> list[str]:
    diffs = []
    wanted = _wanted_vxlan_fdb(snapshot)
    for dev in sorted(set(wanted) | set(view.vxlan_fdb)):
        if dev not in view.links or dev not in want_links:
            continue  # a missing or stray device is reported once, above
        have = view.vxlan_fdb.get(dev, frozenset())
        want = wanted.get(dev, set())
        for mac, dst in sorted(want - have):
            what = "flood entry" if mac == FLOOD_MAC else "fdb"
            diffs.append(f"{dev}: {what} {mac} → {dst} missing")
        for mac, dst in sorted(have - want):
            what = "flood entry" if mac == FLOOD_MAC else "fdb"
            diffs.append(f"{dev}: {what} {mac} → {dst} not desired")
        for mac, dst in sorted(view.vxlan_learned.get(dev, frozenset()) & want):
            diffs.append(f"{dev}: fdb {mac} → {dst} learned, desired static")
    return diffs


def _compare_port_fdb(snapshot: Snapshot, view: KernelView) -> list[str]:
    diffs = []
    wanted = _wanted_port_fdb(snapshot)
    for bridge in sorted(set(wanted) | set(view.port_fdb)):
        have = view.port_fdb.get(bridge, {})
        want = wanted.get(bridge, {})
        for mac in sorted(set(want) | set(have)):
            if mac not in have:
                diffs.append(f"{bridge}: fdb {mac} → port {want[mac]} missing")
            elif mac not in want:
                diffs.append(f"{bridge}: fdb {mac} → port {have[mac]} not desired")
            elif have[mac] != want[mac]:
                diffs.append(f"{bridge}: fdb {mac} on port {have[mac]}, desired {want[mac]}")
    for port, macs in sorted(view.port_learned.items()):
        diffs += [f"{port}: learned fdb {mac}, learning is off" for mac in sorted(macs)]
    return diffs


def _compare_wireguard(snapshot: Snapshot, view: KernelView) -> list[str]:
    wg = snapshot.wireguard
    name = naming.WIREGUARD_IFNAME
    if wg is None or name not in view.links:
        return []  # desired but missing, or present but not desired: reported with the links
    if view.wireguard is None:
        return [f"{name}: peers unreadable ({view.wireguard_error or 'no dump'})"]
    have = view.wireguard
    diffs = []
    if have.listen_port != wg.listen_port:
        diffs.append(f"{name}: listen port {have.listen_port}, desired {wg.listen_port}")
    want = {p.public_key: p for p in wg.peers if p.public_key != have.public_key}
    for key in sorted(set(want) | set(have.peers)):
        peer = have.peers.get(key)
        if peer is None:
            diffs.append(f"{name}: peer {key} missing")
            continue
        if key not in want:
            diffs.append(f"{name}: peer {key} not desired")
            continue
        endpoint = _endpoint(want[key].endpoint)
        if peer.endpoint != endpoint:
            diffs.append(f"{name}: peer {key} endpoint {peer.endpoint}, desired {endpoint}")
        allowed = {str(ipaddress.ip_network(a, strict=False)) for a in want[key].allowed_ips}
        if peer.allowed_ips != allowed:
            diffs.append(
                f"{name}: peer {key} allowed ips {sorted(peer.allowed_ips)}, desired {sorted(allowed)}"
            )
    return diffs


def _endpoint(endpoint: str) -> str | None:
    if not endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def _compare_nft(snapshot: Snapshot, view: KernelView) -> list[str]:
    diffs = []
    want = expected_nft(snapshot)
    for family in sorted(set(want) | set(view.nft)):
        label = f"nft: table {family} {nft_rules.TABLE}"
        if family not in view.nft:
            diffs.append(f"{label} missing")
            continue
        if family not in want:
            diffs.append(f"{label} not desired")
            continue
        have, wanted = view.nft[family], want[family]
        for what in ("chains", "sets"):
            for name in sorted(set(have[what]) | set(wanted[what])):
                h, w = have[what].get(name), wanted[what].get(name)
                if h is None:
                    diffs.append(f"{label}: {what[:-1]} {name} missing")
                elif w is None:
                    diffs.append(f"{label}: {what[:-1]} {name} not desired")
                elif h != w:
                    diffs.append(f"{label}: {what[:-1]} {name} is {_short(h)}, desired {_short(w)}")
        for chain in sorted(set(have["rules"]) | set(wanted["rules"])):
            h, w = have["rules"].get(chain, []), wanted["rules"].get(chain, [])
            if h == w:
                continue
            diffs.append(f"{label}: chain {chain} has {len(h)} rules, desired {len(w)}")
            dump = [json.dumps(r, sort_keys=True) for r in h]
            for i, rule in enumerate(w):
                if i >= len(h) or h[i] != rule:
                    where = (
                        "missing"
                        if json.dumps(rule, sort_keys=True) not in dump
                        else "out of order"
                    )
                    diffs.append(f"{label}: chain {chain} rule {i} {_short(rule)} {where}")
            for rule in h:
                if rule not in w:
                    diffs.append(f"{label}: chain {chain} rule {_short(rule)} not desired")
        for counter in sorted(wanted["counters"] - have["counters"]):
            diffs.append(f"{label}: counter {counter} missing")
    return diffs


def _short(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the lab side: reading desired state and the kernel ------------------------------------------


async def desired_snapshot(lab, node: str, timeout: float = 10.0) -> Snapshot:
    """The node's desired state as the controller publishes it: the next HEAD on its subject
    (every heartbeat), assembled from its sections exactly as the agent does (``agent.assemble``,
    fetching with ``section.get``), read with the node's own bus identity straight from
    nats-server (never through a fault proxy).

    The one place that knows how desired state reaches a node: when the wire protocol changes,
    only this function changes."""
    try:
        nc = await lab.nats_client(node, connect_timeout=timeout, allow_reconnect=False)
    except Exception as e:  # nats-server down or restarting: nothing to compare against
        raise ConformanceError(f"cannot reach the bus as {node}: {e!r}") from None
    try:
        async with asyncio.timeout(timeout):
            return await _assemble_next(nc, node)
    except TimeoutError:
        raise ConformanceError(
            f"no desired snapshot for {node} on {naming.desired_subject(node)} within {timeout}s"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def _assemble_next(nc, node: str) -> Snapshot:
    """HEADs until one assembles (a section that moved on while fetched waits for the next)."""
    heads: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg) -> None:
        heads.put_nowait(msg.data)

    await nc.subscribe(naming.desired_subject(node), cb=on_msg)
    assembler, api = Assembler(node), ApiClient(nc, timeout=2.0)
    while True:
        data = await heads.get()
        try:
            head = decode(data, Head)
        except msgspec.MsgspecError as e:
            raise ConformanceError(f"desired HEAD for {node} does not decode: {e}") from None
        try:
            snap = await complete(assembler, head, api.section_get)
        except (ApiError, BadSection) as e:
            raise ConformanceError(
                f"desired state for {node} version {head.version}: sections not complete: {e}"
            ) from None
        if snap is not None:
            return snap


async def observe(lab, node: str) -> KernelView:
    """The node's kernel as the standard tools print it, inside the node's namespaces."""
    netns = lab.node_netns(node)

    async def tool(*argv: str) -> str:
        return await run("ip", "netns", "exec", netns, *argv, timeout=20.0)

    addr, fdb, ruleset, forwarding = await asyncio.gather(
        tool("ip", "-d", "-j", "addr", "show"),
        tool("bridge", "-j", "fdb", "show"),
        tool("nft", "-j", "list", "ruleset"),
        tool("sysctl", "-n", "net.ipv4.ip_forward"),
    )
    links = parse_links(json.loads(addr))
    wg, wg_error = None, None
    if naming.WIREGUARD_IFNAME in links:
        pid = lab.agent_pid(node)
        if pid is None:
            wg_error = f"agent of {node} not running: its mount namespace holds the UAPI socket"
        else:
            try:
                # the agent runs in the node's network namespace: -n stays inside the lab
                dump = await run("nsenter", "-t", str(pid), "-m", "-n", "wg", "show",
                                 naming.WIREGUARD_IFNAME, "dump", timeout=20.0)  # fmt: skip
                wg = parse_wg_dump(dump)
            except Exception as e:  # a restarting wireguard-go: a difference, not a crash
                wg_error = str(e)[:300]
    return KernelView(
        links=links,
        **parse_fdb(json.loads(fdb or "[]"), links),
        wireguard=wg,
        wireguard_error=wg_error,
        nft=parse_nft(json.loads(ruleset or "{}")),
        forwarding=forwarding.strip() == "1",
    )


async def conformance(lab, node: str, timeout: float = 10.0) -> list[str]:
    """Differences between ``node``'s kernel and its latest desired snapshot ([] = conformant)."""
    snapshot = await desired_snapshot(lab, node, timeout)
    return compare(snapshot, await observe(lab, node))


async def _conformance_or_why(lab, node: str) -> list[str]:
    try:
        return await conformance(lab, node)
    except Exception as e:  # a lab in the middle of a restart
        return [f"{node}: check failed: {e}"]


async def wait_conformant(lab, nodes, timeout: float = 30.0, interval: float = 0.2) -> int:
    """Until every node in ``nodes`` is conformant; the number of checks made. A check that
    cannot be made (bus down, agent restarting) counts as not conformant yet. Raises
    AssertionError with each node's last differences on timeout."""
    deadline = time.monotonic() + timeout
    checks = 0
    pending = list(nodes)
    last: dict[str, list[str]] = {}
    while True:
        results = await asyncio.gather(*(_conformance_or_why(lab, n) for n in pending))
        checks += len(pending)
        last = {n: d for n, d in zip(pending, results, strict=True) if d}
        pending = list(last)
        if not pending:
            return checks
        if time.monotonic() > deadline:
            detail = "; ".join(f"{n}: " + " | ".join(d[:10]) for n, d in last.items())
            raise AssertionError(f"not conformant within {timeout}s: {detail}")
        await asyncio.sleep(interval)
