"""Pure: intent + cluster settings → every node's desired snapshot, all at once.

The reference computation: the controller publishes sections computed incrementally
(``controller.sections``), and what an agent assembles from them equals this (tested on random
intents). Also the shared rules both use (screening, MTUs, bridge names). Nothing here reads a
clock, a store or a socket. Snapshots come out with ``version=0`` and their content digest set.
"""

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Callable

import msgspec

from controller import ipam
from schemas import naming
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan, WgPeer, WireGuard
from schemas.errors import ApiError
from schemas.intent import Egress, Intent, Network, NetworkType, Nic, Node
from schemas.limits import special_range

FLOOD_MAC = "00:00:00:00:00:00"


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    underlay_mtu: int = 1500
    mesh_prefix: str = "100.64.0.0/16"
    underlay_cidrs: tuple[str, ...] = ()  # the nodes' own network(s): never a VM network
    heartbeat_interval: float = 1.0


def network_mtu(network: Network, underlay_mtu: int) -> int:
    if network.type == NetworkType.OVERLAY:
        return naming.overlay_mtu(underlay_mtu)
    return underlay_mtu


def network_bridge(network: Network) -> str:
    if network.type == NetworkType.OVERLAY:
        assert network.vni is not None
        return naming.overlay_bridge(network.vni)
    return naming.bridge_network_bridge(network.name)


def on_mesh(node: Node) -> bool:
    return bool(node.wg_public_key and node.tunnel_ip and node.underlay_ip and node.wg_listen_port)


def snapshot_digest(snapshot: Snapshot) -> str:
    content = msgspec.structs.replace(snapshot, version=0, digest="", published_at=0.0)
    return hashlib.sha256(msgspec.json.encode(content)).hexdigest()[:16]


def screen(intent: Intent, config: ClusterConfig) -> tuple[Intent, list[str]]:
    """The intent without records an agent would refuse, and why each was left out.

    The API refuses such records today, but the store may hold older ones; a network on an
    infrastructure range would get its node's whole snapshot refused, and a node with a bad
    endpoint is a peer in every other node's snapshot, so one bad record would stall them all.
    """
    problems: list[str] = []
    networks = {}
    for name, net in intent.networks.items():
        if why := network_problem(net, config):
            problems.append(why)
            continue
        networks[name] = net
    nodes = {}
    for name, node in intent.nodes.items():
        node, why = screened_node(node, config)
        if why:
            problems.append(why)
        nodes[name] = node
    if not problems:
        return intent, problems
    return Intent(networks=networks, nics=intent.nics, nodes=nodes), problems


def network_problem(net: Network, config: ClusterConfig) -> str | None:
    """Why ``screen`` leaves this network out, else None."""
    try:
        ipam.check_subnet_allowed(
            ipaddress.IPv4Network(net.subnet), config.mesh_prefix, config.underlay_cidrs
        )
    except (ValueError, ApiError) as e:
        return f"network {net.name}: {e}"
    return None


def screened_node(node: Node, config: ClusterConfig) -> tuple[Node, str | None]:
    """The node as ``screen`` keeps it (off the mesh when its endpoint is bad), and why."""
    if on_mesh(node) and (why := _bad_endpoint(node, config)):
        return (
            msgspec.structs.replace(node, wg_public_key=None),
            f"node {node.name} left out of the mesh: {why}",
        )
    return node, None


def _bad_endpoint(node: Node, config: ClusterConfig) -> str | None:
    try:
        underlay = ipaddress.IPv4Address(node.underlay_ip)
        tunnel = ipaddress.IPv4Address(node.tunnel_ip)
    except ValueError as e:
        return str(e)
    mesh = ipaddress.IPv4Network(config.mesh_prefix)
    if why := special_range(ipaddress.IPv4Network(underlay)):
        return f"underlay_ip {underlay} is in {why}"
    if underlay in mesh or tunnel not in mesh:
        return f"underlay_ip {underlay} / tunnel_ip {tunnel} do not fit the mesh prefix {mesh}"
    if not 1 <= (node.wg_listen_port or 0) <= 65535:
        return f"wg_listen_port {node.wg_listen_port} is not a UDP port"
    return None


