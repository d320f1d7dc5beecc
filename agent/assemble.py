"""Pure: the agent's copy of its sections, and the ``Snapshot`` assembled from them.

The controller's HEAD names the sections this node needs by version and digest
(``schemas.wire``). ``Assembler.offer`` takes section content from anywhere (a delta attached to
a HEAD, a fetch reply, a page of one) and keeps it only when it checks out: a delta applies only
to the exact version it was made from, and every result must have the digest the controller
announced, so a dropped, duplicated or reordered message is ignored, never half-applied.
``missing`` says which sections to fetch; ``snapshot`` assembles only when every section is held
at the HEAD's digest (never a mix of old and new), into the ``Snapshot`` the validation gate and
the appliers have always taken.

A change costs what it changes: each VNI section's FDB is kept as ``build`` makes it, entry by
entry (``FdbView``: reference counts, sorted), the mesh peer by peer (``MeshView``), and the
parts built from the node section are reused while its digest stays, so assembling after a
one-entry delta touches one entry (plus a copy of that VXLAN's or the peers' tuple) and shares
every unchanged part, by identity, with the snapshot before. ``change`` tells the runner what
changed since the snapshot it last ``mark``ed: the FDB entries gained and lost per VXLAN when
nothing else did (``mesh_change``: and the peers gained and lost, when the mesh changed by
deltas; ``tap_change``: and the taps gained and lost, when the node section changed only in
its taps, by deltas), else None (then everything is checked and planned whole).

No I/O, no clock, no logging: ``complete`` fetches through the callable it is given
(``agent.runner`` passes a ``section.get`` request).
"""

from bisect import bisect_left, insort
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from schemas.codec import decode, encode
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan, WgPeer, WireGuard
from schemas.wire import (
    MESH_SECTION,
    NODE_SECTION,
    BridgeItem,
    FdbItem,
    Head,
    Item,
    NatItem,
    PeerItem,
    Ref,
    SectionData,
    SectionGet,
    Settings,
    TapItem,
    VxlanItem,
    WgItem,
    add_hash,
    digest_of,
    item_hash,
    item_key,
    section_vni,
    sub_hash,
    vni_section,
)

FLOOD_MAC = "00:00:00:00:00:00"


class BadSection(ValueError):
    """Section content that cannot be decoded; the message names the section."""


@dataclass
class Held:
    version: int = 0
    total: int = 0
    items: dict[str, Item] = field(default_factory=dict)
    hashes: dict[str, int] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return digest_of(self.total)


@dataclass
class _Pages:
    version: int
    digest: str
    pages: int
    got: dict[int, list[tuple[Item, int]]] = field(default_factory=dict)


def _items(data: SectionData) -> list[tuple[Item, int]]:
    out = []
    for raw in data.upserts:
        blob = bytes(raw)
        try:
            item = decode(blob, Item)
        except msgspec.DecodeError as e:
            raise BadSection(f"section {data.name} version {data.version}: {e}") from None
        out.append((item, item_hash(blob)))
    return out


def _whole(version: int, items: Iterable[tuple[Item, int]]) -> Held:
    held = Held(version=version)
    for item, h in items:
        key = item_key(item)
        if key in held.hashes:
            held.total = sub_hash(held.total, held.hashes[key])
        held.items[key], held.hashes[key] = item, h
        held.total = add_hash(held.total, h)
    return held


