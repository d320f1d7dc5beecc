"""Intent persisted in a NATS JetStream key-value bucket, one JSON entry per object.

Keys: ``network.<name>``, ``nic.<id>``, ``node.<name>``, ``generation.reserved`` (the versions'
high-water mark), ``generation.nodes`` (every node's version, saved now and then),
``version.<node>`` (written by releases before snapshot schema 3, read only) and ``leader`` (the
controllers' lease, ``controller.lease``). The leading controller keeps the whole intent in memory
and writes through; a restart or a takeover reloads it with ``load()``; a follower keeps its copy
current with ``follow()``.

Fencing: every write is a JetStream publish with ``Nats-Expected-Last-Sequence`` set to the
stream sequence of this controller's own last write (``fence``), so it lands only if nothing else
was written to the bucket since. Only a lease holder writes, and taking the lease is itself a
write: once a follower has taken over, every write of the deposed leader fails (``NotLeader``),
whatever it believes. ``fence`` is set by taking or renewing the lease and cleared when a write
fails or its outcome is unknown. The bucket's
durability comes from the server (JetStream file storage, ``sync_interval: always`` in the
shipped server config) and, on a cluster, from ``replicas=3``: JetStream acknowledges a put only
once a majority of the replicas stored it, so losing any one server loses no acknowledged write.
It never validates or decides: callers write only what passed ``controller.ops``, and the
versions' mark only through ``controller.publisher``.
"""

import asyncio
import json
import logging
from collections.abc import Callable

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from schemas.codec import decode, encode
from schemas.intent import Generation, Intent, Network, Nic, Node, NodeVersion, NodeVersions

log = logging.getLogger(__name__)

BUCKET = "otherix"
LEASE_KEY = "leader"
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes


class NotLeader(Exception):
    """A write was refused because this controller does not hold the lease (any more)."""


_KINDS: dict[str, type] = {
    "network": Network,
    "nic": Nic,
    "node": Node,
    "version": NodeVersion,
}


class Store:
    def __init__(self, kv: KeyValue):
        self.kv = kv
        self.fence: int | None = None  # stream sequence of our last write; None: we may not write
        self._writing = asyncio.Lock()  # one write at a time: each expects the previous one's seq

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
            if kind == "generation" or key == LEASE_KEY:
                continue  # read by generation() and controller.lease
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
        await self._fenced(entry_key(obj), encode(obj))

    async def delete(self, obj: Network | Nic | Node | NodeVersion) -> None:
        await self._fenced(entry_key(obj), b"", {"KV-Operation": "DEL"})

    async def _publish(self, key: str, value: bytes, headers: dict[str, str]) -> int | None:
        """The stream sequence of the write, or None if an expected sequence did not match."""
        try:
            ack = await self.kv._js.publish(f"$KV.{self.kv._name}.{key}", value, headers=headers)
        except nats.js.errors.APIError as e:
            if e.err_code in WRONG_LAST_SEQUENCE:
                return None
            raise
        return ack.seq

    async def _fenced(self, key: str, value: bytes, headers: dict[str, str] | None = None) -> None:
        async with self._writing:
            if self.fence is None:
                raise NotLeader(f"no lease held: {key} not written")
            expect = {"Nats-Expected-Last-Sequence": str(self.fence)}
            self.fence, fence = None, self.fence  # unknown until the ack says otherwise
            seq = await self._publish(key, value, {**(headers or {}), **expect})
            if seq is None:
                raise NotLeader(
                    f"the bucket moved past our last write ({fence}): {key} not written"
                )
            self.fence = seq

    # --- the lease (decisions in controller.lease) ----------------------------------------------

    async def lease(self) -> tuple[int, bytes] | None:
        """The lease entry's (revision, value), None if there is none (or it was released)."""
        try:
            entry = await self.kv.get(LEASE_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return None if entry.value is None else (entry.revision, entry.value)

    async def take_lease(self, value: bytes, revision: int) -> int | None:
        """Write the lease if its last revision is still ``revision`` (0: if there is none);
        the new revision, or None if someone else wrote first."""
        async with self._writing:
            if revision == 0:
                revision = await self._last_revision(LEASE_KEY)  # a released lease's tombstone
            seq = await self._publish(
                LEASE_KEY, value, {"Nats-Expected-Last-Subject-Sequence": str(revision)}
            )
            self.fence = seq
            return seq

    async def renew_lease(self, value: bytes, revision: int) -> int | None:
        """Rewrite our lease entry if it is still at ``revision``; None if it is not ours."""
        async with self._writing:
            # unknown until the ack says otherwise: a renewal that fails or is cancelled (a
            # stop) may still have landed, and our next write must not expect the sequence before
            self.fence = None
            seq = await self._publish(
                LEASE_KEY, value, {"Nats-Expected-Last-Subject-Sequence": str(revision)}
            )
            if seq is None:
                current = await self.lease()  # our own renewal whose ack was lost?
                seq = current[0] if current and current[1] == value else None
            self.fence = seq
            return seq

    async def release_lease(self, revision: int) -> None:
        async with self._writing:
            headers = {"KV-Operation": "DEL", "Nats-Expected-Last-Subject-Sequence": str(revision)}
            self.fence = None
            await self._publish(LEASE_KEY, b"", headers)

    async def _last_revision(self, key: str) -> int:
        try:
            msg = await self.kv._js.get_last_msg(self.kv._stream, f"$KV.{self.kv._name}.{key}")
        except nats.js.errors.NotFoundError:
            return 0
        return msg.seq

    # --- a follower's copy ----------------------------------------------------------------------

    async def follow(self, intent: Intent, on_entry: Callable[[str, bytes | None], None]) -> None:
        """Keep ``intent`` equal to the bucket (until cancelled), then tell ``on_entry`` of each
        entry (key, value or None when deleted). ``followed`` is the stream sequence applied
        last."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                value = None if entry.operation in ("DEL", "PURGE") else entry.value
                kind, _, name = entry.key.partition(".")
                table = {"network": intent.networks, "nic": intent.nics, "node": intent.nodes}
                if kind in table:
                    if value is None:
                        table[kind].pop(name, None)
                    else:
                        try:
                            table[kind][name] = decode(value, _KINDS[kind])
                        except msgspec.DecodeError as e:
                            log.error(
                                "store: entry %s is unreadable and is skipped: %s", entry.key, e
                            )
                self.followed = entry.revision
                on_entry(entry.key, value)
        finally:
            await watcher.stop()

    followed = 0

    async def last_sequence(self) -> int:
        """The bucket's last stream sequence (one request)."""
        info = await self.kv._js.stream_info(self.kv._stream)
        return info.state.last_seq


def entry_key(obj: "Network | Nic | Node | NodeVersion | Generation | NodeVersions") -> str:
    """The bucket key of ``obj`` (also for tests and benches that fill a bucket while no
    controller runs: their writes go past ``Store``, which fences every write to the lease)."""
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
