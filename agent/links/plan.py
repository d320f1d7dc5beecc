"""Pure: desired snapshot + observed kernel state → ordered list of netlink actions.

Order matters: create devices, set port MTUs, enslave, turn port learning off, then bridge MTUs
and addresses, bring up, add FDB entries before deleting stale ones (no window without
forwarding), and delete devices last. An equal state gives an empty plan: a no-op heartbeat
makes zero netlink writes. Only devices named ``ot…`` appear in ``Observed``; ``otwg0``
belongs to the WireGuard applier.

FDB: a unicast MAC has one destination, so a MAC that moves (VXLAN dst, or bridge port) is one
``AddFdb``/``AddPortFdb`` written with NLM_F_REPLACE, and its old entry gets no delete: the
kernel never sees the MAC without an entry. Each bridge gets a static entry per local NIC on
its tap and per remote NIC on the ``otvx*`` port of its VNI, so unicast to a known NIC is never
flooded; a MAC wanted on both (a NIC moving here) goes to the local tap. Static entries on our
ports are ours; learned ones on our ports are removed; the kernel's own (``permanent``) are
never touched. A port that is (re-)enslaved or recreated in this plan starts with no entries.

After the writes: ``advance`` is the kernel state FDB writes reached (no dump needed), and
``settle`` the state a plan that also wrote taps reached, from those taps read back.
"""

import functools
from collections.abc import Iterable, Mapping

import msgspec

from agent.links.model import (
    Action,
    AddAddress,
    AddFdb,
    AddPortFdb,
    CreateBridge,
    CreateTap,
    CreateVxlan,
    DelAddress,
    DeleteLink,
    DelFdb,
    DelPortFdb,
    FdbAction,
    Link,
    Observed,
    SetMaster,
    SetMtu,
    SetPortLearning,
    SetUp,
    VxlanInfo,
)
from agent.validate import FdbDelta, TapDelta
from schemas import naming
from schemas.desired import FdbEntry, Snapshot, Vxlan

# kinds a desired device may have; "tun" is a tap (the kernel reports taps as kind "tun")
_BRIDGE, _TAP, _VXLAN = "bridge", "tun", "vxlan"
FLOOD_MAC = "00:00:00:00:00:00"
Remote = tuple[set[tuple[str, str]], dict[str, str]]  # a VXLAN's (flood, dst), unicast mac -> dst


def plan(desired: Snapshot, observed: Observed) -> list[Action]:
    links = observed.links
    creates: list[Action] = []
    recreate: list[Action] = []  # wrong kind or immutable attributes: delete before create
    port_mtu: list[Action] = []
    masters: list[Action] = []
    learning: list[Action] = []
    bridge_mtu: list[Action] = []
    addresses: list[Action] = []
    ups: list[Action] = []

    def ensure(name: str, kind: str, create: Action, mismatch: bool = False) -> Link | None:
        link = links.get(name)
        if link is not None and (link.kind != kind or mismatch):
            recreate.append(DeleteLink(name=name))
            link = None
        if link is None:
            creates.append(create)
        return link

    for bridge in desired.bridges:
        link = ensure(bridge.name, _BRIDGE, CreateBridge(name=bridge.name, mtu=bridge.mtu))
        if link is None or link.mtu != bridge.mtu:
            bridge_mtu.append(SetMtu(name=bridge.name, mtu=bridge.mtu))
        want = {bridge.address} if bridge.address else set()
        have = set(link.addresses) if link else set()
        addresses += [AddAddress(name=bridge.name, address=a) for a in sorted(want - have)]
        addresses += [DelAddress(name=bridge.name, address=a) for a in sorted(have - want)]
        if link is None or not link.up:
            ups.append(SetUp(name=bridge.name))

    for vx in desired.vxlans:
        want = VxlanInfo(vni=vx.vni, local=vx.local, port=vx.port, learning=False)
        existing = links.get(vx.name)
        create = CreateVxlan(name=vx.name, vni=vx.vni, local=vx.local, port=vx.port, mtu=vx.mtu)
        link = ensure(vx.name, _VXLAN, create, mismatch=bool(existing and existing.vxlan != want))
        _port(vx.name, vx.mtu, vx.bridge, link, recreate, port_mtu, masters, learning, ups)

    for tap in desired.taps:
        link = ensure(tap.name, _TAP, CreateTap(name=tap.name, mtu=tap.mtu))
        _port(tap.name, tap.mtu, tap.bridge, link, recreate, port_mtu, masters, learning, ups)

    wanted = {b.name for b in desired.bridges} | {v.name for v in desired.vxlans}
    wanted |= {t.name for t in desired.taps} | {naming.WIREGUARD_IFNAME}
    deletes = [DeleteLink(name=name) for name in sorted(links) if name not in wanted]
    # ports before their bridges, so nothing is briefly re-parented
    deletes.sort(key=lambda a: links[a.name].kind == _BRIDGE)

    recreated = {a.name for a in recreate}
    remote = {vx.name: _remote(vx) for vx in desired.vxlans}
    fdb_add, fdb_del = _fdb(desired, observed, recreated, remote)
    # ports whose bridge entries the kernel flushes (or never had) before ours are written
    fresh_ports = {a.name for a in masters} | recreated | {a.name for a in deletes}
    port_add, port_del = _port_fdb(desired, observed, fresh_ports, remote)
    return (
        recreate
        + creates
        + port_mtu
        + masters
        + learning
        + bridge_mtu
        + addresses
        + ups
        + fdb_add
        + port_add
        + fdb_del
        + port_del
        + deletes
    )