class FdbView:
    """One VNI section's FDB as ``build`` makes it for this node, kept item by item: every
    entry with the number of items that give it (a destination's flood entry is shared), in
    sorted order, each unicast MAC's destinations, and the entries gained and lost since
    ``mark`` (a journal of net changes)."""

    def __init__(self) -> None:
        self.counts: dict[FdbEntry, int] = {}
        self.order: list[FdbEntry] = []
        self.dsts: dict[str, set[str]] = {}  # unicast MAC -> destinations (one, when valid)
        self.gained: set[FdbEntry] = set()
        self.lost: set[FdbEntry] = set()
        self._fdb: tuple[FdbEntry, ...] | None = ()

    @property
    def fdb(self) -> tuple[FdbEntry, ...]:
        if self._fdb is None:
            self._fdb = tuple(self.order)
        return self._fdb

    def add(self, entry: FdbEntry) -> None:
        count = self.counts.get(entry, 0)
        self.counts[entry] = count + 1
        if count:
            return
        insort(self.order, entry)
        self._fdb = None
        if entry.mac != FLOOD_MAC:
            self.dsts.setdefault(entry.mac, set()).add(entry.dst)
        if entry in self.lost:
            self.lost.discard(entry)
        else:
            self.gained.add(entry)

    def remove(self, entry: FdbEntry) -> None:
        count = self.counts[entry]
        if count > 1:
            self.counts[entry] = count - 1
            return
        del self.counts[entry]
        del self.order[bisect_left(self.order, entry)]
        self._fdb = None
        if entry.mac != FLOOD_MAC:
            dsts = self.dsts[entry.mac]
            dsts.discard(entry.dst)
            if not dsts:
                del self.dsts[entry.mac]
        if entry in self.gained:
            self.gained.discard(entry)
        else:
            self.lost.add(entry)


def fdb_entries(node: str, item: Item) -> tuple[FdbEntry, ...]:
    """What one VNI section item adds to this node's FDB: a remote NIC's entry and the flood
    entry of its destination; nothing for this node's own NICs."""
    if isinstance(item, FdbItem) and item.node != node:
        return (FdbEntry(mac=FLOOD_MAC, dst=item.dst), FdbEntry(mac=item.mac, dst=item.dst))
    return ()


class MeshView:
    """The mesh section as this node's peers (``build``'s ``WgPeer``s, itself left out), kept
    item by item: the peers in sorted order, how many peers hold each public key and each allowed
    IP (what the change check needs to find a duplicate in work proportional to the change), and
    the peers gained and lost since ``mark`` (a peer that changed is its old value lost and its
    new one gained)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.by_key: dict[str, WgPeer] = {}  # item key -> the peer it gives
        self.order: list[WgPeer] = []
        self.keys: dict[str, int] = {}  # public key -> peers that hold it
        self.ips: dict[str, int] = {}  # allowed IP (as written) -> times it is held
        self.gained: set[WgPeer] = set()
        self.lost: set[WgPeer] = set()
        self._peers: tuple[WgPeer, ...] | None = ()

    @property
    def peers(self) -> tuple[WgPeer, ...]:
        if self._peers is None:
            self._peers = tuple(self.order)
        return self._peers

    def put(self, key: str, item: Item) -> None:
        """The item under ``key`` is now ``item`` (a peer of this node, or none)."""
        self.drop(key)
        if not isinstance(item, PeerItem) or item.node == self.node:
            return
        peer = self.by_key[key] = _as(WgPeer, item)
        insort(self.order, peer)
        self._peers = None
        self.keys[peer.public_key] = self.keys.get(peer.public_key, 0) + 1
        for ip in peer.allowed_ips:
            self.ips[ip] = self.ips.get(ip, 0) + 1
        if peer in self.lost:
            self.lost.discard(peer)
        else:
            self.gained.add(peer)

    def drop(self, key: str) -> None:
        peer = self.by_key.pop(key, None)
        if peer is None:
            return
        del self.order[bisect_left(self.order, peer)]
        self._peers = None
        _uncount(self.keys, peer.public_key)
        for ip in peer.allowed_ips:
            _uncount(self.ips, ip)
        if peer in self.gained:
            self.gained.discard(peer)
        else:
            self.lost.add(peer)


def _uncount(counts: dict[str, int], key: str) -> None:
    if counts[key] > 1:
        counts[key] -= 1
    else:
        del counts[key]


@dataclass
class MeshChange:
    """The peers gained and lost since the snapshot last marked (a changed peer is in both, as
    its old and its new value), the mesh index (``MeshView``), and ``uses``: whether any VXLAN
    of this node's FDB sends to a destination (the assembler's FDB views answer it)."""

    gained: frozenset[WgPeer]
    lost: frozenset[WgPeer]
    view: MeshView
    uses: Callable[[str], bool]


@dataclass
class FdbChange:
    """One VXLAN's FDB entries gained and lost since the snapshot last marked, and its view."""

    gained: frozenset[FdbEntry]
    lost: frozenset[FdbEntry]
    view: FdbView