def compute_snapshots(
    intent: Intent,
    config: ClusterConfig,
    on_error: Callable[[str, Exception], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> dict[str, Snapshot]:
    """Every node's snapshot. With ``on_error``, a node whose records cannot be computed (e.g. a
    damaged store entry) is reported there and left out, so it cannot stop the others; records
    ``screen`` leaves out are reported to ``on_skip``."""
    intent, problems = screen(intent, config)
    for problem in problems if on_skip is not None else ():
        on_skip(problem)
    nics_by_node: dict[str, list[Nic]] = defaultdict(list)
    # network → node → NICs, for FDB and flood lists
    placement: dict[str, dict[str, list[Nic]]] = defaultdict(lambda: defaultdict(list))
    for nic in sorted(intent.nics.values(), key=lambda n: n.id):
        if nic.network in intent.networks and nic.node in intent.nodes:
            nics_by_node[nic.node].append(nic)
            placement[nic.network][nic.node].append(nic)
    snapshots = {}
    for name, node in intent.nodes.items():
        try:
            snapshots[name] = _node_snapshot(intent, node, nics_by_node[name], placement, config)
        except Exception as e:
            if on_error is None:
                raise
            on_error(name, e)
    return snapshots


def _node_snapshot(
    intent: Intent,
    node: Node,
    nics: list[Nic],
    placement: dict[str, dict[str, list[Nic]]],
    config: ClusterConfig,
) -> Snapshot:
    u = config.underlay_mtu
    bridges: dict[str, Bridge] = {}
    taps: list[Tap] = []
    vxlans: list[Vxlan] = []
    nat: set[str] = set()
    for nic in nics:
        net = intent.networks[nic.network]
        if net.type == NetworkType.OVERLAY and not on_mesh(node):
            continue  # an overlay needs this node's tunnel address; it comes with registration
        bridge, mtu = network_bridge(net), network_mtu(net, u)
        if bridge not in bridges:
            address = None
            if net.type == NetworkType.BRIDGE and net.egress == Egress.NAT:
                address = f"{net.gateway}/{ipaddress.ip_network(net.subnet).prefixlen}"
                nat.add(net.subnet)
            bridges[bridge] = Bridge(name=bridge, mtu=mtu, address=address, network=net.name)
            if net.type == NetworkType.OVERLAY:
                vxlans.append(_vxlan(intent, node, net, placement[net.name], u))
        taps.append(
            Tap(
                name=naming.tap_name(nic.id),
                bridge=bridge,
                mtu=mtu,
                nic=nic.id,
                mac=nic.mac,
                ip=nic.ip,
                port_security=nic.port_security,
            )
        )
    snapshot = Snapshot(
        node=node.name,
        version=0,
        underlay_mtu=u,
        bridges=tuple(sorted(bridges.values(), key=lambda b: b.name)),
        taps=tuple(sorted(taps, key=lambda t: t.name)),
        nat_subnets=tuple(sorted(nat)),
        vxlans=tuple(sorted(vxlans, key=lambda v: v.name)),
        wireguard=_wireguard(intent, node, config),
        infrastructure=(config.mesh_prefix, *config.underlay_cidrs),
    )
    return msgspec.structs.replace(snapshot, digest=snapshot_digest(snapshot))


def _vxlan(
    intent: Intent, node: Node, net: Network, by_node: dict[str, list[Nic]], underlay_mtu: int
) -> Vxlan:
    assert net.vni is not None and node.tunnel_ip is not None
    fdb: set[FdbEntry] = set()
    for other, nics in by_node.items():
        peer = intent.nodes[other]
        if other == node.name or not on_mesh(peer):
            continue
        fdb.add(FdbEntry(mac=FLOOD_MAC, dst=peer.tunnel_ip))
        fdb.update(FdbEntry(mac=nic.mac, dst=peer.tunnel_ip) for nic in nics)
    return Vxlan(
        name=naming.vxlan_device(net.vni),
        vni=net.vni,
        bridge=naming.overlay_bridge(net.vni),
        local=node.tunnel_ip,
        mtu=naming.overlay_mtu(underlay_mtu),
        port=naming.VXLAN_PORT,
        fdb=tuple(sorted(fdb)),
    )


def _wireguard(intent: Intent, node: Node, config: ClusterConfig) -> WireGuard | None:
    if not on_mesh(node):
        return None
    prefixlen = ipaddress.ip_network(config.mesh_prefix).prefixlen
    peers = tuple(
        sorted(
            WgPeer(
                public_key=peer.wg_public_key,
                endpoint=f"{peer.underlay_ip}:{peer.wg_listen_port}",
                allowed_ips=(f"{peer.tunnel_ip}/32",),
                node=peer.name,
            )
            for peer in intent.nodes.values()
            if peer.name != node.name and on_mesh(peer)
        )
    )
    return WireGuard(
        name=naming.WIREGUARD_IFNAME,
        address=f"{node.tunnel_ip}/{prefixlen}",
        listen_port=node.wg_listen_port,
        mtu=naming.wireguard_mtu(config.underlay_mtu),
        peers=peers,
    )
