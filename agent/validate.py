"""Pure: decide whether a received snapshot may be applied at all, before anything touches the kernel.

The gate works in order of cost: the raw size (before decoding), the schema version, the decode
(undecodable input, text that is not UTF-8 and nesting deeper than the decoder goes are refusals
like any other), node and version, the caps on every list (``schemas.limits``), then the whole
content: device names ASCII and in their naming family; MTUs derived from the underlay MTU;
gateways, NAT subnets and NIC addresses outside the infrastructure prefixes and the
special-purpose ranges; FDB entries unicast and pointing at current peers' tunnel addresses;
WireGuard peers' allowed IPs inside the mesh prefix; ports 1-65535. Every refusal names the field
and its value.

On the wire a node receives a HEAD (``accept_head``: size, schema, decode, node, version) and
assembles the Snapshot from sections (``agent.assemble``); the content checks then run on the
assembled whole (``check_snapshot``), exactly as on a snapshot received whole (``accept``).

A change that only gains and loses FDB entries of a snapshot that passed (``agent.assemble``
says so) is checked by ``check_fdb_change``, in work proportional to the change: the entries
gained pass the same per-entry checks, the counts stay within their caps, and each unicast MAC
keeps one destination (an index the assembler keeps). It only ever says "passes" or "not sure";
on "not sure" the runner runs ``check_snapshot``, so a refusal and its text are always the whole
check's (a property test holds the two to the same answers). ``check_change`` does the same for
a change that may also gain and lose peers (a node joined, left or moved): the peers gained pass
the per-peer checks and hold no key or allowed IP another peer holds (counts the assembler
keeps), and no FDB entry sends to an address no peer holds any more. And for a change that
also gains and loses taps of this node (a VM's NIC attached or detached): the taps gained pass
every rule ``_check_taps`` and ``_check_names`` apply, each within the tap cap, with a name,
MAC and (bridge, address) no other tap holds, and a MAC no FDB entry of a VXLAN on its bridge
has; taps lost only relax those rules.

It never logs, counts or does I/O: the runner calls it before any subsystem runs and counts and
acks a ``Rejected``, so a refused snapshot changes nothing in the kernel.
"""

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Protocol

import msgspec

from agent.errors import AgentError
from schemas import limits, naming
from schemas.codec import decode
from schemas.desired import (
    SNAPSHOT_SCHEMA,
    Bridge,
    FdbEntry,
    Snapshot,
    Tap,
    Vxlan,
    WgPeer,
    WireGuard,
)
from schemas.wire import Head

FLOOD_MAC = "00:00:00:00:00:00"
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_TAP = re.compile(r"ot[0-9a-f]{12}")
_NETWORK_BRIDGE = re.compile(r"otn[0-9a-f]{8}")
_OVERLAY_BRIDGE = re.compile(r"otb([1-9][0-9]{0,7})")
_VXLAN = re.compile(r"otvx([1-9][0-9]{0,7})")
_NIC_ID = re.compile(r"[0-9a-f]{12,32}")
_PORT = re.compile(r"[0-9]{1,5}")


class Rejected(AgentError):
    """The snapshot is refused; the message says why (it is acked to the controller)."""

    def __init__(self, reason: str, version: int = 0):
        super().__init__(reason)
        self.version = version


def accept(raw: bytes, node: str, applied_version: int, known: Snapshot | None = None) -> Snapshot:
    """A whole snapshot as bytes (tests and tools; the wire carries HEADs and sections), or
    ``Rejected``. ``known``: as for ``check_snapshot``."""
    snap = _gate(raw, Snapshot, node, applied_version)
    check_snapshot(snap, known)
    return snap


def accept_head(raw: bytes, node: str, applied_version: int) -> Head:
    """The cheap checks on a HEAD from ``otherix.v1.desired.<node>``: size, schema, decode, node,
    version. The state it names is checked whole, once assembled (``check_snapshot``)."""
    return _gate(raw, Head, node, applied_version)


def check_snapshot(snap: Snapshot, known: Snapshot | None = None) -> "Checked":
    """The caps on every list, then the whole content; raises ``Rejected``. ``known``: a snapshot
    accepted before; the FDB of a VXLAN equal to one of it is not checked entry by entry again
    (same mesh, same taps). Returns what ``check_fdb_change`` needs to check a change of it."""
    try:
        check_limits(snap)
        return check_content(snap, known)
    except ValueError as e:
        raise Rejected(f"invalid snapshot version {snap.version}: {e}", snap.version) from None


class FdbDelta(Protocol):
    """One VXLAN's change (``agent.assemble.FdbChange``): entries gained and lost, and its
    whole FDB now (``view``)."""

    gained: frozenset[FdbEntry]
    lost: frozenset[FdbEntry]

    @property
    def view(self) -> "FdbIndex": ...