@dataclass
class TapChange:
    """The taps gained and lost since the snapshot last marked (a changed tap is in both, as
    its old and its new value), and ``fdb_has(bridge, mac)``: whether a VXLAN on that bridge
    has an FDB entry for that MAC (the assembler's FDB views answer it)."""

    gained: frozenset[Tap]
    lost: frozenset[Tap]
    fdb_has: Callable[[str, str], bool]


class Assembler:
    def __init__(self, node: str):
        self.node = node
        self.held: dict[str, Held] = {}
        self._pages: dict[str, _Pages] = {}
        self.views: dict[str, FdbView] = {}  # per VNI section
        self.mesh = MeshView(node)
        # parts built from the node and mesh sections, by section digest, and the VXLANs built
        self._parts: dict[str, tuple[str, object]] = {}
        self._vxlans: dict[str, tuple[VxlanItem, tuple[FdbEntry, ...], Vxlan]] = {}
        self._wireguard: WireGuard | None = None
        # since ``mark``: only VNI sections changed, and only by deltas
        self._settled = False
        # since ``mark``: each tap touched by a node-section delta, as it was then (None: absent)
        self._taps_then: dict[str, Tap | None] = {}

    def mark(self) -> None:
        """The state now held is the base of the next ``change`` (the runner marks the snapshot
        it applied)."""
        for view in (*self.views.values(), self.mesh):
            view.gained.clear()
            view.lost.clear()
        self._taps_then.clear()
        self._settled = True

    def change(self) -> dict[str, FdbChange] | None:
        """Since ``mark``: the FDB entries each VXLAN gained and lost, by VXLAN name, when
        nothing but VNI sections' items, the mesh's peers and the node section's taps changed
        (deltas, on the sections the HEAD names); None
        when anything else may have (then the caller checks and plans the whole state)."""
        if not self._settled:
            return None
        node = self.held.get(NODE_SECTION)
        if node is None:
            return None
        out = {}
        for item in node.items.values():
            if isinstance(item, VxlanItem):
                view = self.views.get(vni_section(item.vni))
                if view is not None and (view.gained or view.lost):
                    out[item.name] = FdbChange(frozenset(view.gained), frozenset(view.lost), view)
        return out

    def mesh_change(self) -> MeshChange:
        """Since ``mark``: the peers gained and lost (empty when the mesh did not change). Only
        meaningful when ``change`` is not None."""
        return MeshChange(frozenset(self.mesh.gained), frozenset(self.mesh.lost), self.mesh,
                          self._uses)  # fmt: skip

    def tap_change(self) -> TapChange:
        """Since ``mark``: the taps gained and lost (empty when no tap changed). Only
        meaningful when ``change`` is not None."""
        node = self.held.get(NODE_SECTION)
        items = node.items if node is not None else {}
        gained, lost = set(), set()
        for key, then in self._taps_then.items():
            item = items.get(key)
            now = _as(Tap, item) if isinstance(item, TapItem) else None
            if now != then:
                if now is not None:
                    gained.add(now)
                if then is not None:
                    lost.add(then)
        return TapChange(frozenset(gained), frozenset(lost), self._fdb_has)

    def _fdb_has(self, bridge: str, mac: str) -> bool:
        node = self.held.get(NODE_SECTION)
        vxlans = node.items.values() if node is not None else ()
        return any(
            mac in view.dsts
            for v in vxlans
            if isinstance(v, VxlanItem)
            and v.bridge == bridge
            and (view := self.views.get(vni_section(v.vni)))
        )

    def _uses(self, dst: str) -> bool:
        """Any FDB entry of a VXLAN this node has sends to ``dst``: every item gives its
        destination's flood entry, counted in the view."""
        flood = FdbEntry(mac=FLOOD_MAC, dst=dst)
        node = self.held.get(NODE_SECTION)
        vxlans = node.items.values() if node is not None else ()
        return any(
            flood in view.counts
            for v in vxlans
            if isinstance(v, VxlanItem) and (view := self.views.get(vni_section(v.vni)))
        )

    def _replaced(self, name: str, held: Held) -> None:
        """A section held anew (whole): its view is rebuilt and the journal is void."""
        self._settled = False
        if name == MESH_SECTION:
            self.mesh = MeshView(self.node)
            for key, item in held.items.items():
                self.mesh.put(key, item)
            return
        if section_vni(name) is None:
            return
        view = self.views[name] = FdbView()
        for item in held.items.values():
            for entry in fdb_entries(self.node, item):
                view.add(entry)

    def offer(self, data: SectionData) -> bool:
        """Keep ``data`` if it yields the announced digest from what is held; True if kept.
        Raises ``BadSection`` for content that does not decode."""
        held = self.held.get(data.name)
        if held is not None and held.version == data.version and held.digest == data.digest:
            return False  # a duplicate
        if data.base:
            return self._apply_delta(held, data)
        if data.pages > 1:
            return self._add_page(data)
        fresh = _whole(data.version, _items(data))
        if fresh.digest != data.digest:
            return False
        self.held[data.name] = fresh
        self._replaced(data.name, fresh)
        return True

    def _apply_delta(self, held: Held | None, data: SectionData) -> bool:
        if held is None or held.version != data.base:
            return False  # made from a version we do not hold: fetch instead
        ups = {item_key(i): (i, h) for i, h in _items(data)}
        total = held.total
        for key in {*data.removals, *ups}:
            if key in held.hashes:
                total = sub_hash(total, held.hashes[key])
        for _, h in ups.values():
            total = add_hash(total, h)
        if digest_of(total) != data.digest:
            return False  # not what the controller has: fetch the whole section
        view = self.views.get(data.name)
        mesh = self.mesh if data.name == MESH_SECTION else None
        if view is None and mesh is None:
            # the node's own part: only taps are followed item by item, the rest is checked whole
            for key in {*data.removals, *ups}:
                old, new = held.items.get(key), ups.get(key, (None,))[0]
                if isinstance(old, TapItem) or isinstance(new, TapItem):
                    self._taps_then.setdefault(key, _as(Tap, old) if old is not None else None)
                elif old != new:
                    self._settled = False
        for key in {*data.removals, *ups}:
            old = held.items.pop(key, None)
            held.hashes.pop(key, None)
            if mesh is not None:
                mesh.drop(key)
            if view is not None and old is not None:
                for entry in fdb_entries(self.node, old):
                    view.remove(entry)
        for key, (item, h) in ups.items():
            held.items[key], held.hashes[key] = item, h
            if mesh is not None:
                mesh.put(key, item)
            if view is not None:
                for entry in fdb_entries(self.node, item):
                    view.add(entry)
        held.total, held.version = total, data.version
        return True

    def _add_page(self, data: SectionData) -> bool:
        pending = self._pages.get(data.name)
        if pending is None or (pending.version, pending.digest, pending.pages) != (
            data.version,
            data.digest,
            data.pages,
        ):
            pending = self._pages[data.name] = _Pages(data.version, data.digest, data.pages)
        if not 0 <= data.page < data.pages:
            return False
        pending.got[data.page] = _items(data)
        if len(pending.got) < pending.pages:
            return False
        del self._pages[data.name]
        fresh = _whole(data.version, (x for p in range(data.pages) for x in pending.got[p]))
        if fresh.digest != data.digest:
            return False
        self.held[data.name] = fresh
        self._replaced(data.name, fresh)
        return True

    def next_page(self, name: str) -> tuple[int, int] | None:
        """(version, page) still to fetch of a paged whole section, else None."""
        pending = self._pages.get(name)
        if pending is None:
            return None
        missing = [p for p in range(pending.pages) if p not in pending.got]
        return (pending.version, missing[0]) if missing else None

    def missing(self, head: Head) -> list[Ref]:
        """The HEAD's sections not held at its digest. One held at the same digest under
        another version (a restarted controller) is adopted as that version."""
        out = []
        for ref in head.refs:
            held = self.held.get(ref.name)
            if held is not None and held.digest == ref.digest:
                held.version = ref.version
            else:
                out.append(ref)
        return out

    def holds(self, ref: Ref) -> bool:
        held = self.held.get(ref.name)
        return held is not None and held.digest == ref.digest

    def have(self, name: str) -> int:
        held = self.held.get(name)
        return held.version if held else 0

    def forget_unused(self, head: Head) -> None:
        """Drop sections the HEAD no longer names (a VNI this node left)."""
        wanted = {r.name for r in head.refs}
        for name in [n for n in self.held if n not in wanted]:
            del self.held[name]
            self.views.pop(name, None)
            if name == MESH_SECTION:
                self.mesh = MeshView(self.node)
            self._settled = False
        for name in [n for n in self._pages if n not in wanted]:
            del self._pages[name]

    def snapshot(self, head: Head) -> Snapshot | None:
        """The whole state at the HEAD, or None while any section is missing: ``build``'s
        result, from the parts kept (equal to ``build`` of the held items, tested)."""
        if self.missing(head):
            return None
        names = {r.name for r in head.refs}
        own = self._part(NODE_SECTION, names, lambda items: _own_part(list(items)))
        peers = self.mesh.peers if MESH_SECTION in names else ()
        settings, wg, bridges, taps, nat, vxlan_items = own
        vxlans = []
        for v in vxlan_items:
            view = self.views.get(vni_section(v.vni))
            fdb = view.fdb if view is not None and vni_section(v.vni) in names else ()
            kept = self._vxlans.get(v.name)
            if kept is None or kept[0] != v or kept[1] is not fdb:
                kept = self._vxlans[v.name] = (v, fdb, _vxlan(v, fdb))
            vxlans.append(kept[2])
        for name in [n for n in self._vxlans if n not in {v.name for v in vxlan_items}]:
            del self._vxlans[name]
        snap = _snapshot(self.node, head, settings, wg, bridges, taps, nat, vxlans, peers)
        if snap.wireguard is not None:  # the same object while it stays the same
            if self._wireguard is not None and self._wireguard == snap.wireguard:
                return msgspec.structs.replace(snap, wireguard=self._wireguard)
            self._wireguard = snap.wireguard
        return snap

    def _part(self, name: str, names: set[str], make: Callable[[Iterable[Item]], object]):
        held = self.held.get(name) if name in names else None
        digest = held.digest if held is not None else ""
        kept = self._parts.get(name)
        if kept is None or kept[0] != digest:
            kept = self._parts[name] = (digest, make(held.items.values() if held else ()))
        return kept[1]


