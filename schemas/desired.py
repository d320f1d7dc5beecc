"""The per-node desired-state snapshot the controller publishes on every heartbeat.

Snapshots are frozen Structs with value equality, so "nothing changed" is ``==``. They are decoded
without ``forbid_unknown_fields`` so that an older agent survives a newer controller during a
rolling upgrade; an unknown *schema version* is still refused.
"""

import msgspec

from schemas import SCHEMA_VERSION, Version


class Bridge(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    mtu: int
    address: str | None = None  # gateway as "ip/prefixlen", set for NAT bridge networks
    network: str = ""  # for logs and status only


class Tap(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    bridge: str
    mtu: int
    nic: str = ""  # NIC id, for logs
    mac: str = ""  # the guest's MAC (for FDB and logs); the tap keeps its own address


class FdbEntry(msgspec.Struct, frozen=True, kw_only=True, order=True):
    mac: str  # "00:00:00:00:00:00" is a flood (BUM) entry
    dst: str  # tunnel address of the remote node


class Vxlan(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    vni: int
    bridge: str
    local: str  # this node's tunnel address
    mtu: int
    port: int = 4789
    fdb: tuple[FdbEntry, ...] = ()


class WgPeer(msgspec.Struct, frozen=True, kw_only=True, order=True):
    public_key: str
    endpoint: str  # "ip:port"
    allowed_ips: tuple[str, ...]
    node: str = ""


class WireGuard(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    address: str  # tunnel address as "ip/prefixlen"
    listen_port: int
    mtu: int
    peers: tuple[WgPeer, ...] = ()


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    version: Version
    underlay_mtu: int = 1500
    bridges: tuple[Bridge, ...] = ()
    taps: tuple[Tap, ...] = ()
    nat_subnets: tuple[str, ...] = ()  # masquerade these to destinations outside them
    vxlans: tuple[Vxlan, ...] = ()
    wireguard: WireGuard | None = None
    # Drop VXLAN (UDP vxlan_port) that does not arrive through the mesh; set when vxlans exist.
    vxlan_only_via: str | None = None
    digest: str = ""  # of everything above but version/digest; set by the controller
    published_at: float = 0.0
    schema: int = SCHEMA_VERSION