class FdbIndex(Protocol):
    counts: dict[FdbEntry, int]  # every entry (with how many items give it)
    dsts: dict[str, set[str]]  # unicast MAC -> its destinations


class MeshDelta(Protocol):
    """The mesh's change (``agent.assemble.MeshChange``): peers gained and lost (a changed peer
    is in both), the index of the peers now (``view``) and whether the FDB sends to an address."""

    gained: frozenset[WgPeer]
    lost: frozenset[WgPeer]

    @property
    def view(self) -> "MeshIndex": ...

    def uses(self, dst: str) -> bool: ...


class TapDelta(Protocol):
    """The taps' change (``agent.assemble.TapChange``): taps gained and lost (a changed tap is
    in both) and whether a VXLAN on a bridge has an FDB entry for a MAC."""

    gained: frozenset[Tap]
    lost: frozenset[Tap]

    def fdb_has(self, bridge: str, mac: str) -> bool: ...


class MeshIndex(Protocol):
    keys: dict[str, int]  # public key -> peers holding it
    ips: dict[str, int]  # allowed IP as written -> times held, over every peer


def check_fdb_change(
    snap: Snapshot, base: Snapshot, checked: "Checked", changes: Mapping[str, FdbDelta]
) -> bool:
    """True when ``snap`` surely passes ``check_snapshot``, given that ``base`` passed it (with
    ``checked``, its result) and ``snap`` is ``base`` with only the FDB entries in ``changes``
    (by VXLAN name) gained and lost: everything else is the same (by identity, or equal), the
    gained entries pass the per-entry checks, the FDB caps hold, and every unicast MAC gained
    has one destination. False means "not sure": run ``check_snapshot``. Cost: the change."""
    return check_change(snap, base, checked, changes) is not None


def check_change(
    snap: Snapshot,
    base: Snapshot,
    checked: "Checked",
    changes: Mapping[str, FdbDelta],
    mesh: MeshDelta | None = None,
    taps: TapDelta | None = None,
) -> "Checked | None":
    """``check_fdb_change``, where the mesh may also have changed by ``mesh``: the peers gained
    pass the per-peer checks, hold a public key and allowed IPs no other peer holds, the peer
    cap holds, the WireGuard device is otherwise the same, and no FDB entry sends to an address
    no peer holds any more. Returns what ``check_snapshot`` would (the mesh's peer addresses
    updated), or None: "not sure", run ``check_snapshot``. Cost: the change (and one C-level
    copy of the set of peer addresses when the mesh changed). ``taps``: the taps gained and
    lost too (``_tap_change``; cost: the change and one pass over this node's taps)."""
    moved = mesh is not None and bool(mesh.gained or mesh.lost)
    tapped = taps is not None and bool(taps.gained or taps.lost)
    same = (
        snap.node == base.node
        and snap.underlay_mtu == base.underlay_mtu
        and _same(snap.bridges, base.bridges)
        and (tapped or _same(snap.taps, base.taps))
        and _same(snap.nat_subnets, base.nat_subnets)
        and _same(snap.infrastructure, base.infrastructure)
        and (moved or _same(snap.wireguard, base.wireguard))
        and len(snap.vxlans) == len(base.vxlans)
    )
    if not same or snap.version < base.version:
        return None
    if moved:
        assert mesh is not None
        now = _mesh_change(snap.wireguard, base.wireguard, checked, mesh)
        if now is None:
            return None
        checked = now
    if tapped:
        assert taps is not None
        tap_macs = _tap_change(snap, checked, taps)
        if tap_macs is None:
            return None
        checked = checked._replace(tap_macs=tap_macs)
    return checked if _fdb_change(snap, base, checked, changes) else None