Fetch = Callable[[SectionGet], Awaitable[SectionData]]
MAX_REQUESTS = 1024  # per HEAD: a section changing faster than it can be paged waits a beat


async def complete(assembler: Assembler, head: Head, fetch: Fetch) -> Snapshot | None:
    """The whole state at ``head``: take what it carries, fetch what is still missing (a delta
    from what is held, or every page of the whole section), and assemble. None when a section
    moved on while fetching (a newer HEAD follows); a failed fetch raises from ``fetch``."""
    for data in head.sections:
        assembler.offer(data)
    requests = 0
    for ref in assembler.missing(head):
        have = assembler.have(ref.name)
        # from what is held; if that does not give the announced digest, the whole section
        for start in (have, 0) if have else (0,):
            asked: SectionGet | None = SectionGet(name=assembler.node, section=ref.name, have=start)
            while asked is not None and requests < MAX_REQUESTS:
                requests += 1
                assembler.offer(await fetch(asked))
                page = assembler.next_page(ref.name)
                asked = None
                if page is not None:
                    asked = SectionGet(
                        name=assembler.node, section=ref.name, version=page[0], page=page[1]
                    )
            if assembler.holds(ref):
                break
    snap = assembler.snapshot(head)
    if snap is not None:
        assembler.forget_unused(head)
    return snap


