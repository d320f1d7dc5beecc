"""The per-node desired-state snapshot: the complete state an agent validates and applies.

Snapshots are frozen Structs with value equality, so "nothing changed" is ``==``. They are decoded
without ``forbid_unknown_fields`` so that an older agent survives a newer controller during a
rolling upgrade; an unknown *schema version* is still refused.
"""

import msgspec

from schemas import Version

# Snapshots have their own schema version (API requests keep schemas.SCHEMA_VERSION): 2 carries
# each tap's address and port-security flag and the infrastructure prefixes, and no longer lets
# the controller choose the VXLAN guard's interface. An agent refuses any other version, so a
# mixed old/new cluster keeps its last good state instead of misapplying. 3: the snapshot no
# longer travels whole; a HEAD names versioned sections (``schemas.wire``) and the agent assembles
# this Snapshot from them, as the input of its validation gate and appliers.
SNAPSHOT_SCHEMA = 3


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
    mac: str = ""  # the guest's MAC: the only source MAC port security lets out of the tap
    ip: str = ""  # the guest's IPv4 address: the only source address port security lets out
    port_security: bool = True  # off only for appliances that must send as others


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
    # Prefixes no network may overlap and no VM may reach: the mesh prefix and the underlay.
    infrastructure: tuple[str, ...] = ()
    digest: str = ""  # of everything above but version/digest; set by the controller
    published_at: float = 0.0
    schema: int = SNAPSHOT_SCHEMA