def _tap_change(
    snap: Snapshot, checked: "Checked", taps: TapDelta
) -> dict[tuple[str, str], str] | None:
    """The taps gained pass what ``check_content`` asks of a tap (every other tap, bridge and
    the rest of ``snap`` being as in a snapshot that passed); returns the local taps' MACs as
    ``_check_vxlans`` would, or None: "not sure"."""
    if len(snap.taps) > limits.MAX_TAPS:
        return None
    names: dict[str, int] = {}
    macs: dict[str, int] = {}
    ips: dict[tuple[str, str], int] = {}
    for t in snap.taps:  # this node's taps (at most MAX_TAPS), never the FDB
        names[t.name] = names.get(t.name, 0) + 1
        if t.mac:
            macs[t.mac] = macs.get(t.mac, 0) + 1
        if t.ip:
            ips[t.bridge, t.ip] = ips.get((t.bridge, t.ip), 0) + 1
    bridges = {b.name: b for b in snap.bridges}
    others = {*bridges, *(v.name for v in snap.vxlans)}
    if snap.wireguard is not None:
        others.add(snap.wireguard.name)
    try:
        blocked = _blocked_ranges(snap.infrastructure, checked.mesh)
        # the bridges passed with the snapshot last applied and are the same: only those the
        # gained taps join are read again (their gateways), not every bridge on the node
        joined = {t.bridge for t in taps.gained}
        gateways = _check_bridges((b for b in snap.bridges if b.name in joined), blocked)
        for t in taps.gained:
            if not t.name.isascii() or not _TAP.fullmatch(t.name):
                return None
            if names.get(t.name) != 1 or t.name in others:
                return None  # the name of another tap or device too
            if t.mac and (macs.get(t.mac) != 1 or taps.fdb_has(t.bridge, t.mac)):
                return None  # another tap's MAC, or one the FDB on its bridge sends away
            if t.ip and ips.get((t.bridge, t.ip)) != 1:
                return None
            _check_taps((t,), bridges, gateways, blocked)  # the per-tap rules, the same code
    except ValueError:
        return None
    tap_macs = dict(checked.tap_macs)
    for t in taps.lost:
        if t.mac and tap_macs.get((t.bridge, t.mac)) == t.name:
            del tap_macs[t.bridge, t.mac]
    tap_macs.update({(t.bridge, t.mac): t.name for t in taps.gained if t.mac})
    return tap_macs


def _mesh_change(
    wg: WireGuard | None, was: WireGuard | None, checked: "Checked", mesh: MeshDelta
) -> "Checked | None":
    if wg is None or was is None or checked.mesh is None:
        return None
    if (wg.name, wg.address, wg.listen_port, wg.mtu) != (
        was.name, was.address, was.listen_port, was.mtu,
    ):  # fmt: skip
        return None
    if len(wg.peers) > limits.MAX_PEERS:
        return None
    keys, ips = mesh.view.keys, mesh.view.ips
    iface = ipaddress.IPv4Interface(wg.address)  # passed as written in ``base``
    added: set[ipaddress.IPv4Address] = set()
    try:
        for peer in mesh.gained:
            if len(peer.allowed_ips) > limits.MAX_ALLOWED_IPS_PER_PEER:
                return None
            nets = _check_peer("peer", peer, iface)
            if keys.get(peer.public_key) != 1 or any(ips.get(a) != 1 for a in peer.allowed_ips):
                return None  # a duplicate key, or an address another peer (or itself) holds
            added.update(net.network_address for net in nets)
    except ValueError:
        return None
    gone = set()
    for peer in mesh.lost:
        for allowed in peer.allowed_ips:
            if allowed not in ips:  # no peer holds it any more
                if mesh.uses(allowed.removesuffix("/32")):
                    return None  # an FDB entry sends there: the whole check refuses it
                gone.add(ipaddress.IPv4Network(allowed).network_address)
    peers = (checked.mesh.peers - gone) | added
    return checked._replace(mesh=checked.mesh._replace(peers=peers))


def _fdb_change(
    snap: Snapshot, base: Snapshot, checked: "Checked", changes: Mapping[str, FdbDelta]
) -> bool:
    total = sum(len(v.fdb) for v in snap.vxlans)
    if total > limits.MAX_FDB_TOTAL:
        return False
    peer_dsts: set[str] = set()
    for v, was in zip(snap.vxlans, base.vxlans, strict=True):
        change = changes.get(v.name)
        if v is was:
            continue
        if (v.name, v.vni, v.bridge, v.local, v.mtu, v.port) != (
            was.name, was.vni, was.bridge, was.local, was.mtu, was.port,
        ):  # fmt: skip
            return False
        if change is None:
            if v.fdb != was.fdb:
                return False
            continue
        if len(v.fdb) > limits.MAX_FDB_PER_VXLAN or (v.fdb and checked.mesh is None):
            return False
        dsts = change.view.dsts
        try:
            for entry in change.gained:
                _check_fdb_entry(f"vxlan {v.name}", v, entry, checked.mesh, checked.tap_macs,
                                 peer_dsts)  # fmt: skip
                if entry.mac != FLOOD_MAC and len(dsts.get(entry.mac, ())) != 1:
                    return False
        except ValueError:
            return False
    return True


def _same(a: object, b: object) -> bool:
    return a is b or a == b


class Checked(NamedTuple):
    """What a passed ``check_content`` learned that checking a change of it needs."""

    mesh: "_Mesh | None"
    tap_macs: dict[tuple[str, str], str]  # (bridge, MAC) -> tap