def _port(
    name: str,
    mtu: int,
    bridge: str,
    link: Link | None,
    recreate: list[Action],
    port_mtu: list[Action],
    masters: list[Action],
    learning: list[Action],
    ups: list[Action],
) -> None:
    if link is not None and link.mtu != mtu:
        port_mtu.append(SetMtu(name=name, mtu=mtu))
    # a recreated bridge has lost its ports, even if the observed state still names it
    if link is None or link.master != bridge or DeleteLink(name=bridge) in recreate:
        masters.append(SetMaster(name=name, master=bridge))
        learning.append(SetPortLearning(name=name, learning=False))  # enslaving turns it on
    elif link.port_learning is not False:
        learning.append(SetPortLearning(name=name, learning=False))
    if link is None or not link.up:
        ups.append(SetUp(name=name))


def is_unicast(mac: str) -> bool:
    """Not the flood MAC and not multicast (odd first octet): one destination, replaced."""
    return mac != FLOOD_MAC and mac[1] not in _ODD_HEX


_ODD_HEX = "13579bdfBDF"


@functools.lru_cache(maxsize=16)
def _remote(vx: Vxlan) -> Remote:
    """A VXLAN's wanted entries: (flood MAC, dst) pairs, and each unicast MAC's one dst (the
    lowest, should a snapshot repeat a MAC), all MACs in the kernel's lower case. Cached: a
    heartbeat plans the same frozen snapshot again and again (callers never mutate these)."""
    flood: set[tuple[str, str]] = set()
    unicast: dict[str, str] = {}
    for e in vx.fdb:
        mac = e.mac.lower()
        if not is_unicast(mac):
            flood.add((mac, e.dst))
        elif (old := unicast.get(mac)) is None or e.dst < old:
            unicast[mac] = e.dst
    return flood, unicast


def _fdb(
    desired: Snapshot, observed: Observed, recreated: set[str], remote: dict[str, Remote]
) -> tuple[list[Action], list[Action]]:
    adds: list[Action] = []
    dels: list[Action] = []
    for vx in desired.vxlans:
        fresh = vx.name in recreated or vx.name not in observed.links
        kernel = frozenset() if fresh else observed.fdb.get(vx.name, frozenset())
        learned = () if fresh else sorted(observed.learned.get(vx.name, ()))
        dels += [DelFdb(device=vx.name, mac=m, dst=None) for m in learned]
        if kernel and kernel == frozenset(vx.fdb):
            continue  # the steady state: one set comparison
        have = {(e.mac, e.dst) for e in kernel}
        flood, unicast = remote[vx.name]
        want = flood | unicast.items()
        adds += [AddFdb(device=vx.name, mac=mac, dst=dst) for mac, dst in sorted(want - have)]
        # a unicast MAC set to another dst is replaced in place: no delete for its old dst
        dels += [
            DelFdb(device=vx.name, mac=mac, dst=dst)
            for mac, dst in sorted(have - want)
            if mac not in unicast
        ]
    return adds, dels


