"""Hollow intent: a node and thousands of NICs written straight into the intent store.

Building large states through the API costs one request per NIC; chaos and scale tests need
thousands of remote MACs on a real node, as a controller restarted on a large store finds them.
A hollow node has no agent: it is a registered-looking record (underlay address inside the lab's
fabric, where nothing answers, so no traffic leaves the lab) whose NICs become FDB entries on
the real nodes that share their overlay. Owns only those store writes; the controller must be
stopped while they happen and is started again by the caller.
"""

import asyncio
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


async def write_records(nc, records, in_flight: int = 512) -> None:
    """Write ``records`` to the intent bucket (``nc`` may write it) while no controller runs,
    past the controller's fenced ``Store``, which writes only as the lease holder. Puts run
    ``in_flight`` at a time: JetStream acks each one, and one at a time takes minutes."""
    kv = (await Store.open(nc.jetstream())).kv
    for at in range(0, len(records), in_flight):
        await asyncio.gather(
            *(kv.put(entry_key(r), encode(r)) for r in records[at : at + in_flight])
        )


async def write_intent(nc, node: Node, nics: list[Nic]) -> None:
    """A hollow node and its NICs, written as a restarted controller finds them."""
    await write_records(nc, [node, *nics])
