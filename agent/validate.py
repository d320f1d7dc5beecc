"""Pure: decide whether a received snapshot may be applied at all.

A snapshot that is malformed, speaks another schema version, is addressed to another node, is
older than what this node has applied, or names devices outside the ``ot`` namespace is refused
before anything touches the kernel.
"""

import ipaddress
import re

import msgspec

from agent.errors import AgentError
from schemas import naming
from schemas.codec import decode
from schemas.desired import SNAPSHOT_SCHEMA, Snapshot

MIN_MTU, MAX_MTU = 576, 65535
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class Rejected(AgentError):
    """The snapshot is refused; the message says why (it is acked to the controller)."""

    def __init__(self, reason: str, version: int = 0):
        super().__init__(reason)
        self.version = version


def accept(raw: bytes, node: str, applied_version: int) -> Snapshot:
    try:
        schema = msgspec.json.decode(raw, type=_SchemaOnly).schema
    except msgspec.DecodeError as e:
        raise Rejected(f"malformed snapshot: {e}") from None
    if schema != SNAPSHOT_SCHEMA:
        raise Rejected(
            f"snapshot schema {schema} is not supported (this agent speaks {SNAPSHOT_SCHEMA})"
        )
    try:
        snap = decode(raw, Snapshot)
    except msgspec.DecodeError as e:
        raise Rejected(f"malformed snapshot: {e}") from None
    if snap.node != node:
        raise Rejected(f"snapshot is for node {snap.node!r}, this is {node!r}", snap.version)
    if snap.version < applied_version:
        raise Rejected(
            f"stale snapshot: version {snap.version} is older than applied version {applied_version}",
            snap.version,
        )
    try:
        check_content(snap)
    except ValueError as e:
        raise Rejected(f"invalid snapshot version {snap.version}: {e}", snap.version) from None
    return snap


class _SchemaOnly(msgspec.Struct):
    schema: int = SNAPSHOT_SCHEMA


def check_content(snap: Snapshot) -> None:
    """Names, MTUs and addresses must be ones the agent is allowed and able to program."""
    names: set[str] = set()
    bridges = {b.name for b in snap.bridges}
    devices = [(b.name, b.mtu) for b in snap.bridges] + [(t.name, t.mtu) for t in snap.taps]
    devices += [(v.name, v.mtu) for v in snap.vxlans]
    if snap.wireguard:
        devices.append((snap.wireguard.name, snap.wireguard.mtu))
    for name, mtu in devices:
        if not naming.is_managed(name) or len(name) > naming.IFNAMSIZ or not name.isalnum():
            raise ValueError(f"device name {name!r} is not an Otherix device name")
        if name in names:
            raise ValueError(f"device {name} appears twice")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"device {name}: MTU {mtu} out of range {MIN_MTU}..{MAX_MTU}")
        names.add(name)
    for port in (*snap.taps, *snap.vxlans):
        if port.bridge not in bridges:
            raise ValueError(
                f"{port.name} is attached to bridge {port.bridge}, which the snapshot does not define"
            )
    for b in snap.bridges:
        if b.address is not None:
            ipaddress.IPv4Interface(b.address)
    for subnet in snap.nat_subnets:
        ipaddress.IPv4Network(subnet)
    for v in snap.vxlans:
        ipaddress.IPv4Address(v.local)
        if not naming.VNI_MIN <= v.vni <= naming.VNI_MAX:
            raise ValueError(f"{v.name}: VNI {v.vni} out of range")
        for entry in v.fdb:
            ipaddress.IPv4Address(entry.dst)
            if not _MAC.match(entry.mac):
                raise ValueError(f"{v.name}: FDB MAC {entry.mac!r} is not like 02:00:00:00:00:01")
    if snap.wireguard:
        ipaddress.IPv4Interface(snap.wireguard.address)
        for peer in snap.wireguard.peers:
            for allowed in peer.allowed_ips:
                ipaddress.IPv4Network(allowed)