def _port_fdb(
    desired: Snapshot, observed: Observed, fresh: set[str], remote: dict[str, Remote]
) -> tuple[list[Action], list[Action]]:
    # per bridge: mac -> port; remote NICs first, so a local tap wins a MAC wanted on both
    want: dict[str, dict[str, str]] = {b.name: {} for b in desired.bridges}
    for vx in desired.vxlans:
        want.setdefault(vx.bridge, {}).update(dict.fromkeys(remote[vx.name][1], vx.name))
    for tap in sorted(desired.taps, key=lambda t: t.name, reverse=True):
        if tap.mac:
            want.setdefault(tap.bridge, {})[tap.mac.lower()] = tap.name

    # per bridge: mac -> port the kernel has it on, for ports that keep their entries (a port
    # not fresh is already on the bridge it is wanted on, or is being deleted)
    have: dict[str, dict[str, str]] = {}
    learned: list[tuple[str, str, str]] = []  # (bridge, port, mac)
    for port, link in observed.links.items():
        if port in fresh or link.master is None:
            continue
        if macs := observed.port_fdb.get(port):
            have.setdefault(link.master, {}).update(dict.fromkeys(macs, port))
        learned += [(link.master, port, mac) for mac in observed.port_learned.get(port, ())]

    adds: list[Action] = []
    dels: list[Action] = []
    for bridge, macs in want.items():
        have_here = have.get(bridge, {})
        if macs == have_here:
            continue  # the steady state: one dict comparison
        adds += [
            AddPortFdb(port=port, mac=mac) for mac, port in sorted(macs.items() - have_here.items())
        ]
    # an entry wanted on another port of its bridge is moved by that add (replace): no delete;
    # a learned MAC the bridge is about to own statically is converted by it the same way
    for bridge, macs in have.items():
        wanted = want.get(bridge, {})
        dels += [
            DelPortFdb(port=port, mac=mac)
            for mac, port in sorted(macs.items() - wanted.items())
            if mac not in wanted
        ]
    dels += [
        DelPortFdb(port=port, mac=mac)
        for bridge, port, mac in sorted(learned)
        if mac not in want.get(bridge, {})
    ]
    return adds, dels


def plan_fdb_change(
    desired: Snapshot, observed: Observed, changes: Mapping[str, FdbDelta]
) -> list[Action] | None:
    """Pure: the FDB actions of a change, in work proportional to it. ``desired`` is the
    snapshot last planned against ``observed`` (which that plan left with nothing to do) but
    for the entries gained and lost in ``changes`` (by VXLAN name; ``agent.assemble``); the
    result is what ``plan(desired, observed)`` gives then: the same actions, adds before
    deletes (tested). None when the change alone cannot tell (a device missing or off its
    bridge, learned entries on the way): the caller plans the whole state."""
    adds: list[Action] = []
    port_adds: list[Action] = []
    dels: list[Action] = []
    port_dels: list[Action] = []
    for vx in desired.vxlans:
        change = changes.get(vx.name)
        if change is None:
            continue
        link = observed.links.get(vx.name)
        ports = [vx.name, *(t.name for t in desired.taps if t.bridge == vx.bridge)]
        if (
            link is None
            or link.master != vx.bridge
            or observed.learned.get(vx.name)
            or any(observed.port_learned.get(p) for p in ports)
        ):
            return None
        kernel = observed.fdb.get(vx.name, frozenset())
        touched = change.gained | change.lost
        wanted = change.view.counts  # every entry of the new FDB
        for e in sorted(e for e in touched if e.mac == FLOOD_MAC):  # each pair on its own
            if e in wanted and e not in kernel:
                adds.append(AddFdb(device=vx.name, mac=e.mac, dst=e.dst))
            elif e not in wanted and e in kernel:
                dels.append(DelFdb(device=vx.name, mac=e.mac, dst=e.dst))
        for mac in sorted({e.mac for e in touched if e.mac != FLOOD_MAC}):
            if not is_unicast(mac) or mac != mac.lower():
                return None  # never in a checked snapshot: let the whole plan decide
            dsts = change.view.dsts.get(mac)
            want = min(dsts) if dsts else None
            # the kernel's entries for this MAC: among the destinations it had or has
            have = sorted(
                d for d in {e.dst for e in touched if e.mac == mac} | (dsts or set())
                if FdbEntry(mac=mac, dst=d) in kernel
            )  # fmt: skip
            if want is not None and want not in have:
                adds.append(AddFdb(device=vx.name, mac=mac, dst=want))
            if want is None:
                dels += [DelFdb(device=vx.name, mac=mac, dst=d) for d in have]
            on = next((p for p in ports if mac in observed.port_fdb.get(p, ())), None)
            if any(t.mac and t.mac.lower() == mac for t in desired.taps if t.bridge == vx.bridge):
                return None  # a local NIC's MAC: the whole plan knows which port wins
            if want is not None and on != vx.name:
                port_adds.append(AddPortFdb(port=vx.name, mac=mac))
            elif want is None and on is not None:
                port_dels.append(DelPortFdb(port=on, mac=mac))
    return adds + port_adds + dels + port_dels


