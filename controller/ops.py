"""Pure API semantics: validate a request against the current intent and return what to write.

Each function either returns the new objects or raises an ``ApiError`` (``schemas.errors``); the
API persists the result only after validation passed, so a refused request changes nothing. No I/O
here: these functions never touch the store, the bus or the clock.
"""

import base64
import binascii
import ipaddress
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

import msgspec

from controller import ipam
from controller.compute import ClusterConfig
from schemas import SCHEMA_VERSION, api, naming
from schemas.codec import decode
from schemas.errors import BadRequest, Conflict, Deferred, NotFound
from schemas.intent import DEFERRED_TYPES, Egress, Intent, Network, NetworkType, Nic, Node
from schemas.limits import special_range

R = TypeVar("R", bound=api.Request)


def decode_request(endpoint: str, data: bytes, request_type: type[R]) -> R:
    """The request, or a ``BadRequest`` for anything undecodable: wrong JSON, wrong types, text
    that is not UTF-8, nesting deeper than the decoder goes (never an internal error)."""
    try:
        return decode(data, request_type)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # ValidationError is a DecodeError
        raise BadRequest(f"invalid {endpoint} request: {e}") from None
    except RecursionError:
        raise BadRequest(f"invalid {endpoint} request: JSON nested too deeply") from None


def check_schema(req: api.Request) -> None:
    if req.schema != SCHEMA_VERSION:
        raise BadRequest(
            f"request schema {req.schema} is not supported (this controller speaks {SCHEMA_VERSION})"
        )


def _check_id(kind: str, value: str) -> None:
    try:
        naming.check_id(kind, value)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def create_network(
    intent: Intent, req: api.NetworkCreate, now: float, config: ClusterConfig
) -> Network:
    _check_id("network", req.name)
    if req.type in DEFERRED_TYPES:
        raise Deferred(f"network type {req.type.value!r} is deferred: not supported yet")
    if (existing := existing_network(intent, req)) is not None:
        return existing  # a retried create: the caller sees it is the stored object
    subnet = ipam.parse_subnet(req.subnet)
    ipam.check_subnet_allowed(subnet, config.mesh_prefix, config.underlay_cidrs)
    # the nodes' own addresses, also when no --underlay-cidr names their network (review)
    for node in sorted(intent.nodes.values(), key=lambda n: n.name):
        if node.underlay_ip and ipaddress.ip_address(node.underlay_ip) in subnet:
            raise BadRequest(
                f"subnet {subnet} holds node {node.name}'s underlay address {node.underlay_ip},"
                " which no VM network may use"
            )
    ipam.check_subnet_free(subnet, {n.name: n.subnet for n in intent.networks.values()})
    vni = None
    if req.type == NetworkType.OVERLAY:
        if req.egress != Egress.NONE:
            raise BadRequest("egress 'nat' is only available on bridge networks")
        vni = ipam.allocate_vni((n.vni for n in intent.networks.values() if n.vni), req.vni)
    elif req.vni is not None:
        raise BadRequest("--vni only applies to overlay networks")
    bridge = naming.bridge_network_bridge(req.name) if req.type == NetworkType.BRIDGE else None
    for other in intent.networks.values():
        if (
            bridge
            and other.type == NetworkType.BRIDGE
            and naming.bridge_network_bridge(other.name) == bridge
        ):
            raise Conflict(
                f"network {req.name!r} would share bridge device {bridge} with {other.name!r}; "
                "choose another name"
            )
    return Network(
        name=req.name,
        type=req.type,
        subnet=str(subnet),
        gateway=str(ipam.gateway_of(subnet)),
        egress=req.egress,
        vni=vni,
        created_at=now,
    )


def existing_network(intent: Intent, req: api.NetworkCreate) -> Network | None:
    """The network ``req`` names if it exists with the parameters ``req`` asks for (a create
    retried after its reply was lost), else None; a ``Conflict`` that names what differs when it
    exists otherwise."""
    net = intent.networks.get(req.name)
    if net is None:
        return None
    differ = [
        f"{what} {have}, not {asked}"
        for what, have, asked, same in (
            ("type", net.type.value, req.type.value, net.type == req.type),
            ("subnet", net.subnet, req.subnet, net.subnet == str(ipam.parse_subnet(req.subnet))),
            ("egress", net.egress.value, req.egress.value, net.egress == req.egress),
            ("vni", net.vni, req.vni, req.vni is None or req.vni == net.vni),
        )
        if not same
    ]
    if differ:
        raise Conflict(f"network {req.name!r} already exists with {'; '.join(differ)}")
    return net