def build(node: str, head: Head, sections: dict[str, Iterable[Item]]) -> Snapshot:
    """Pure assembly: the node's own section, plus its VNIs' FDB and the mesh without itself."""
    settings, wg, bridges, taps, nat, vxlan_items = _own_part(list(sections.get(NODE_SECTION, ())))
    vxlans = []
    for v in vxlan_items:
        fdb = {e for i in sections.get(vni_section(v.vni), ()) for e in fdb_entries(node, i)}
        vxlans.append(_vxlan(v, tuple(sorted(fdb))))
    peers = _peers(node, sections.get(MESH_SECTION, ()))
    return _snapshot(node, head, settings, wg, bridges, taps, nat, vxlans, peers)


def _own_part(own: list[Item]):
    """The node section's part of a snapshot: settings, WireGuard, bridges, taps, NAT subnets
    and VXLAN items, each sorted as the snapshot lists them."""
    return (
        next((i for i in own if isinstance(i, Settings)), Settings()),
        next((i for i in own if isinstance(i, WgItem)), None),
        tuple(
            sorted((_as(Bridge, i) for i in own if isinstance(i, BridgeItem)), key=lambda b: b.name)
        ),
        tuple(sorted((_as(Tap, i) for i in own if isinstance(i, TapItem)), key=lambda t: t.name)),
        tuple(sorted(i.subnet for i in own if isinstance(i, NatItem))),
        sorted((i for i in own if isinstance(i, VxlanItem)), key=lambda v: v.name),
    )