def plan_tap_change(
    desired: Snapshot,
    observed: Observed,
    changes: Mapping[str, FdbDelta],
    taps: TapDelta,
) -> list[Action] | None:
    """Pure: ``plan_fdb_change`` where this node's taps also changed (a VM's NIC attached or
    detached): each tap gained is created (or kept), enslaved, its learning turned off, brought
    up and given its static bridge entry, each tap lost is deleted, in the whole plan's order;
    the result is what ``plan(desired, observed)`` gives (tested), without looking at any FDB
    entry the change did not touch. None when the change alone cannot tell (its bridge missing,
    learned entries on a tap, an FDB change touching a tap's MAC): the caller plans whole."""
    fdb = plan_fdb_change(desired, observed, changes) if changes else []
    if fdb is None:
        return None
    gained = {t.name: t for t in taps.gained}
    if len(gained) != len(taps.gained):
        return None  # two values for one tap: never in a checked snapshot
    tap_macs = {t.mac.lower() for t in (*taps.gained, *taps.lost) if t.mac}
    if any(e.mac in tap_macs for c in changes.values() for e in (*c.gained, *c.lost)):
        return None  # a NIC moving between here and a remote node: the whole plan decides
    wanted = {(t.bridge, t.mac.lower()) for t in taps.gained if t.mac}
    links = observed.links
    recreate: list[Action] = []
    creates: list[Action] = []
    port_mtu: list[Action] = []
    masters: list[Action] = []
    learning: list[Action] = []
    ups: list[Action] = []
    port_add: list[Action] = []
    port_del: list[Action] = []
    deletes: list[Action] = []
    for name in sorted({*gained, *(t.name for t in taps.lost)}):
        tap, link = gained.get(name), links.get(name)
        if tap is None:
            if link is not None:
                deletes.append(DeleteLink(name=name))
            continue
        if (bridge := links.get(tap.bridge)) is None or bridge.kind != _BRIDGE:
            return None
        if link is not None and link.kind != _TAP:
            recreate.append(DeleteLink(name=name))
            link = None
        if link is None:
            creates.append(CreateTap(name=name, mtu=tap.mtu))
        enslaved = len(masters)
        _port(name, tap.mtu, tap.bridge, link, recreate, port_mtu, masters, learning, ups)
        fresh = link is None or len(masters) > enslaved
        if not fresh and observed.port_learned.get(name):
            return None
        have = frozenset() if fresh else observed.port_fdb.get(name, frozenset())
        mac = tap.mac.lower() if tap.mac else None
        if mac is not None and mac not in have:
            port_add.append(AddPortFdb(port=name, mac=mac))
        # an old MAC another tap gained on this bridge is moved by that tap's add: no delete
        port_del += [
            DelPortFdb(port=name, mac=m)
            for m in sorted(have - {mac})
            if (tap.bridge, m) not in wanted
        ]
    fdb_add = [a for a in fdb if isinstance(a, AddFdb)]
    fdb_del = [a for a in fdb if isinstance(a, DelFdb)]
    port_add = sorted(
        [*(a for a in fdb if isinstance(a, AddPortFdb)), *port_add], key=lambda a: (a.mac, a.port)
    )
    port_del = sorted(
        [*(a for a in fdb if isinstance(a, DelPortFdb)), *port_del], key=lambda a: (a.mac, a.port)
    )
    return (
        recreate + creates + port_mtu + masters + learning + ups
        + fdb_add + port_add + fdb_del + port_del + deletes
    )  # fmt: skip