def _gate(raw: bytes, type_: type, node: str, applied_version: int):
    if len(raw) > limits.MAX_SNAPSHOT_BYTES:
        raise Rejected(
            f"snapshot of {len(raw)} bytes refused unread: the limit is "
            f"{limits.MAX_SNAPSHOT_BYTES} bytes"
        )
    if not raw.isascii():  # JSON is UTF-8, also in fields this agent skips
        try:
            raw.decode()
        except UnicodeDecodeError as e:
            raise Rejected(
                f"malformed snapshot: not UTF-8 text at byte {e.start} ({e.reason})"
            ) from None
    schema = _decode(raw, _SchemaOnly).schema
    if schema != SNAPSHOT_SCHEMA:
        raise Rejected(
            f"snapshot schema {schema} is not supported (this agent speaks {SNAPSHOT_SCHEMA})"
        )
    value = _decode(raw, type_)
    if value.node != node:
        raise Rejected(f"snapshot is for node {value.node!r}, this is {node!r}", value.version)
    if value.version < applied_version:
        raise Rejected(
            f"stale snapshot: version {value.version} is older than applied version {applied_version}",
            value.version,
        )
    return value


class _SchemaOnly(msgspec.Struct):
    schema: int = SNAPSHOT_SCHEMA


class _Head(msgspec.Struct, frozen=True):
    node: str = ""
    version: int = -1
    digest: str = ""
    schema: int = SNAPSHOT_SCHEMA


def same_content(raw: bytes, last_raw: bytes | None, last: Snapshot | None) -> bool:
    """True when ``raw`` (a HEAD, or a whole snapshot) carries the content of ``last`` (a
    snapshot that passed before): the same bytes (an unchanged heartbeat's HEAD), or the same
    node, schema, version and digest (the controller's digest covers all content; only
    ``published_at`` and attached sections may differ). Cheap: no content is decoded, and
    anything unexpected answers False, which sends ``raw`` through ``accept``."""
    if last is None:
        return False
    if raw == last_raw:
        return True
    if not last.digest or len(raw) > limits.MAX_SNAPSHOT_BYTES:
        return False
    try:
        head = decode(raw, _Head)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return head == _Head(last.node, last.version, last.digest, last.schema)


def _decode(raw: bytes, type_: type):
    try:
        return decode(raw, type_)
    except msgspec.DecodeError as e:  # also ValidationError: wrong types, missing fields
        raise Rejected(f"malformed snapshot: {e}") from None
    except UnicodeDecodeError as e:
        raise Rejected(f"malformed snapshot: a string is not UTF-8 text ({e})") from None
    except RecursionError:
        raise Rejected("malformed snapshot: JSON nested too deeply to decode") from None


def check_limits(snap: Snapshot) -> None:
    """Every list within its cap (``schemas.limits``), before any per-item work."""
    caps = [
        ("bridges", len(snap.bridges), limits.MAX_BRIDGES),
        ("taps", len(snap.taps), limits.MAX_TAPS),
        ("vxlans", len(snap.vxlans), limits.MAX_VXLANS),
        ("nat_subnets", len(snap.nat_subnets), limits.MAX_NAT_SUBNETS),
        ("infrastructure", len(snap.infrastructure), limits.MAX_INFRASTRUCTURE),
    ]
    if len(snap.vxlans) <= limits.MAX_VXLANS:
        caps += [
            (f"vxlans[{i}].fdb", len(v.fdb), limits.MAX_FDB_PER_VXLAN)
            for i, v in enumerate(snap.vxlans)
        ]
        caps.append(
            ("fdb (all vxlans)", sum(len(v.fdb) for v in snap.vxlans), limits.MAX_FDB_TOTAL)
        )
    if snap.wireguard is not None:
        peers = snap.wireguard.peers
        caps.append(("wireguard.peers", len(peers), limits.MAX_PEERS))
        if len(peers) <= limits.MAX_PEERS:
            caps += [
                (
                    f"wireguard.peers[{i}].allowed_ips",
                    len(p.allowed_ips),
                    limits.MAX_ALLOWED_IPS_PER_PEER,
                )
                for i, p in enumerate(peers)
            ]
    for field, count, cap in caps:
        if count > cap:
            raise ValueError(f"{field} has {count} entries, more than the limit of {cap}")


class _Mesh(NamedTuple):
    prefix: ipaddress.IPv4Network
    own: ipaddress.IPv4Address  # this node's tunnel address
    peers: frozenset[ipaddress.IPv4Address]  # current peers' tunnel addresses (their /32s)


class _Range(NamedTuple):
    """A prefix no gateway, NAT subnet or NIC address may overlap, as integers for speed."""

    first: int
    last: int
    words: str  # e.g. "the mesh prefix 100.64.0.0/16"


