"""Pure and incremental: intent → every node's sections and HEAD (``schemas.wire``).

``Model`` keeps an indexed copy of the (screened) intent and the sections computed from it.
``sync`` is told which records changed (or diffs everything, at start); it updates only the
sections those records feed: a NIC touches its node's ``node`` section and its overlay's
``vni.<vni>``; a node touches its own section, its ``mesh`` entry and its NICs; a network its
NICs. ``commit`` then gives every changed section and every node whose HEAD changed the next
generation as version. A node's version is the generation of the last change that affected it,
so versions only grow; ``controller.publisher`` persists the generation's high-water mark.

Each item is encoded once, when it changes; a section's digest is updated per item; there is
no per-node copy of the mesh or of a VNI. Nothing here reads a clock, a store or a socket.
"""

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from controller.compute import (
    ClusterConfig,
    network_bridge,
    network_mtu,
    network_problem,
    on_mesh,
    screened_node,
)
from schemas import MAX_VERSION, naming
from schemas.codec import encode
from schemas.errors import NotFound
from schemas.intent import Egress, Intent, Network, NetworkType, Nic, Node
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
    head_digest,
    item_hash,
    item_key,
    section_vni,
    sub_hash,
    vni_section,
)

Key = tuple[str, str]  # ("network" | "nic" | "node", name or id)
LOG_VERSIONS = 64  # change-log entries a section keeps for deltas
ATTACH_WHOLE = 4096  # bytes: a new section up to this size travels with the HEADs that name it


class VersionExhausted(Exception):
    """The generation reached ``MAX_VERSION``; nothing can be stamped above it."""


class Section:
    """One section's items (encoded once), digest, version and a bounded change log."""

    def __init__(self, name: str, touched: set["Section"], owner: str = ""):
        self.name, self.owner = name, owner  # owner: the node of a ``node`` section
        self._touched = touched  # the model's set of sections with pending changes
        self.version = 0
        self.items: dict[str, bytes] = {}
        self._hashes: dict[str, int] = {}
        self._total = 0
        self._pending: set[str] = set()  # keys changed since the last commit
        # (version, previous version, keys changed): deltas from any version >= log_base
        self._log: deque[tuple[int, int, frozenset[str]]] = deque()
        self.log_base = 0
        self._paged: tuple[int, int, list[SectionData]] | None = None
        self._ref: Ref | None = None

    @property
    def digest(self) -> str:
        return self.ref.digest

    @property
    def ref(self) -> Ref:
        """How HEADs name this section at its committed version (built once per version)."""
        if self._ref is None or self._ref.version != self.version:
            self._ref = Ref(self.name, self.version, digest_of(self._total))
        return self._ref

    def put(self, item: Item) -> None:
        key, data = item_key(item), encode(item)
        if self.items.get(key) == data:
            return
        self._drop(key)
        h = item_hash(data)
        self.items[key], self._hashes[key] = data, h
        self._total = add_hash(self._total, h)
        self._pending.add(key)
        self._touched.add(self)

    def remove(self, key: str) -> None:
        if key in self.items:
            self._drop(key)
            del self.items[key]
            self._pending.add(key)
            self._touched.add(self)

    def _drop(self, key: str) -> None:
        h = self._hashes.pop(key, None)
        if h is not None:
            self._total = sub_hash(self._total, h)

    def commit(self, version: int) -> bool:
        """Stamp pending changes with ``version``; False when nothing changed."""
        if not self._pending:
            return False
        if not self._log and self.version == 0:
            self.log_base = version  # created now: no delta from anything older
        else:
            self._log.append((version, self.version, frozenset(self._pending)))
        self.version, self._pending, self._ref = version, set(), None
        while len(self._log) > LOG_VERSIONS or (
            self._log and sum(len(k) for _, _, k in self._log) > max(len(self.items), 256)
        ):
            self.log_base = self._log.popleft()[0]
        return True

    def last_change(self) -> tuple[int, frozenset[str]] | None:
        """(base version, keys) of the change that made the current version."""
        if self._log and self._log[-1][0] == self.version:
            return self._log[-1][1], self._log[-1][2]
        return None

    def changed_since(self, have: int) -> frozenset[str] | None:
        """Keys changed after version ``have``; None when the log does not reach back there."""
        if have == self.version:
            return frozenset()
        if not self.log_base <= have < self.version:
            return None
        keys: set[str] = set()
        for version, _, changed in self._log:
            if version > have:
                keys |= changed
        return frozenset(keys)

    def delta(self, base: int, keys: Iterable[str]) -> SectionData:
        ups, gone = [], []
        for key in sorted(keys):
            data = self.items.get(key)
            if data is None:
                gone.append(key)
            else:
                ups.append(msgspec.Raw(data))
        return SectionData(
            name=self.name,
            version=self.version,
            digest=self.digest,
            base=base,
            upserts=tuple(ups),
            removals=tuple(gone),
        )

    def pages(self, budget: int) -> list[SectionData]:
        """The whole section in pages of at most ~``budget`` bytes of items each (kept until
        the section changes: a paged fetch asks for each page in turn)."""
        if self._paged is not None and self._paged[:2] == (self.version, budget):
            return self._paged[2]
        self._paged = (self.version, budget, self._split(budget))
        return self._paged[2]

    def _split(self, budget: int) -> list[SectionData]:
        pages: list[list[msgspec.Raw]] = [[]]
        size = 0
        for key in sorted(self.items):
            data = self.items[key]
            if pages[-1] and size + len(data) + 1 > budget:
                pages.append([])
                size = 0
            pages[-1].append(msgspec.Raw(data))
            size += len(data) + 1
        return [
            SectionData(
                name=self.name,
                version=self.version,
                digest=self.digest,
                upserts=tuple(items),
                page=i,
                pages=len(pages),
            )
            for i, items in enumerate(pages)
        ]