def advance(observed: Observed, actions: Iterable[Action]) -> Observed | None:
    """Pure: the kernel state after FDB ``actions`` all succeeded on ``observed`` (as the kernel
    does them: a unicast VXLAN MAC's one dst replaced, a flood dst appended, a bridge MAC moved
    between the ports of its bridge), so a heartbeat that only wrote FDB entries needs no new
    dump to know where it stands. None when any action is not an FDB one."""
    fdb = dict(observed.fdb)
    learned = dict(observed.learned)
    port_fdb = dict(observed.port_fdb)
    port_learned = dict(observed.port_learned)
    # per VXLAN written: its entries and their destinations by MAC, changed in place (the cost
    # is the actions, plus one copy of each device's set)
    vxlans: dict[str, tuple[set[FdbEntry], dict[str, frozenset[str]]]] = {}

    def vxlan(device: str) -> tuple[set[FdbEntry], dict[str, frozenset[str]]]:
        if device not in vxlans:
            entries = fdb.get(device, frozenset())
            vxlans[device] = (set(entries), dict(_dsts_by_mac(entries)))
        return vxlans[device]

    for a in actions:
        match a:
            case AddFdb(device=device, mac=mac, dst=dst):
                entries, dsts = vxlan(device)
                if is_unicast(mac):
                    entries.difference_update(FdbEntry(mac=mac, dst=d) for d in dsts.get(mac, ()))
                    dsts[mac] = frozenset((dst,))
                    learned[device] = learned.get(device, frozenset()) - {mac}
                else:
                    dsts[mac] = dsts.get(mac, frozenset()) | {dst}
                entries.add(FdbEntry(mac=mac, dst=dst))
            case DelFdb(device=device, mac=mac, dst=None):
                learned[device] = learned.get(device, frozenset()) - {mac}
            case DelFdb(device=device, mac=mac, dst=dst):
                entries, dsts = vxlan(device)
                entries.discard(FdbEntry(mac=mac, dst=dst))
                if dst in dsts.get(mac, ()):
                    dsts[mac] = dsts[mac] - {dst}
                    if not dsts[mac]:
                        del dsts[mac]
            case AddPortFdb(port=port, mac=mac):
                bridge = observed.links[port].master if port in observed.links else None
                if bridge is None:
                    return None
                for other, link in observed.links.items():  # one entry per MAC on a bridge
                    if link.master == bridge:
                        if mac in port_fdb.get(other, ()):
                            port_fdb[other] = port_fdb[other] - {mac}
                        if mac in port_learned.get(other, ()):
                            port_learned[other] = port_learned[other] - {mac}
                port_fdb[port] = port_fdb.get(port, frozenset()) | {mac}
            case DelPortFdb(port=port, mac=mac):
                port_fdb[port] = port_fdb.get(port, frozenset()) - {mac}
                port_learned[port] = port_learned.get(port, frozenset()) - {mac}
            case _:
                return None
    for device, (entries, dsts) in vxlans.items():
        fdb[device] = frozenset(entries)
        _remember(fdb[device], dsts)
    return Observed(
        links=observed.links, fdb=fdb, learned=learned, port_fdb=port_fdb,
        port_learned=port_learned,
    )  # fmt: skip


_TAP_WRITES = CreateTap | SetMtu | SetMaster | SetPortLearning | SetUp | DeleteLink


def written_devices(
    observed: Observed, actions: Iterable[Action], desired: Snapshot
) -> frozenset[str] | None:
    """Pure: the links a plan wrote besides FDB entries, to read back after it (``settle``):
    each tap it created, changed or deleted, and the bridges they joined or left. Empty for
    FDB writes alone; None when it wrote any other device (the next heartbeat reads it all)."""
    written = _tap_writes(observed, actions, desired)
    return None if written is None else frozenset(written[0] | written[1])