def _range(net: ipaddress.IPv4Network, words: str) -> _Range:
    return _Range(int(net.network_address), int(net.broadcast_address), words)


def check_content(snap: Snapshot, known: Snapshot | None = None) -> Checked:
    """The whole snapshot is one the agent may program: see the module docstring. ``known``:
    a snapshot that passed; its VXLAN FDBs are not checked again where nothing they depend on
    (the mesh, the taps, the VXLAN itself) changed."""
    _check_names(snap)
    _check_mtus(snap)
    mesh = _check_wireguard(snap.wireguard)
    blocked = _blocked_ranges(snap.infrastructure, mesh)
    gateways = _check_bridges(snap.bridges, blocked)
    _check_taps(snap.taps, {b.name: b for b in snap.bridges}, gateways, blocked)
    _check_nat(snap.nat_subnets, gateways, blocked)
    checked: set[Vxlan] = set()
    if known is not None and known.wireguard == snap.wireguard and known.taps == snap.taps:
        checked = set(known.vxlans)
    return Checked(mesh, _check_vxlans(snap, mesh, checked))


# --- names and MTUs ----------------------------------------------------------------------------


def _overlay_vni(name: str) -> int | None:
    m = _OVERLAY_BRIDGE.fullmatch(name)
    return int(m[1]) if m and int(m[1]) <= naming.VNI_MAX else None


_BRIDGE = (
    "bridge name (otn + 8 hex digits, or otb + a VNI)",
    lambda n: bool(_NETWORK_BRIDGE.fullmatch(n)) or _overlay_vni(n) is not None,
)
_TAP_NAME = ("tap name (ot + 12 hex digits)", lambda n: bool(_TAP.fullmatch(n)))
_VXLAN_NAME = ("VXLAN name (otvx + a VNI)", lambda n: bool(_VXLAN.fullmatch(n)))
_WG_NAME = (f"WireGuard name ({naming.WIREGUARD_IFNAME})", lambda n: n == naming.WIREGUARD_IFNAME)


def _check_names(snap: Snapshot) -> None:
    devices = [
        *((f"bridges[{i}]", b.name, _BRIDGE) for i, b in enumerate(snap.bridges)),
        *((f"taps[{i}]", t.name, _TAP_NAME) for i, t in enumerate(snap.taps)),
        *((f"vxlans[{i}]", v.name, _VXLAN_NAME) for i, v in enumerate(snap.vxlans)),
    ]
    if snap.wireguard is not None:
        devices.append(("wireguard", snap.wireguard.name, _WG_NAME))
    seen: set[str] = set()
    for where, name, (family, valid) in devices:
        if not name.isascii():
            raise _bad(where, "name", name, "is not ASCII")
        if not valid(name):
            raise _bad(where, "name", name, f"is not an Otherix {family}")
        if name in seen:
            raise _bad(where, "name", name, "appears twice")
        seen.add(name)


def _check_mtus(snap: Snapshot) -> None:
    u = snap.underlay_mtu
    if not naming.MIN_UNDERLAY_MTU <= u <= naming.MAX_UNDERLAY_MTU:
        raise _bad(
            "snapshot",
            "underlay_mtu",
            u,
            f"is outside {naming.MIN_UNDERLAY_MTU}..{naming.MAX_UNDERLAY_MTU}",
        )
    overlay, mesh = naming.overlay_mtu(u), naming.wireguard_mtu(u)
    expected = [
        *(
            (f"bridge {b.name}", b.mtu, overlay if _overlay_vni(b.name) else u)
            for b in snap.bridges
        ),
        *((f"vxlan {v.name}", v.mtu, overlay) for v in snap.vxlans),
    ]
    if snap.wireguard is not None:
        expected.append((f"wireguard {snap.wireguard.name}", snap.wireguard.mtu, mesh))
    for where, mtu, want in expected:
        if mtu != want:
            raise _bad(where, "mtu", mtu, f"is not {want}, its MTU on an underlay MTU of {u}")


# --- the mesh ----------------------------------------------------------------------------------


def _check_wireguard(wg: WireGuard | None) -> _Mesh | None:
    if wg is None:
        return None
    where = f"wireguard {wg.name}"
    iface = _interface(where, "address", wg.address)
    prefix = iface.network
    if special := limits.special_range(prefix):
        raise _bad(where, "address", wg.address, f"puts the mesh prefix {prefix} on {special}")
    if not 8 <= prefix.prefixlen <= 30:
        raise _bad(where, "address", wg.address, "has a mesh prefix outside /8../30")
    if iface.ip in (prefix.network_address, prefix.broadcast_address):
        raise _bad(
            where, "address", wg.address, "is the mesh prefix's network or broadcast address"
        )
    _port(where, "listen_port", wg.listen_port)
    keys: set[str] = set()
    routed: list[tuple[ipaddress.IPv4Network, str]] = []
    for i, peer in enumerate(wg.peers):
        at = f"{where} peers[{i}]"
        nets = _check_peer(at, peer, iface)
        if peer.public_key in keys:
            raise _bad(at, "public_key", peer.public_key, "belongs to another peer too")
        keys.add(peer.public_key)
        routed += ((net, at) for net in nets)
    if pair := _first_overlap(routed):
        (net, _), (other, at) = pair
        raise _bad(at, "allowed_ips", str(other), f"overlaps {net} of another peer")
    peers = frozenset(net.network_address for net, _ in routed if net.prefixlen == 32)
    return _Mesh(prefix, iface.ip, peers)