@dataclass
class HeadState:
    version: int = 0
    digest: str = ""
    refs: tuple[Ref, ...] = ()


@dataclass
class Commit:
    """What one ``commit`` changed: the generation, the sections, and the nodes whose HEAD
    changed (each must be published with its new version)."""

    generation: int
    sections: set[Section] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)


class Model:
    def __init__(
        self,
        config: ClusterConfig,
        on_problem: Callable[[str], None] | None = None,
        on_error: Callable[[str, Exception], None] | None = None,
    ):
        self.config = config
        self.on_problem = on_problem or (lambda _: None)
        self.on_error = on_error
        self.generation = 0
        self.networks: dict[str, Network] = {}  # screened
        self.nodes: dict[str, Node] = {}  # screened
        self.nics: dict[str, Nic] = {}
        self._nics_of_node: dict[str, set[str]] = {}
        self._nics_of_network: dict[str, set[str]] = {}
        self._fdb_of: dict[str, tuple[int, str]] = {}  # NIC → (vni, node) of its FDB item
        self._hosts: dict[int, Counter[str]] = {}  # vni → node → NICs in that VNI's section
        self._vnis_of: dict[str, set[int]] = {}  # node → VNIs it hosts (its vni.* refs)
        self._touched: set[Section] = set()
        self.node_sections: dict[str, Section] = {}
        self.mesh = Section(MESH_SECTION, self._touched)
        self.vnis: dict[int, Section] = {}
        self.heads: dict[str, HeadState] = {}
        self._dirty_parts: set[str] = set()
        self._dirty_heads: set[str] = set()
        self._forced: set[str] = set()  # a new version even for the same content
        self._broken: set[str] = set()  # nodes whose own part cannot be computed: HEAD kept
        # (version, digest) each node had before a restart: kept while the content is the same
        self.earlier: dict[str, tuple[int, str]] = {}
        self.stats: Counter[str] = Counter()  # work done, for tests and benches

    # --- input ----------------------------------------------------------------------------------

    def sync(self, intent: Intent, keys: Iterable[Key] | None = None) -> None:
        """Take over the records named by ``keys`` (all, when None) from ``intent``."""
        if keys is None:
            keys = [
                *(("network", n) for n in {*intent.networks, *self.networks}),
                *(("node", n) for n in {*intent.nodes, *self.nodes}),
                *(("nic", n) for n in {*intent.nics, *self.nics}),
            ]
        for kind, name in keys:
            if kind == "network":
                self._sync_network(name, intent.networks.get(name))
            elif kind == "node":
                self._sync_node(name, intent.nodes.get(name))
            elif kind == "nic":
                self._sync_nic(name, intent.nics.get(name))
            else:
                raise ValueError(f"unknown record kind {kind!r}")

    def force(self, node: str, above: int) -> None:
        """``node`` applied version ``above`` that we never issued: continue above it."""
        if node in self.nodes and above < MAX_VERSION:
            self.generation = max(self.generation, above)
            self._forced.add(node)
            self._dirty_heads.add(node)

    def _sync_network(self, name: str, net: Network | None) -> None:
        if net is not None and (why := network_problem(net, self.config)):
            self.on_problem(f"{why}; left out of every snapshot")
            net = None
        if self.networks.get(name) == net:
            return
        if net is None:
            self.networks.pop(name, None)
        else:
            self.networks[name] = net
        for nic in self._nics_of_network.get(name, ()):
            self._place(nic)

    def _sync_node(self, name: str, node: Node | None) -> None:
        if node is not None:
            node, why = screened_node(node, self.config)
            if why:
                self.on_problem(f"{why}; left out of every snapshot")
        old = self.nodes.get(name)
        if old == node:
            return
        if node is None:
            del self.nodes[name]
            section = self.node_sections.pop(name, None)
            if section is not None:
                self.stats["sections dropped"] += 1
            self.heads.pop(name, None)
            self._broken.discard(name)
            self._dirty_heads.discard(name)
            self._forced.discard(name)
        else:
            self.nodes[name] = node
            self._dirty_parts.add(name)
        if node is not None and on_mesh(node):
            assert node.wg_public_key and node.tunnel_ip
            self.mesh.put(
                PeerItem(
                    public_key=node.wg_public_key,
                    endpoint=f"{node.underlay_ip}:{node.wg_listen_port}",
                    allowed_ips=(f"{node.tunnel_ip}/32",),
                    node=name,
                )
            )
        else:
            self.mesh.remove(name)
        if old is None or node is None or on_mesh(old) != on_mesh(node):
            self._dirty_heads.add(name)  # the mesh ref comes or goes
        for nic in self._nics_of_node.get(name, ()):
            self._place(nic)

    def _sync_nic(self, nic_id: str, nic: Nic | None) -> None:
        old = self.nics.get(nic_id)
        if old == nic:
            return
        if old is not None:
            self._nics_of_node[old.node].discard(nic_id)
            self._nics_of_network[old.network].discard(nic_id)
            self._dirty_parts.add(old.node)
            for index, key in (
                (self._nics_of_node, old.node),
                (self._nics_of_network, old.network),
            ):
                if not index[key]:
                    del index[key]
        if nic is None:
            del self.nics[nic_id]
        else:
            self.nics[nic_id] = nic
            self._nics_of_node.setdefault(nic.node, set()).add(nic_id)
            self._nics_of_network.setdefault(nic.network, set()).add(nic_id)
            self._dirty_parts.add(nic.node)
        self._place(nic_id)

    def _place(self, nic_id: str) -> None:
        """Put the NIC's FDB item where it belongs now (or nowhere), and mark its node."""
        nic = self.nics.get(nic_id)
        if nic is not None:
            self._dirty_parts.add(nic.node)
        placed = self._fdb_of.pop(nic_id, None)
        if placed is not None:
            vni, host = placed
            self.vnis[vni].remove(nic_id)
            hosts = self._hosts[vni]
            hosts[host] -= 1
            if not hosts[host]:
                del hosts[host]
                self._vnis_of[host].discard(vni)
                self._dirty_heads.add(host)
        if nic is None:
            return
        net, node = self.networks.get(nic.network), self.nodes.get(nic.node)
        if net is None or node is None or net.type != NetworkType.OVERLAY or not on_mesh(node):
            return
        assert net.vni is not None and node.tunnel_ip is not None
        section = self.vnis.get(net.vni)
        if section is None:
            section = self.vnis[net.vni] = Section(vni_section(net.vni), self._touched)
        section.put(FdbItem(nic=nic_id, node=node.name, mac=nic.mac, dst=node.tunnel_ip))
        self._fdb_of[nic_id] = (net.vni, node.name)
        hosts = self._hosts.setdefault(net.vni, Counter())
        if not hosts[node.name]:
            self._vnis_of.setdefault(node.name, set()).add(net.vni)
            self._dirty_heads.add(node.name)
        hosts[node.name] += 1

    # --- computing ------------------------------------------------------------------------------

    def pending(self) -> bool:
        return bool(self._dirty_parts or self._dirty_heads or self._touched)

    def commit(self) -> Commit:
        """Recompute what changed since the last commit and stamp it with the next generation."""
        if not self.pending():
            return Commit(self.generation)
        if self.generation >= MAX_VERSION:
            raise VersionExhausted(f"generation {self.generation} is the maximum")
        done = Commit(self.generation + 1)
        for name in self._dirty_parts:
            if name in self.nodes:
                self._recompute_part(name)
        self._dirty_parts.clear()
        heads = self._dirty_heads
        touched = set(self._touched)  # sections hold this very set: empty it, never rebind
        self._touched.clear()
        for section in touched:
            section.commit(done.generation)
            done.sections.add(section)
            self.stats["sections changed"] += 1
            if section is self.mesh:
                heads |= {n for n, node in self.nodes.items() if on_mesh(node)}
            elif section.name == NODE_SECTION:
                heads.add(section.owner)
            elif (vni := section_vni(section.name)) is not None:
                heads |= set(self._hosts.get(vni, ()))
                if not section.items:
                    self.vnis.pop(vni, None)
                    self._hosts.pop(vni, None)
        for name in heads:
            if name in self.nodes and self._restamp_head(name, done.generation):
                done.nodes.add(name)
        self._dirty_heads, self._forced = set(), set()
        self.generation = done.generation
        return done

    def _restamp_head(self, name: str, generation: int) -> bool:
        self.stats["heads computed"] += 1
        section = self.node_sections.get(name)
        if section is None or name in self._broken:
            return False  # its part cannot be computed: it keeps its last HEAD until it can
        refs = [section.ref]
        if on_mesh(self.nodes[name]):
            refs.append(self.mesh.ref)
        refs += (self.vnis[vni].ref for vni in sorted(self._vnis_of.get(name, ())))
        head = self.heads.setdefault(name, HeadState())
        head.refs = tuple(refs)
        digest = head_digest(head.refs)
        if digest == head.digest and name not in self._forced:
            return False
        earlier = self.earlier.pop(name, None)
        if earlier is not None and earlier[1] == digest and not head.version:
            head.version, head.digest = earlier  # same content as before a restart: same version
            return True
        head.version, head.digest = generation, digest
        return True

    def _recompute_part(self, name: str) -> None:
        """The node's own section from its NICs: O(that node's NICs)."""
        try:
            items = self._part_items(self.nodes[name])
        except Exception as e:
            if self.on_error is None:
                raise
            self.on_error(name, e)
            self._broken.add(name)
            return
        self._broken.discard(name)
        self.stats["node sections computed"] += 1
        section = self.node_sections.get(name)
        if section is None:
            section = self.node_sections[name] = Section(NODE_SECTION, self._touched, owner=name)
        keys = {item_key(i) for i in items}
        for key in [k for k in section.items if k not in keys]:
            section.remove(key)
        for item in items:
            section.put(item)

    def _part_items(self, node: Node) -> list[Item]:
        u = self.config.underlay_mtu
        items: list[Item] = [
            Settings(
                underlay_mtu=u,
                infrastructure=(self.config.mesh_prefix, *self.config.underlay_cidrs),
            )
        ]
        bridges: set[str] = set()
        for nic_id in sorted(self._nics_of_node.get(node.name, ())):
            nic = self.nics[nic_id]
            net = self.networks.get(nic.network)
            if net is None:
                continue
            if net.type == NetworkType.OVERLAY and not on_mesh(node):
                continue  # an overlay needs this node's tunnel address
            bridge, mtu = network_bridge(net), network_mtu(net, u)
            if bridge not in bridges:
                bridges.add(bridge)
                address = None
                if net.type == NetworkType.BRIDGE and net.egress == Egress.NAT:
                    prefixlen = int(net.subnet.split("/")[1])
                    address = f"{net.gateway}/{prefixlen}"
                    items.append(NatItem(subnet=net.subnet))
                items.append(BridgeItem(name=bridge, mtu=mtu, address=address, network=net.name))
                if net.type == NetworkType.OVERLAY:
                    assert net.vni is not None and node.tunnel_ip is not None
                    items.append(
                        VxlanItem(
                            name=naming.vxlan_device(net.vni),
                            vni=net.vni,
                            bridge=bridge,
                            local=node.tunnel_ip,
                            mtu=naming.overlay_mtu(u),
                            port=naming.VXLAN_PORT,
                        )
                    )
            items.append(
                TapItem(
                    name=naming.tap_name(nic.id),
                    bridge=bridge,
                    mtu=mtu,
                    nic=nic.id,
                    mac=nic.mac,
                    ip=nic.ip,
                    port_security=nic.port_security,
                )
            )
        if on_mesh(node):
            assert node.tunnel_ip is not None and node.wg_listen_port is not None
            prefixlen = int(self.config.mesh_prefix.split("/")[1])
            items.append(
                WgItem(
                    name=naming.WIREGUARD_IFNAME,
                    address=f"{node.tunnel_ip}/{prefixlen}",
                    listen_port=node.wg_listen_port,
                    mtu=naming.wireguard_mtu(u),
                )
            )
        return items

    # --- reading --------------------------------------------------------------------------------

    def section(self, node: str, name: str) -> Section | None:
        """``node``'s section ``name`` if that node needs it (it may read nothing else)."""
        head = self.heads.get(node)
        if head is None or not any(r.name == name for r in head.refs):
            return None
        if name == NODE_SECTION:
            return self.node_sections.get(node)
        if name == MESH_SECTION:
            return self.mesh
        vni = name.removeprefix("vni.")
        return self.vnis.get(int(vni)) if vni.isdigit() else None

    def sections_of(self, node: str) -> list[Section]:
        """The sections ``node``'s HEAD names."""
        head = self.heads.get(node)
        if head is None:
            return []
        out = []
        for ref in head.refs:
            if ref.name == NODE_SECTION:
                out.append(self.node_sections[node])
            elif ref.name == MESH_SECTION:
                out.append(self.mesh)
            elif (vni := section_vni(ref.name)) is not None and vni in self.vnis:
                out.append(self.vnis[vni])
        return out

    # --- messages -------------------------------------------------------------------------------

    def head(
        self,
        node: str,
        budget: int,
        changed: "Attachments | None" = None,
        published_at: float = 0.0,
    ) -> Head:
        """``node``'s HEAD; with ``changed`` (the last commit's), the content of its sections that
        changed in it, while the whole message stays within ``budget`` bytes of items."""
        state = self.heads[node]
        attached: list[SectionData] = []
        if changed is not None:
            room = budget
            for section in self.sections_of(node):
                data = changed.get(section, budget)
                if data is None:
                    continue
                size = _size(data)
                if size > room:
                    continue  # too big to attach: the agent fetches it
                room -= size
                attached.append(data)
        return Head(
            node=node,
            version=state.version,
            digest=state.digest,
            refs=state.refs,
            sections=tuple(attached),
            published_at=published_at,
        )

    def get(self, node: str, req: SectionGet, budget: int) -> SectionData:
        """``section.get``: a delta from the version the node holds when the log reaches back
        there and it fits, else a page of the whole section. Only the node's own sections."""
        section = self.section(node, req.section)
        if section is None:
            raise NotFound(f"node {node} has no section {req.section!r}")
        if req.page:
            pages = section.pages(budget)
            if req.version == section.version and req.page < len(pages):
                return pages[req.page]
            return pages[0]  # moved on meanwhile: start over at the current version
        keys = section.changed_since(req.have) if req.have else None
        if keys is not None:
            delta = section.delta(req.have, keys)
            if _size(delta) <= budget:
                return delta
        return section.pages(budget)[0]


def _size(data: SectionData) -> int:
    """Bytes of a section message's items and removed keys (the rest is the envelope)."""
    return sum(len(r) + 1 for r in data.upserts) + sum(len(k) + 3 for k in data.removals)


class Attachments:
    """The content a commit attaches to HEADs: each changed section's delta from its previous
    version (or the whole section when it is new), built once and shared by every node."""

    def __init__(self, done: Commit):
        self._done = done
        self._built: dict[Section, SectionData | None] = {}

    def get(self, section: Section, budget: int) -> SectionData | None:
        if section not in self._done.sections or section.version != self._done.generation:
            return None
        if section not in self._built:
            change = section.last_change()
            if change is not None:
                self._built[section] = section.delta(*change)
            else:  # new in this commit: small ones travel whole (a new node's own section);
                # the agent may hold it already (a restarted controller), so not big ones
                pages = section.pages(min(budget, ATTACH_WHOLE))
                self._built[section] = pages[0] if len(pages) == 1 else None
        return self._built[section]