def _tap_writes(
    observed: Observed, actions: Iterable[Action], desired: Snapshot
) -> tuple[set[str], set[str]] | None:
    """(taps written, their bridges); None when a non-FDB action is not a tap's."""
    wanted = {t.name: t for t in desired.taps}
    taps: set[str] = set()
    bridges: set[str] = set()
    for a in actions:
        if isinstance(a, FdbAction):
            continue
        link, tap = observed.links.get(a.name), wanted.get(a.name)
        if not isinstance(a, _TAP_WRITES) or (tap is None and (link is None or link.kind != _TAP)):
            return None
        if (
            isinstance(a, SetMaster)
            and a.master is not None
            and (tap is None or a.master != tap.bridge)
        ):
            return None  # never planned: a tap joins its own bridge
        taps.add(a.name)
        bridges |= {b for b in (tap.bridge if tap else None, link.master if link else None) if b}
    if taps & bridges:
        return None
    return taps, bridges


def settle(
    observed: Observed, actions: Iterable[Action], desired: Snapshot, read: Observed
) -> Observed | None:
    """Pure: the kernel state after a plan that wrote taps (``written_devices``) and FDB entries
    on ``observed``: those links as ``read`` back after the writes (each tap's bridge entries
    too), every other FDB entry as ``advance`` knows it. None unless the read shows each tap
    as ``desired`` wants it (``plan_tap_change`` has nothing left to do, a tap not wanted is
    gone) and each bridge as ``observed`` had it: a write that did not take, or a change made
    by someone else meanwhile, is then left to a full read."""
    actions = list(actions)
    written = _tap_writes(observed, actions, desired)
    if written is None:
        return None
    taps, bridges = written
    wanted = {t.name: t for t in desired.taps}
    for bridge in bridges:
        was, now = observed.links.get(bridge), read.links.get(bridge)
        if was is None or now is None or _steady(was) != _steady(now):
            return None
    if any(name in read.links for name in taps - wanted.keys()):
        return None  # a tap to delete is still there
    links = {n: link for n, link in observed.links.items() if n not in taps}
    links |= {n: link for n, link in read.links.items() if n in taps}

    def ports(before: dict[str, frozenset[str]], now: dict[str, frozenset[str]]):
        out = {k: v for k, v in before.items() if k not in taps}
        return out | {n: now.get(n, frozenset()) for n in taps if n in links and links[n].master}

    known = Observed(
        links=links, fdb=observed.fdb, learned=observed.learned,
        port_fdb=ports(observed.port_fdb, read.port_fdb),
        port_learned=ports(observed.port_learned, read.port_learned),
    )  # fmt: skip
    after = advance(known, (a for a in actions if isinstance(a, FdbAction)))
    if after is None:
        return None
    # the taps' own entries as read, whatever the writes meant: one that did not take shows
    after = Observed(
        links=links, fdb=after.fdb, learned=after.learned,
        port_fdb=after.port_fdb | {n: v for n, v in known.port_fdb.items() if n in taps},
        port_learned=after.port_learned
        | {n: v for n, v in known.port_learned.items() if n in taps},
    )  # fmt: skip
    gained = _Gained(frozenset(wanted[n] for n in taps if n in wanted))
    if plan_tap_change(desired, after, {}, gained) != []:
        return None
    return after


class _Gained:
    """A ``TapDelta`` of taps gained alone (``settle``'s check)."""

    def __init__(self, gained: frozenset):
        self.gained, self.lost = gained, frozenset()

    def fdb_has(self, bridge: str, mac: str) -> bool:
        return False


def _steady(link: Link) -> Link:
    """A bridge as a plan reads it: its carrier follows its ports, which a tap change moves."""
    return msgspec.structs.replace(link, carrier=False)


# the destinations by MAC of a few recent VXLAN FDB sets (by identity): each advanced set's
# index is carried on from the one before, so a write costs its actions, not a scan
_INDEXES: dict[int, tuple[frozenset[FdbEntry], dict[str, frozenset[str]]]] = {}
_INDEXES_KEPT = 16


def _dsts_by_mac(entries: frozenset[FdbEntry]) -> dict[str, frozenset[str]]:
    kept = _INDEXES.get(id(entries))
    if kept is not None and kept[0] is entries:
        return kept[1]
    index: dict[str, set[str]] = {}
    for e in entries:
        index.setdefault(e.mac, set()).add(e.dst)
    out = {mac: frozenset(d) for mac, d in index.items()}
    _remember(entries, out)
    return out


def _remember(entries: frozenset[FdbEntry], index: dict[str, frozenset[str]]) -> None:
    while len(_INDEXES) >= _INDEXES_KEPT:
        del _INDEXES[next(iter(_INDEXES))]
    _INDEXES[id(entries)] = (entries, index)
