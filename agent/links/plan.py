"""Pure: desired snapshot + observed kernel state → ordered list of netlink actions.

Order matters: create devices, set port MTUs, enslave, then bridge MTUs and addresses, bring up,
add FDB entries before deleting stale ones (no window without forwarding), and delete devices
last. An equal state gives an empty plan: a no-op heartbeat makes zero netlink writes.
Only devices named ``ot…`` appear in ``Observed``; ``otwg0`` belongs to the WireGuard applier.
"""

from agent.links.model import (
    Action,
    AddAddress,
    AddFdb,
    CreateBridge,
    CreateTap,
    CreateVxlan,
    DelAddress,
    DeleteLink,
    DelFdb,
    Link,
    Observed,
    SetMaster,
    SetMtu,
    SetUp,
    VxlanInfo,
)
from schemas import naming
from schemas.desired import FdbEntry, Snapshot

# kinds a desired device may have; "tun" is a tap (the kernel reports taps as kind "tun")
_BRIDGE, _TAP, _VXLAN = "bridge", "tun", "vxlan"


def plan(desired: Snapshot, observed: Observed) -> list[Action]:
    links = observed.links
    creates: list[Action] = []
    recreate: list[Action] = []  # wrong kind or immutable attributes: delete before create
    port_mtu: list[Action] = []
    masters: list[Action] = []
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
        _port(vx.name, vx.mtu, vx.bridge, link, recreate, port_mtu, masters, ups)

    for tap in desired.taps:
        link = ensure(tap.name, _TAP, CreateTap(name=tap.name, mtu=tap.mtu))
        _port(tap.name, tap.mtu, tap.bridge, link, recreate, port_mtu, masters, ups)

    wanted = {b.name for b in desired.bridges} | {v.name for v in desired.vxlans}
    wanted |= {t.name for t in desired.taps} | {naming.WIREGUARD_IFNAME}
    deletes = [DeleteLink(name=name) for name in sorted(links) if name not in wanted]
    # ports before their bridges, so nothing is briefly re-parented
    deletes.sort(key=lambda a: links[a.name].kind == _BRIDGE)

    fdb_add, fdb_del = _fdb(desired, observed, recreated={a.name for a in recreate})
    return (
        recreate
        + creates
        + port_mtu
        + masters
        + bridge_mtu
        + addresses
        + ups
        + fdb_add
        + fdb_del
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
    ups: list[Action],
) -> None:
    if link is not None and link.mtu != mtu:
        port_mtu.append(SetMtu(name=name, mtu=mtu))
    # a recreated bridge has lost its ports, even if the observed state still names it
    if link is None or link.master != bridge or DeleteLink(name=bridge) in recreate:
        masters.append(SetMaster(name=name, master=bridge))
    if link is None or not link.up:
        ups.append(SetUp(name=name))


def _fdb(
    desired: Snapshot, observed: Observed, recreated: set[str]
) -> tuple[list[Action], list[Action]]:
    adds: list[Action] = []
    dels: list[Action] = []
    for vx in desired.vxlans:
        fresh = vx.name in recreated or vx.name not in observed.links
        have: frozenset[FdbEntry] = frozenset() if fresh else observed.fdb.get(vx.name, frozenset())
        want = set(vx.fdb)
        adds += [AddFdb(device=vx.name, mac=e.mac, dst=e.dst) for e in sorted(want - have)]
        dels += [DelFdb(device=vx.name, mac=e.mac, dst=e.dst) for e in sorted(have - want)]
        if not fresh:
            dels += [
                DelFdb(device=vx.name, mac=m, dst=None)
                for m in sorted(observed.learned.get(vx.name, ()))
            ]
    return adds, dels