def _check_peer(
    at: str, peer: WgPeer, iface: ipaddress.IPv4Interface
) -> list[ipaddress.IPv4Network]:
    """One peer on its own (the others aside: duplicates and overlaps are the caller's); its
    allowed IPs as networks, each a /32 inside the mesh prefix that is not this node's."""
    prefix = iface.network
    if peer.node and not naming.valid_id(peer.node):
        raise _bad(at, "node", peer.node, "is not a node name")
    if not _is_wg_key(peer.public_key):
        raise _bad(at, "public_key", peer.public_key, "is not a base64 WireGuard key")
    _check_endpoint(at, peer.endpoint, prefix)
    nets = []
    for allowed in peer.allowed_ips:
        net = _network(at, "allowed_ips", allowed)
        if not net.subnet_of(prefix):
            raise _bad(at, "allowed_ips", allowed, f"is outside the mesh prefix {prefix}")
        if iface.ip in net:
            raise _bad(
                at, "allowed_ips", allowed, f"holds this node's own tunnel address {iface.ip}"
            )
        if net.prefixlen != 32:  # a peer is one tunnel address; a wider one widens the guard
            raise _bad(at, "allowed_ips", allowed, "is not a single tunnel address (/32)")
        nets.append(net)
    return nets


def _check_endpoint(where: str, endpoint: str, mesh: ipaddress.IPv4Network) -> None:
    host, colon, port = endpoint.rpartition(":")
    if not colon or not _PORT.fullmatch(port):
        raise _bad(where, "endpoint", endpoint, "is not ip:port")
    ip = _address(where, "endpoint", host)
    _port(where, "endpoint port", int(port))
    if special := limits.special_range(ipaddress.IPv4Network(ip)):
        raise _bad(where, "endpoint", endpoint, f"is in {special}")
    if ip in mesh:
        raise _bad(where, "endpoint", endpoint, f"is inside the mesh prefix {mesh} it would carry")


def _blocked_ranges(infrastructure: Iterable[str], mesh: _Mesh | None) -> list[_Range]:
    blocked = [_range(net, words) for net, words in limits.SPECIAL_RANGES]
    if mesh is not None:
        p = mesh.prefix
        blocked.append(_range(p, f"the mesh prefix {p}"))
    for cidr in infrastructure:
        net = _network("snapshot", "infrastructure", cidr)
        if net.prefixlen == 0:
            raise _bad("snapshot", "infrastructure", cidr, "is the whole IPv4 space")
        if mesh is None or net != mesh.prefix:
            blocked.append(_range(net, f"the infrastructure prefix {net}"))
    return blocked


def _check_routable(
    where: str, field: str, value: str, net: ipaddress.IPv4Network, blocked: list[_Range]
) -> None:
    """Never the whole space, the infrastructure or a special-purpose range."""
    if net.prefixlen == 0:
        raise _bad(where, field, value, "is the whole IPv4 space")
    mine = _range(net, "")
    for r in blocked:
        if mine.first <= r.last and r.first <= mine.last:
            raise _bad(where, field, value, f"overlaps {r.words}")


# --- bridges, taps, NAT --------------------------------------------------------------------------


def _check_bridges(
    bridges: Iterable[Bridge], blocked: list[_Range]
) -> dict[str, ipaddress.IPv4Interface]:
    """Each gateway address by bridge name."""
    gateways: dict[str, ipaddress.IPv4Interface] = {}
    for b in bridges:
        where = f"bridge {b.name}"
        if b.network and not naming.valid_id(b.network):
            raise _bad(where, "network", b.network, "is not a network name")
        if b.address is None:
            continue
        if not _NETWORK_BRIDGE.fullmatch(b.name):  # an overlay has no way into the node
            raise _bad(where, "address", b.address, "is set on an overlay bridge")
        iface = _interface(where, "address", b.address)
        _check_routable(where, "address", b.address, iface.network, blocked)
        if not 8 <= iface.network.prefixlen <= 30:
            raise _bad(
                where,
                "address",
                b.address,
                "has a prefix outside /8../30 (a gateway with room for NICs)",
            )
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise _bad(where, "address", b.address, "is its subnet's network or broadcast address")
        gateways[b.name] = iface
    if pair := _first_overlap([(g.network, name) for name, g in gateways.items()]):
        (net, name), (_, other) = pair
        raise _bad(
            f"bridge {other}", "address", str(gateways[other]), f"overlaps {net} of bridge {name}"
        )
    return gateways