def network(intent: Intent, name: str) -> Network:
    try:
        return intent.networks[name]
    except KeyError:
        raise NotFound(f"network {name!r} does not exist") from None


def delete_network(intent: Intent, req: api.NetworkDelete) -> tuple[Network, list[Nic]]:
    """The network and the NICs to remove with it (only with ``force``)."""
    net = network(intent, req.name)
    nics = [n for n in intent.nics.values() if n.network == net.name]
    if nics and not req.force:
        raise Conflict(
            f"network {net.name!r} still has {len(nics)} NIC(s) attached; "
            "detach them first or delete with force"
        )
    return net, nics


def attach_nic(
    intent: Intent,
    req: api.NicAttach,
    now: float,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> Nic:
    net = network(intent, req.network)
    if req.node not in intent.nodes:
        raise NotFound(f"node {req.node!r} is not registered")
    if not req.vm or len(req.vm) > 128 or not req.vm.isprintable():
        raise BadRequest("vm must be a printable name of 1 to 128 characters")
    if (existing := existing_nic(intent, req)) is not None:
        return existing  # a retried attach: the caller sees it is the stored object
    members = [n for n in intent.nics.values() if n.network == net.name]
    ip = ipam.allocate_ip(
        ipaddress.ip_network(net.subnet), {n.ip for n in members}, req.ip, net.released
    )
    mac = ipam.allocate_mac({n.mac for n in intent.nics.values()}, req.mac)
    taps = {naming.tap_name(n.id) for n in intent.nics.values()}
    nic_id = new_id()
    while naming.tap_name(nic_id) in taps:  # the tap name keeps 12 of 32 digits
        nic_id = new_id()
    return Nic(
        id=nic_id,
        network=net.name,
        node=req.node,
        vm=req.vm,
        mac=mac,
        ip=ip,
        port_security=req.port_security,
        created_at=now,
    )


def released_networks(intent: Intent, nics: list[Nic]) -> list[Network]:
    """The networks of ``nics`` with their addresses recorded as released (in the order given),
    to persist with the detach: the release order survives a controller restart."""
    changed = []
    for name in sorted({n.network for n in nics}):
        net = intent.networks.get(name)
        if net is not None:
            ips = [n.ip for n in nics if n.network == name]
            changed.append(
                msgspec.structs.replace(net, released=ipam.release_ips(net.released, ips))
            )
    return changed


def existing_nic(intent: Intent, req: api.NicAttach) -> Nic | None:
    """The VM's NIC on ``req``'s network if it matches what ``req`` asks for, else None. A VM
    has one NIC per network: (vm, network) is what makes an attach retry-safe without keys to
    remember, so an attach retried after its reply was lost returns the NIC it made. A request
    that differs (another node, address, MAC or port security) is a ``Conflict`` naming the NIC."""
    nic = next(
        (n for n in intent.nics.values() if n.network == req.network and n.vm == req.vm), None
    )
    if nic is None:
        return None
    same_security = nic.port_security == req.port_security
    differ = [
        f"{what} {have}, not {asked}"
        for what, have, asked, same in (
            ("node", nic.node, req.node, nic.node == req.node),
            ("ip", nic.ip, req.ip, req.ip is None or nic.ip == _ip_text(req.ip)),
            ("mac", nic.mac, req.mac, req.mac is None or nic.mac == ipam.normalise_mac(req.mac)),
            ("port_security", nic.port_security, req.port_security, same_security),
        )
        if not same
    ]
    if differ:
        raise Conflict(
            f"vm {req.vm!r} already has NIC {nic.id} (tap {naming.tap_name(nic.id)}) on network"
            f" {req.network!r} with {'; '.join(differ)}: a VM has one NIC per network, detach"
            " that one first to change it"
        )
    return nic


def _ip_text(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise BadRequest(f"ip {value!r} is not a valid IPv4 address") from None


def _nic_id_key(id_or_prefix: str) -> str:
    key = id_or_prefix.lower()
    if key.startswith(naming.PREFIX) and len(key) == 14:
        key = key[2:]  # a tap name names its NIC too
    if len(key) < 12:
        raise BadRequest(f"NIC id {id_or_prefix!r}: give the full id or at least 12 hex digits")
    return key


def find_detached(detached: Iterable[Nic], id_or_prefix: str) -> Nic | None:
    """The one NIC among ``detached`` (NICs detached earlier) the id or prefix names, else None."""
    key = _nic_id_key(id_or_prefix)
    matches = [n for n in detached if n.id.startswith(key)]
    return matches[0] if len(matches) == 1 else None


def find_nic(intent: Intent, id_or_prefix: str) -> Nic:
    key = _nic_id_key(id_or_prefix)
    matches = [n for n in intent.nics.values() if n.id.startswith(key)]
    if not matches:
        raise NotFound(f"NIC {id_or_prefix!r} does not exist")
    if len(matches) > 1:
        raise Conflict(f"NIC id {id_or_prefix!r} is ambiguous")
    return matches[0]


def register_node(intent: Intent, req: api.NodeRegister, now: float, mesh_prefix: str) -> Node:
    """New or updated node; its tunnel address is allocated once and kept for its life."""
    _check_id("node", req.name)
    if req.underlay_ip is not None:
        _check_underlay_ip(req.underlay_ip, mesh_prefix)
    if req.wg_public_key is not None and not _is_wg_key(req.wg_public_key):
        raise BadRequest("wg_public_key is not a base64 WireGuard key (44 characters)")
    if req.wg_listen_port is not None and not 1 <= req.wg_listen_port <= 65535:
        raise BadRequest(f"wg_listen_port {req.wg_listen_port} is not a UDP port")
    for other in intent.nodes.values():
        if (
            other.name != req.name
            and req.wg_public_key
            and other.wg_public_key == req.wg_public_key
        ):
            raise Conflict(f"public key already belongs to node {other.name!r}")
    existing = intent.nodes.get(req.name)
    if existing is not None and not existing.rekey:
        changed = [
            field
            for field in ("wg_public_key", "underlay_ip", "wg_listen_port")
            if getattr(existing, field) is not None
            and getattr(existing, field) != getattr(req, field)
        ]
        if changed:
            raise Conflict(
                f"node {req.name!r} is registered with another {', '.join(changed)}; an admin"
                f" must run 'otherixctl node rekey {req.name}' (or remove the node) first"
            )
    tunnel_ip = existing.tunnel_ip if existing else None
    if tunnel_ip is None and req.wg_public_key:
        used = {n.tunnel_ip for n in intent.nodes.values() if n.tunnel_ip}
        tunnel_ip = ipam.allocate_tunnel_ip(mesh_prefix, used)
    return Node(
        name=req.name,
        underlay_ip=req.underlay_ip,
        wg_public_key=req.wg_public_key,
        wg_listen_port=req.wg_listen_port,
        tunnel_ip=tunnel_ip,
        registered_at=existing.registered_at if existing else now,
    )


def _check_underlay_ip(value: str, mesh_prefix: str) -> None:
    """Every peer's snapshot carries this address as the node's WireGuard endpoint, and agents
    refuse endpoints no node could be reached on: refuse them here, where one node's mistake
    cannot block every other node's snapshot."""
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise BadRequest(f"underlay_ip {value!r} is not an IPv4 address") from None
    if special := special_range(ipaddress.IPv4Network(ip)):
        raise BadRequest(f"underlay_ip {ip} is in {special}: no other node can reach it there")
    if ip in (mesh := ipaddress.IPv4Network(mesh_prefix)):
        raise BadRequest(f"underlay_ip {ip} is inside the mesh prefix {mesh} it would carry")


def rekey_node(intent: Intent, req: api.ByName) -> Node:
    """Allow the node's next registration to bring a new key or endpoint (once)."""
    node = intent.nodes.get(req.name)
    if node is None:
        raise NotFound(f"node {req.name!r} is not registered")
    return msgspec.structs.replace(node, rekey=True)


def remove_node(intent: Intent, req: api.NodeRemove) -> tuple[Node, list[Nic]]:
    node = intent.nodes.get(req.name)
    if node is None:
        raise NotFound(f"node {req.name!r} is not registered")
    nics = [n for n in intent.nics.values() if n.node == node.name]
    if nics and not req.force:
        raise Conflict(
            f"node {node.name!r} still hosts {len(nics)} NIC(s); detach them first or remove with force"
        )
    return node, nics


def _is_wg_key(value: str) -> bool:
    """Base64 of 32 bytes in its one canonical spelling: the last character has two bits that
    decoding ignores, and an alias of another node's key must not pass a string comparison."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and base64.b64encode(raw).decode() == value
