"""Hollow intent: a node and thousands of NICs written straight into the intent store.

Building large states through the API costs one request per NIC; chaos and scale tests need
thousands of remote MACs on a real node, as a controller restarted on a large store finds them.
A hollow node has no agent: it is a registered-looking record (underlay address inside the lab's
fabric, where nothing answers, so no traffic leaves the lab) whose NICs become FDB entries on
the real nodes that share their overlay. Owns only those store writes; the controller must be
stopped while they happen and is started again by the caller.
"""

import base64
import ipaddress
import time
import uuid

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from controller.store import Store, entry_key
from schemas.codec import encode
from schemas.intent import Nic, Node


def _public_key() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def hollow_node(name: str, underlay_ip: str, tunnel_ip: str) -> Node:
    return Node(
        name=name,
        underlay_ip=underlay_ip,
        wg_public_key=_public_key(),
        wg_listen_port=51820,
        tunnel_ip=tunnel_ip,
        registered_at=time.time(),
    )


def hollow_nics(
    network: str, subnet: str, node: str, count: int, first_host: int = 100
) -> list[Nic]:
    """``count`` NICs with addresses from the ``first_host``-th host of ``subnet`` on; MACs
    ``02:ee:…`` so they never collide with the controller's own allocations."""
    hosts = list(ipaddress.ip_network(subnet).hosts())[first_host : first_host + count]
    if len(hosts) < count:
        raise ValueError(f"{subnet} has no room for {count} hollow NICs from host {first_host}")
    return [
        Nic(
            id=uuid.uuid4().hex,
            network=network,
            node=node,
            vm=f"hollow-{i}",
            mac="02:ee:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big")),
            ip=str(ip),
            created_at=time.time(),
        )
        for i, ip in enumerate(hosts)
    ]


async def write_intent(nc, node: Node, nics: list[Nic]) -> None:
    """Write ``node`` and ``nics`` to the store (``nc`` connected as the controller), past the
    controller's fenced ``Store``: no controller runs, so none holds the lease."""
    store = await Store.open(nc.jetstream())
    await store.kv.put(entry_key(node), encode(node))
    for nic in nics:
        await store.kv.put(entry_key(nic), encode(nic))
