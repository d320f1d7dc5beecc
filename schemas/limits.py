"""Documented limits on what a node accepts, and the IPv4 ranges no VM network may use.

Shared by the agent's snapshot gate (``agent.validate``) and the controller's API
(``controller.ops``), so both refuse the same things with the same words. The caps are well above
what a real node carries and far below what would hurt it: the issue that asked for them saw one
902 KB snapshot with 50,000 NAT subnets load 150,007 nft rules and leave every ``nft -j list``
timing out. Data only; no I/O.
"""

import ipaddress

# Raw bytes of one message (a HEAD or a section page), checked before decoding: nats-server's
# default max_payload, so no legitimate message is larger (sections are paged below it).
MAX_SNAPSHOT_BYTES = 1024 * 1024
# Networks with a NIC on one node: each is one bridge (and one VXLAN or NAT subnet).
MAX_BRIDGES = 1024
# NICs on one node: a dense hypervisor runs a few hundred VMs; each tap is a handful of rules.
MAX_TAPS = 4096
# Overlay networks on one node (one VXLAN each), at most one per bridge.
MAX_VXLANS = MAX_BRIDGES
# One VXLAN's FDB: every remote NIC of that network plus one flood entry per remote node
# (issue 10: a node hosting networks with 50,000 entries in total gets them all).
MAX_FDB_PER_VXLAN = 65536
# All FDB entries of a node: each one is a netlink write when it changes.
MAX_FDB_TOTAL = 65536
# Masqueraded subnets: one per NAT network on the node, at most one per bridge.
MAX_NAT_SUBNETS = MAX_BRIDGES
# WireGuard peers: every other node of the mesh (issue 10 asks for 5,000 nodes).
MAX_PEERS = 8192
# The controller gives each peer its tunnel /32; a few more leave room, never a routing table.
MAX_ALLOWED_IPS_PER_PEER = 16
# The mesh prefix plus the underlay CIDRs of the controller's --underlay-cidr.
MAX_INFRASTRUCTURE = 64

# Special-purpose IPv4 ranges (RFC 6890) a VM network, gateway, NAT subnet or NIC address may
# never overlap, each with the words an error message names it by.
SPECIAL_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(cidr), words)
    for cidr, words in (
        ("0.0.0.0/8", "the 'this network' range 0.0.0.0/8"),
        ("127.0.0.0/8", "the loopback range 127.0.0.0/8"),
        ("169.254.0.0/16", "the link-local range 169.254.0.0/16"),
        ("224.0.0.0/4", "the multicast range 224.0.0.0/4"),
        ("240.0.0.0/4", "the reserved range 240.0.0.0/4 (with the broadcast address)"),
    )
)


def special_range(net: ipaddress.IPv4Network) -> str | None:
    """The words for the first special-purpose range ``net`` overlaps, else None."""
    for special, words in SPECIAL_RANGES:
        if net.overlaps(special):
            return words
    return None
