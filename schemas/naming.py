"""Deterministic names (devices, subjects) and the MTU derivation from the spec.

Every device Otherix manages starts with ``ot``; the agent never touches anything else. The
families cannot collide: taps are ``ot`` + exactly 12 hex digits (14 characters), overlay
devices are ``otb``/``otvx`` + a decimal VNI (at most 12 characters), bridge-network bridges are
``otn`` + 8 hex digits ('n' is not a hex digit, so never a tap), and WireGuard is ``otwg0``.
"""

import hashlib
import re

IFNAMSIZ = 15  # usable characters (the kernel's IFNAMSIZ of 16 includes the NUL)
PREFIX = "ot"
WIREGUARD_IFNAME = "otwg0"
BRIDGE_NETWORK_PREFIX = "otn"
VXLAN_PREFIX = "otvx"
VXLAN_PORT = 4789
WIREGUARD_PORT = 51820
WIREGUARD_OVERHEAD = 60  # 20 IPv4 + 8 UDP + 32 WireGuard
VXLAN_OVERHEAD = 50  # 20 IPv4 + 8 UDP + 8 VXLAN + 14 inner Ethernet
MIN_UNDERLAY_MTU = 1280
MAX_UNDERLAY_MTU = 9216
VNI_MIN, VNI_MAX = 1, 2**24 - 1

SUBJECT_ROOT = "otherix.v1"
API_PREFIX = f"{SUBJECT_ROOT}.api"

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NIC_ID = re.compile(r"^[0-9a-f]{12,32}$")


def valid_id(value: str) -> bool:
    """Node and network names: lowercase DNS labels, safe as a NATS subject token."""
    return bool(_ID.match(value))


def check_id(kind: str, value: str) -> None:
    """``valid_id`` or a ValueError that says what a valid name is."""
    if not valid_id(value):
        raise ValueError(
            f"{kind} name {value!r} is invalid: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )


def wireguard_mtu(underlay_mtu: int) -> int:
    return underlay_mtu - WIREGUARD_OVERHEAD


def overlay_mtu(underlay_mtu: int) -> int:
    return wireguard_mtu(underlay_mtu) - VXLAN_OVERHEAD


def overlay_bridge(vni: int) -> str:
    return _checked(f"otb{vni}")


def vxlan_device(vni: int) -> str:
    return _checked(f"{VXLAN_PREFIX}{vni}")


def bridge_network_bridge(network: str) -> str:
    """Bridge of a ``bridge`` network: ``otn`` + 8 hex digits of the name's SHA-256."""
    return _checked(BRIDGE_NETWORK_PREFIX + hashlib.sha256(network.encode()).hexdigest()[:8])


def tap_name(nic_id: str) -> str:
    if not _NIC_ID.match(nic_id):
        raise ValueError(f"NIC id {nic_id!r} is not 12 to 32 lowercase hex digits")
    return _checked(PREFIX + nic_id[:12])


def is_managed(ifname: str) -> bool:
    return ifname.startswith(PREFIX)


def _checked(name: str) -> str:
    if len(name) > IFNAMSIZ:
        raise ValueError(f"device name {name!r} is longer than {IFNAMSIZ} characters")
    return name


def desired_subject(node: str) -> str:
    return f"{SUBJECT_ROOT}.desired.{node}"


def ack_subject(node: str) -> str:
    return f"{SUBJECT_ROOT}.ack.{node}"


def health_subject(node: str) -> str:
    return f"{SUBJECT_ROOT}.health.{node}"


def api_subject(*parts: str) -> str:
    return ".".join((API_PREFIX, *parts))


def node_api_subject(endpoint: str, node: str) -> str:
    """A node-scoped API call (``otherix.v1.api.node.register.<node>``): the node is the last
    token so nats-server, not the handler, decides who may call it."""
    check_id("node", node)
    return api_subject(endpoint, node)