def _peers(node: str, items: Iterable[Item]) -> tuple[WgPeer, ...]:
    return tuple(
        sorted(_as(WgPeer, p) for p in items if isinstance(p, PeerItem) and p.node != node)
    )


def _vxlan(v: VxlanItem, fdb: tuple[FdbEntry, ...]) -> Vxlan:
    return Vxlan(
        name=v.name, vni=v.vni, bridge=v.bridge, local=v.local, mtu=v.mtu, port=v.port, fdb=fdb
    )


def _snapshot(node, head, settings, wg, bridges, taps, nat, vxlans, peers) -> Snapshot:
    wireguard = None
    if wg is not None:
        wireguard = WireGuard(
            name=wg.name, address=wg.address, listen_port=wg.listen_port, mtu=wg.mtu, peers=peers
        )
    return Snapshot(
        node=node,
        version=head.version,
        underlay_mtu=settings.underlay_mtu,
        bridges=bridges,
        taps=taps,
        nat_subnets=nat,
        vxlans=tuple(vxlans),
        wireguard=wireguard,
        infrastructure=settings.infrastructure,
        digest=head.digest,
        published_at=head.published_at,
    )


def _as(type_, item):
    """A wire item as the plain snapshot Struct it extends (equal values compare equal)."""
    return type_(**msgspec.structs.asdict(item))


def head_for(snap: Snapshot) -> Head:
    """For tests and tools: a HEAD carrying, whole, sections that assemble into ``snap`` (the
    inverse of ``build``; every FDB destination gets its flood entry, as the controller's do)."""
    own: list[Item] = [
        Settings(underlay_mtu=snap.underlay_mtu, infrastructure=snap.infrastructure),
        *(_as(BridgeItem, b) for b in snap.bridges),
        *(_as(TapItem, t) for t in snap.taps),
        *(NatItem(subnet=s) for s in snap.nat_subnets),
    ]
    sections: dict[str, list[Item]] = {NODE_SECTION: own}
    for v in snap.vxlans:
        own.append(
            VxlanItem(
                name=v.name, vni=v.vni, bridge=v.bridge, local=v.local, mtu=v.mtu, port=v.port
            )
        )
        sections[vni_section(v.vni)] = [
            FdbItem(nic=f"{i:012x}", node=f"at {e.dst}", mac=e.mac, dst=e.dst)
            for i, e in enumerate(v.fdb)
        ]
    if snap.wireguard is not None:
        wg = snap.wireguard
        own.append(WgItem(name=wg.name, address=wg.address, listen_port=wg.listen_port, mtu=wg.mtu))
        sections[MESH_SECTION] = [_as(PeerItem, p) for p in wg.peers]
    data = []
    for name, items in sections.items():
        blobs = [encode(i) for i in items]
        total = 0
        for blob in blobs:
            total = add_hash(total, item_hash(blob))
        data.append(
            SectionData(
                name=name,
                version=snap.version,
                digest=digest_of(total),
                upserts=tuple(msgspec.Raw(b) for b in blobs),
            )
        )
    return Head(
        node=snap.node,
        version=snap.version,
        digest=snap.digest,
        refs=tuple(Ref(d.name, d.version, d.digest) for d in data),
        sections=tuple(data),
        published_at=snap.published_at,
    )