def _check_taps(
    taps: Iterable[Tap],
    bridges: dict[str, Bridge],
    gateways: dict[str, ipaddress.IPv4Interface],
    blocked: list[_Range],
) -> None:
    macs: dict[str, str] = {}
    ips: dict[tuple[str, ipaddress.IPv4Address], str] = {}
    for t in taps:
        where = f"tap {t.name}"
        bridge = bridges.get(t.bridge)
        if bridge is None:
            raise _bad(where, "bridge", t.bridge, "is not a bridge of this snapshot")
        if t.mtu != bridge.mtu:
            raise _bad(where, "mtu", t.mtu, f"is not {bridge.mtu}, the MTU of its bridge")
        if t.nic and (not _NIC_ID.fullmatch(t.nic) or t.name != naming.PREFIX + t.nic[:12]):
            raise _bad(where, "nic", t.nic, "is not the NIC id the tap is named after")
        if t.mac:
            _check_mac(where, "mac", t.mac, flood_ok=False)
            if t.mac in macs:
                raise _bad(where, "mac", t.mac, f"is the MAC of tap {macs[t.mac]} too")
            macs[t.mac] = t.name
        if t.ip:
            ip = _address(where, "ip", t.ip)
            _check_routable(where, "ip", t.ip, ipaddress.IPv4Network(ip), blocked)
            gateway = gateways.get(t.bridge)
            if gateway is not None:
                subnet = gateway.network
                if ip not in subnet:
                    raise _bad(where, "ip", t.ip, f"is outside its network's subnet {subnet}")
                if ip in (subnet.network_address, subnet.broadcast_address, gateway.ip):
                    raise _bad(
                        where,
                        "ip",
                        t.ip,
                        f"is the gateway, network or broadcast address of {subnet}",
                    )
            if (t.bridge, ip) in ips:
                raise _bad(where, "ip", t.ip, f"is the address of tap {ips[t.bridge, ip]} too")
            ips[t.bridge, ip] = t.name


def _check_nat(
    nat_subnets: Iterable[str], gateways: dict[str, ipaddress.IPv4Interface], blocked: list[_Range]
) -> None:
    """Masquerade only the subnet of a bridge this snapshot gives a gateway."""
    served = {g.network for g in gateways.values()}
    seen: set[ipaddress.IPv4Network] = set()
    for cidr in nat_subnets:
        net = _network("snapshot", "nat_subnets", cidr)
        _check_routable("snapshot", "nat_subnets", cidr, net, blocked)
        if net not in served:
            raise _bad(
                "snapshot", "nat_subnets", cidr, "is not the subnet of a bridge's gateway address"
            )
        if net in seen:
            raise _bad("snapshot", "nat_subnets", cidr, "appears twice")
        seen.add(net)


# --- the overlay -------------------------------------------------------------------------------


def _check_vxlans(
    snap: Snapshot, mesh: _Mesh | None, checked: set[Vxlan]
) -> dict[tuple[str, str], str]:
    """Returns the local taps' MACs by (bridge, MAC), as the FDB checks used them."""
    bridges = {b.name for b in snap.bridges}
    tap_macs = {(t.bridge, t.mac): t.name for t in snap.taps if t.mac}
    peer_dsts: set[str] = set()  # FDB destinations already found to be current peers
    for v in snap.vxlans:
        where = f"vxlan {v.name}"
        if not naming.VNI_MIN <= v.vni <= naming.VNI_MAX:
            raise _bad(where, "vni", v.vni, f"is outside {naming.VNI_MIN}..{naming.VNI_MAX}")
        if v.name != naming.vxlan_device(v.vni):
            raise _bad(
                where,
                "vni",
                v.vni,
                f"does not match the device name ({naming.vxlan_device(v.vni)} would)",
            )
        if v.bridge != naming.overlay_bridge(v.vni) or v.bridge not in bridges:
            raise _bad(
                where,
                "bridge",
                v.bridge,
                f"is not {naming.overlay_bridge(v.vni)}, a bridge of this snapshot",
            )
        _port(where, "port", v.port)
        local = _address(where, "local", v.local)
        if mesh is None:
            if v.fdb:  # nothing could carry them: the mesh is the only way to a peer
                raise ValueError(
                    f"{where}: fdb has {len(v.fdb)} entries but the snapshot has no WireGuard mesh"
                )
            if special := limits.special_range(ipaddress.IPv4Network(local)):
                raise _bad(where, "local", v.local, f"is in {special}")
        elif local != mesh.own:
            raise _bad(where, "local", v.local, f"is not this node's tunnel address {mesh.own}")
        if v in checked:
            continue  # its entries passed with this mesh and these taps
        destination: dict[str, str] = {}
        for entry in v.fdb:
            _check_fdb_entry(where, v, entry, mesh, tap_macs, peer_dsts)
            if entry.mac != FLOOD_MAC:
                if destination.setdefault(entry.mac, entry.dst) != entry.dst:
                    raise _bad(
                        where,
                        "fdb mac",
                        entry.mac,
                        f"is sent to {destination[entry.mac]} and {entry.dst}",
                    )
    return tap_macs


