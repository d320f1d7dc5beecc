"""A hollow cluster's intent for the scale bench: N nodes with M NICs each over several overlays,
written straight into the intent store as a restarted controller would find it.

Building it through the API would cost one request per NIC (issue 10 measured about 2 attaches
per second at 1,000 nodes), so the records are made here and written before the controller
starts. Every value is one the API could have allocated: underlay addresses inside
``UNDERLAY_CIDR``, tunnel addresses in the mesh prefix, VNIs from 1000 on, MACs and NIC
addresses unique. Owns only that computation and those store writes; it never runs while a
controller is up on the same bucket.
"""

import ipaddress
import time
import uuid

import msgspec

from schemas.intent import Network, NetworkType, Nic, Node
from tests.chaos.hollow import hollow_node, write_records

UNDERLAY_CIDR = "172.16.0.0/12"  # the hollow nodes' underlay; pass it as --underlay-cidr
MESH_PREFIX = "100.64.0.0/16"  # the controller's default mesh prefix
VM_SPACE = ipaddress.IPv4Network("10.0.0.0/8")  # overlay subnets are carved from here
FIRST_VNI = 1000


class HollowCluster(msgspec.Struct, frozen=True, kw_only=True):
    networks: tuple[Network, ...]
    nodes: tuple[Node, ...]
    nics: tuple[Nic, ...]

    def hosts(self, network: str) -> frozenset[str]:
        """The nodes with a NIC on ``network``: the ones a change on it must reach."""
        return frozenset(n.node for n in self.nics if n.network == network)


def node_name(i: int) -> str:
    return f"h{i:05d}"


def overlay_count(nodes: int) -> int:
    """Several overlays, each spanning a bounded share of the cluster (about 200 nodes at most
    with 4 overlays per node): tenants' networks do not grow with the cluster."""
    return max(10, nodes // 50)


def build(
    nodes: int, nics_per_node: int = 20, overlays: int | None = None, overlays_per_node: int = 4
) -> HollowCluster:
    """Node i hosts ``overlays_per_node`` consecutive overlays (from i mod K on), with its NICs
    spread evenly over them."""
    overlays = overlays or overlay_count(nodes)
    per_node = min(overlays_per_node, overlays, nics_per_node)
    per_network = -(-nodes * nics_per_node // overlays) * 2  # room for the uneven spread
    prefix = 32 - max(per_network + 2, 4).bit_length()
    subnets = VM_SPACE.subnets(new_prefix=prefix)
    now = time.time()
    networks = []
    for k in range(overlays):
        subnet = next(subnets)
        networks.append(
            Network(
                name=f"ov{k:04d}",
                type=NetworkType.OVERLAY,
                subnet=str(subnet),
                gateway=str(subnet.network_address + 1),
                vni=FIRST_VNI + k,
                created_at=now,
            )
        )
    underlay = ipaddress.IPv4Network(UNDERLAY_CIDR).network_address + 256  # past the lab's fabric
    mesh = ipaddress.IPv4Network(MESH_PREFIX).network_address
    node_list, nic_list = [], []
    next_host = [2] * overlays  # host 1 is the gateway
    for i in range(nodes):
        name = node_name(i)
        node_list.append(hollow_node(name, str(underlay + i), str(mesh + 1 + i)))
        for j in range(nics_per_node):
            k = (i + j % per_node) % overlays
            net = networks[k]
            ip = ipaddress.IPv4Network(net.subnet).network_address + next_host[k]
            next_host[k] += 1
            seq = len(nic_list)
            nic_list.append(
                Nic(
                    id=uuid.uuid4().hex,
                    network=net.name,
                    node=name,
                    vm=f"vm{seq}",
                    mac="02:ee:" + ":".join(f"{b:02x}" for b in seq.to_bytes(4, "big")),
                    ip=str(ip),
                    created_at=now,
                )
            )
    return HollowCluster(networks=tuple(networks), nodes=tuple(node_list), nics=tuple(nic_list))


async def write(nc, cluster: HollowCluster) -> float:
    """Write every record before any controller runs; return the seconds it took."""
    started = time.perf_counter()
    await write_records(nc, [*cluster.networks, *cluster.nodes, *cluster.nics])
    return time.perf_counter() - started
