"""Pure allocation and validation: subnets, NIC IPs, MACs, VNIs, tunnel addresses.

Every function takes what is already allocated and returns a value or raises ``BadRequest`` or
``Conflict`` (``schemas.errors``) with a message an operator can act on. No I/O here.
"""

import ipaddress
import random
import re
from collections.abc import Callable, Collection, Iterable, Sequence

from schemas.errors import BadRequest, Conflict
from schemas.limits import special_range
from schemas.naming import VNI_MAX, VNI_MIN

DEFAULT_VNI_START = 1000
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def parse_subnet(cidr: str) -> ipaddress.IPv4Network:
    """An IPv4 subnet with room for a gateway and at least one NIC (prefix /8 to /30)."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise BadRequest(f"subnet {cidr!r} is not a valid network in CIDR form: {e}") from None
    if net.version != 4:
        raise BadRequest(f"subnet {cidr}: only IPv4 subnets are supported")
    if not 8 <= net.prefixlen <= 30:
        raise BadRequest(
            f"subnet {cidr}: prefix length must be between /8 and /30 "
            "(room for a gateway and at least one NIC)"
        )
    return net


def gateway_of(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return net.network_address + 1


def check_subnet_allowed(
    net: ipaddress.IPv4Network, mesh_prefix: str, underlay_cidrs: Iterable[str]
) -> None:
    """A VM network never overlaps the mesh, the nodes' underlay or a special-purpose range: its
    connected route would beat the mesh's or the underlay's, and its gateway would answer for
    addresses the node needs."""
    infrastructure = [(mesh_prefix, "the mesh prefix {} (the nodes' tunnel addresses)")]
    infrastructure += [
        (cidr, "the underlay {} (the nodes' own network)") for cidr in underlay_cidrs
    ]
    why = special_range(net)
    for cidr, words in infrastructure:
        if why is None and net.overlaps(prefix := ipaddress.IPv4Network(cidr)):
            why = words.format(prefix)
    if why is not None:
        raise BadRequest(f"subnet {net} overlaps {why}, which no VM network may use")


def check_subnet_free(net: ipaddress.IPv4Network, taken: dict[str, str]) -> None:
    """``taken`` maps network name → subnet; overlapping subnets would make routing ambiguous."""
    for name, other in taken.items():
        if net.overlaps(ipaddress.ip_network(other)):
            raise Conflict(f"subnet {net} overlaps {other} of network {name!r}")


RELEASED_LIMIT = 1024  # released addresses a network remembers, oldest first


def allocate_ip(
    net: ipaddress.IPv4Network,
    used: Collection[str],
    wanted: str | None,
    released: Sequence[str] = (),
) -> str:
    """The wanted address if valid and free; else the lowest free host never released (as far
    as ``released`` remembers), else the least recently released free one. Like a DHCP server or
    a cloud IPAM: an address just given up is handed out last, so VMs that cached its old MAC
    are not asked to reach a new NIC behind it."""
    gateway = gateway_of(net)
    if wanted is not None:
        try:
            ip = ipaddress.ip_address(wanted)
        except ValueError:
            raise BadRequest(f"ip {wanted!r} is not a valid IPv4 address") from None
        if ip not in net:
            raise BadRequest(f"ip {ip} is outside the network's subnet {net}")
        if ip in (net.network_address, net.broadcast_address):
            raise BadRequest(f"ip {ip} is the network or broadcast address of {net}")
        if ip == gateway:
            raise BadRequest(f"ip {ip} is the gateway of {net}")
        if str(ip) in used:
            raise Conflict(f"ip {ip} is already in use in {net}")
        return str(ip)
    recent = set(released)
    for host in net.hosts():
        if host != gateway and str(host) not in used and str(host) not in recent:
            return str(host)
    for ip in released:  # oldest release first
        if (
            ip not in used
            and ipaddress.ip_address(ip) in net
            and ipaddress.ip_address(ip) != gateway
        ):
            return ip
    raise Conflict(f"subnet {net} is exhausted: no free address left")


def release_ips(
    released: Sequence[str], ips: Iterable[str], limit: int = RELEASED_LIMIT
) -> tuple[str, ...]:
    """The release order after ``ips`` were given up (in that order): each moves to the end
    (most recent), and only the newest ``limit`` are kept."""
    order = list(released)
    for ip in ips:
        if ip in order:
            order.remove(ip)
        order.append(ip)
    return tuple(order[-limit:]) if limit > 0 else ()


def normalise_mac(mac: str) -> str:
    value = mac.strip().lower().replace("-", ":")
    if not _MAC.match(value):
        raise BadRequest(f"mac {mac!r} is not a MAC address like 02:00:00:00:00:01")
    first = int(value[:2], 16)
    if first & 1:
        raise BadRequest(f"mac {mac} is a multicast address; a NIC needs a unicast one")
    if value == "00:00:00:00:00:00":
        raise BadRequest("mac 00:00:00:00:00:00 is not a usable NIC address")
    return value


def allocate_mac(
    used: Collection[str], wanted: str | None, rand: Callable[[int], int] = random.getrandbits
) -> str:
    """The wanted MAC if valid and free, else a random locally administered unicast one."""
    if wanted is not None:
        mac = normalise_mac(wanted)
        if mac in used:
            raise Conflict(f"mac {mac} is already used by another NIC")
        return mac
    for _ in range(64):
        octets = [0x02] + [rand(8) for _ in range(5)]  # 0x02: locally administered, unicast
        mac = ":".join(f"{o:02x}" for o in octets)
        if mac not in used:
            return mac
    raise Conflict("could not find a free MAC address")


def allocate_vni(used: Iterable[int], wanted: int | None) -> int:
    taken = set(used)
    if wanted is not None:
        if not VNI_MIN <= wanted <= VNI_MAX:
            raise BadRequest(f"vni {wanted} is out of range {VNI_MIN}..{VNI_MAX}")
        if wanted in taken:
            raise Conflict(f"vni {wanted} is already used by another network")
        return wanted
    vni = DEFAULT_VNI_START
    while vni in taken:
        vni += 1
    if vni > VNI_MAX:
        raise Conflict("no free VNI left")
    return vni


def allocate_tunnel_ip(prefix: str, used: Collection[str]) -> str:
    """Lowest free host address of the mesh prefix (tunnel addresses are stable per node)."""
    net = ipaddress.ip_network(prefix)
    for host in net.hosts():
        if str(host) not in used:
            return str(host)
    raise Conflict(f"mesh prefix {prefix} is exhausted: no tunnel address left")