def _check_fdb_entry(
    where: str,
    v: Vxlan,
    entry: FdbEntry,
    mesh: _Mesh | None,
    tap_macs: dict[tuple[str, str], str],
    peer_dsts: set[str],
) -> None:
    """One FDB entry on its own: a unicast (or the flood) MAC that is no local tap's, sent to a
    current peer's tunnel address. ``peer_dsts``: destinations already found to be peers."""
    _check_mac(where, "fdb mac", entry.mac, flood_ok=True)
    if (v.bridge, entry.mac) in tap_macs:
        raise _bad(
            where,
            "fdb mac",
            entry.mac,
            f"is the MAC of local tap {tap_macs[v.bridge, entry.mac]}",
        )
    assert mesh is not None  # no FDB without the mesh (checked before)
    if entry.dst in peer_dsts:  # thousands of entries share a few hundred peers
        return
    if (dst := _address(where, "fdb dst", entry.dst)) not in mesh.prefix:
        raise _bad(where, "fdb dst", entry.dst, f"is outside the mesh prefix {mesh.prefix}")
    if dst not in mesh.peers:
        raise _bad(
            where,
            "fdb dst",
            entry.dst,
            "is not a current peer's tunnel address (a /32 of its allowed_ips)",
        )
    peer_dsts.add(entry.dst)


# --- values ------------------------------------------------------------------------------------


def _bad(where: str, field: str, value: object, why: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 64:  # the message travels in an ack: never echo a huge value back
        shown = shown[:60] + "...'"
    return ValueError(f"{where}: {field} {shown} {why}")


def _parsed(kind: type, noun: str, where: str, field: str, value: str):
    """``kind(value)`` in its canonical spelling, so every parser downstream reads the same."""
    try:
        parsed = kind(value)
    except (ValueError, TypeError) as e:
        raise _bad(where, field, value, f"is not an IPv4 {noun} ({e})") from None
    if str(parsed) != value:
        raise _bad(where, field, value, f"is not written canonically as {parsed}")
    return parsed


def _address(where: str, field: str, value: str) -> ipaddress.IPv4Address:
    return _parsed(ipaddress.IPv4Address, "address", where, field, value)


def _interface(where: str, field: str, value: str) -> ipaddress.IPv4Interface:
    return _parsed(ipaddress.IPv4Interface, "address/prefix", where, field, value)


def _network(where: str, field: str, value: str) -> ipaddress.IPv4Network:
    return _parsed(ipaddress.IPv4Network, "network", where, field, value)


def _port(where: str, field: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise _bad(where, field, value, "is not a UDP port (1-65535)")


def _check_mac(where: str, field: str, mac: str, flood_ok: bool) -> None:
    if not _MAC.fullmatch(mac):
        raise _bad(where, field, mac, "is not a lowercase MAC like 02:00:00:00:00:01")
    if mac == FLOOD_MAC and flood_ok:
        return
    if mac == FLOOD_MAC or int(mac[:2], 16) & 1:
        kind = "an all-zero" if mac == FLOOD_MAC else "a broadcast or multicast"
        flood = f" ({FLOOD_MAC} floods)" if flood_ok else ""
        raise _bad(where, field, mac, f"is {kind} MAC; it must be unicast{flood}")


def _is_wg_key(value: str) -> bool:
    try:
        return len(value) == 44 and len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _first_overlap(items: list[tuple[ipaddress.IPv4Network, str]]):
    """Two overlapping networks (the earlier-starting first), or None: sorted, so O(n log n)."""
    widest = None
    for item in sorted(items, key=lambda it: (it[0].network_address, -it[0].prefixlen)):
        if widest is not None and item[0].network_address <= widest[0].broadcast_address:
            return widest, item
        if widest is None or item[0].broadcast_address > widest[0].broadcast_address:
            widest = item
    return None
