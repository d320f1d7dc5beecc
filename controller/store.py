"""Intent persisted in a NATS JetStream key-value bucket, one JSON entry per object.

Keys: ``network.<name>``, ``nic.<id>``, ``node.<name>``, ``generation.reserved`` (the versions'
high-water mark), ``generation.nodes`` (every node's version, saved now and then) and ``version.<node>`` (written by releases before snapshot schema 3, read
only). The controller keeps the whole intent in memory and writes through; a restart reloads it
with ``load()``. The bucket's
durability comes from the server (JetStream file storage, ``sync_interval: always`` in the
shipped server config) and, on a cluster, from ``replicas=3``: JetStream acknowledges a put only
once a majority of the replicas stored it, so losing any one server loses no acknowledged write.
It never validates or decides: callers write only what passed ``controller.ops``, and the
versions' mark only through ``controller.publisher``.
"""

import json
import logging

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from schemas.codec import decode, encode
from schemas.intent import Generation, Intent, Network, Nic, Node, NodeVersion, NodeVersions

log = logging.getLogger(__name__)

BUCKET = "otherix"
_KINDS: dict[str, type] = {
    "network": Network,
    "nic": Nic,
    "node": Node,
    "version": NodeVersion,
}


class Store:
    def __init__(self, kv: KeyValue):
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str = BUCKET, replicas: int = 1) -> "Store":
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=5,
                    storage=StorageType.FILE,
                    replicas=replicas,
                    description="Otherix networking intent",
                )
            )
        else:
            have = (await kv.status()).stream_info.config.num_replicas or 1
            if have != replicas:  # changing it is an operator's decision (nats stream edit)
                log.warning("store: bucket %s has %d replica(s), not %d", bucket, have, replicas)
        return cls(kv)

    async def load(self) -> tuple[Intent, dict[str, NodeVersion]]:
        objects: dict[str, dict] = {kind: {} for kind in _KINDS}
        for key in await self.keys():
            kind, _, name = key.partition(".")
            if kind == "generation":
                continue  # read by generation()
            if kind not in _KINDS:
                log.warning("store: ignoring unknown key %s", key)
                continue
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # deleted between keys() and get()
            if entry.value is None:
                continue
            try:
                objects[kind][name] = decode(entry.value, _KINDS[kind])
            except msgspec.DecodeError as e:
                log.error("store: entry %s is unreadable and is skipped: %s", key, e)
        intent = Intent(networks=objects["network"], nics=objects["nic"], nodes=objects["node"])
        return intent, objects["version"]

    async def generation(self) -> tuple[int, NodeVersions]:
        """The persisted high-water mark of desired versions (0 if none), and the nodes'
        versions as last saved (none if unreadable: they only spare agents a new version)."""
        reserved, saved = 0, NodeVersions()
        for key in ("generation.reserved", "generation.nodes"):
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value is None:
                continue
            if key == "generation.reserved":
                reserved = decode(entry.value, Generation).reserved
                continue
            try:
                saved = decode(entry.value, NodeVersions)
            except msgspec.DecodeError as e:
                log.warning("store: entry %s is unreadable and is skipped: %s", key, e)
        return reserved, saved

    async def keys(self) -> list[str]:
        """Every key with an entry (deleted ones included; ``get`` skips those).

        Not ``kv.keys()``: in nats-py 2.16 its watcher can signal "no more keys" before the
        ordered consumer's first messages are processed and then returns nothing, which would
        make a restarted controller load an empty intent. Stream info (request/reply) lists the
        subjects deterministically, but the server pages it at 100,000 subjects and nats-py's
        ``stream_info`` cannot ask for the next page: a 5,000-node store (105,100 keys) loaded
        without its nodes. So the pages are requested here, by offset, until ``total``.
        """
        prefix, js = f"$KV.{self.kv._name}.", self.kv._js
        subjects: list[str] = []
        while True:
            request = {"subjects_filter": f"{prefix}>", "offset": len(subjects)}
            reply = await js._api_request(
                f"{js._prefix}.STREAM.INFO.{self.kv._stream}",
                json.dumps(request).encode(),
                timeout=js._timeout,
            )
            page = (reply.get("state") or {}).get("subjects") or {}
            subjects.extend(page)
            if not page or len(subjects) >= reply.get("total", 0):
                break
        return sorted(s[len(prefix) :] for s in subjects)

    async def put(
        self, obj: "Network | Nic | Node | NodeVersion | Generation | NodeVersions"
    ) -> None:
        await self.kv.put(_key(obj), encode(obj))

    async def delete(self, obj: Network | Nic | Node | NodeVersion) -> None:
        await self.kv.delete(_key(obj))


def _key(obj: "Network | Nic | Node | NodeVersion | Generation | NodeVersions") -> str:
    match obj:
        case Network(name=name):
            return f"network.{name}"
        case Nic(id=nic_id):
            return f"nic.{nic_id}"
        case Node(name=name):
            return f"node.{name}"
        case NodeVersion(node=name):
            return f"version.{name}"
        case Generation():
            return "generation.reserved"
        case NodeVersions():
            return "generation.nodes"
    raise TypeError(f"cannot store {type(obj).__name__}")
