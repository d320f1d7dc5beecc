"""Invariants of a chaos run, checked on every recorded event, not only at the end.

- ``History`` records what the controller published for each node (version, digest) and every
  ack an agent sent, as the fault proxy saw them leave their sender (``History.observe`` is a
  ``lab.natsfault`` observer, called before any fault is applied), or fed directly through
  ``published``/``acked``. Each event is checked at once: a snapshot names the node of its
  subject; the versions the controller publishes for a node never go down; a node's applied
  version never goes down; every ack names a version published for that node (or the one the
  node started with); an ok ack carries the digest published with its version.
  ``wait_converged`` then bounds, in heartbeats, how long the nodes take to ack the latest
  version after faults stop; ``wait_acked_mac`` finds the moment a node acked the first version
  that carried a NIC (by MAC: the tap in the node section attached to the change's HEAD, or in
  a node section a ``section.get`` reply carried, as the first HEAD version naming that
  section), for "reachable within one heartbeat of its ack". The desired subject carries HEADs (``schemas.wire``): node, version
  and digest are all History reads of them.
- ``DeliveryOrder``: a delivery observer (``FaultProxy.observe_delivered``) counting snapshots
  that reached an agent after a newer one had (reordering really happened).
- ``IntentLedger``: API writes the controller acknowledged; ``verify`` names any the controller's
  intent lost (after kills and restarts); objects whose last write has an unknown outcome (it
  timed out: the controller may or may not have made it) are not judged.
- ``PingProbe``: a background ``ping -i 0.1`` from a VM namespace, for the share of the data
  path lost while the control plane is degraded.

This module only records and judges; it never publishes, drops or changes anything on the bus
or in a kernel.
"""

import asyncio
import contextlib
import math
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import msgspec

from schemas import naming
from schemas.codec import decode
from schemas.messages import Ack
from schemas.wire import NODE_SECTION, section_vni

_DESIRED = naming.desired_subject("")  # "otherix.v1.desired." + node
_ACK = naming.ack_subject("")
_SECTION_GET = naming.api_subject("section.get", "")  # + node; the reply goes to its inbox
_FETCHES_KEPT = 4096  # section.get requests awaiting their reply (unanswered ones age out)


class _ItemHead(msgspec.Struct, kw_only=True):
    type: str = ""  # the item's tag (``schemas.wire``): "tap" for a tap
    mac: str = ""


class _SectionHead(msgspec.Struct, kw_only=True):
    name: str = ""
    version: int = 0
    upserts: tuple[_ItemHead, ...] = ()

    def tap_macs(self) -> list[str]:
        """The MACs a node is told about here: its own taps, and the NICs of its VNIs (FDB
        entries), so a node's first version that can reach a NIC is known for either end."""
        kind = "tap" if self.name == NODE_SECTION else "fdb" if section_vni(self.name) else None
        return [item.mac for item in self.upserts if item.type == kind and item.mac]


class _Head(msgspec.Struct, kw_only=True):
    """What History needs of a HEAD (``schemas.wire.Head``): the rest is skipped cheaply."""

    node: str = ""
    version: int
    digest: str = ""
    refs: tuple[tuple[str, int, str], ...] = ()  # [section, version, digest]
    sections: tuple[_SectionHead, ...] = ()  # attached once, in the HEAD of the change

    def tap_macs(self) -> list[str]:
        return [mac for section in self.sections for mac in section.tap_macs()]

    def node_section(self) -> int | None:
        return next((version for name, version, _ in self.refs if name == NODE_SECTION), None)


@dataclass(frozen=True)
class Violation:
    invariant: str  # "monotonic", "published", "digest", "converged", "decode", "subject"
    message: str
    event: object  # the ack, publication or proxy frame that broke it


@dataclass
class History:
    """Per node: versions published (version → digest), acks in the order they were sent.

    ``start``: node → the applied version the node had before recording began (acks may name
    it although this history never saw it published). Thread-safe: a proxy may call ``observe``
    from its own thread."""

    start: dict[str, int] = field(default_factory=dict)
    publications: dict[str, dict[int, str]] = field(default_factory=dict)
    latest: dict[str, tuple[int, str]] = field(default_factory=dict)
    acks: dict[str, list[Ack]] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    checks: int = 0
    first_with_mac: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, MAC) → v
    _last_published: dict[str, int] = field(default_factory=dict)
    _applied: dict[str, int] = field(default_factory=dict)  # highest applied version acked
    # (node, version of its node section) → the first HEAD version naming it
    _named: dict[tuple[str, int], int] = field(default_factory=dict)
    _fetches: dict[str, str] = field(default_factory=dict)  # reply inbox → node
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- recording ---------------------------------------------------------------------------

    def observe(self, event) -> None:
        """A fault proxy's FrameEvent (``identity, direction, op, subject, reply, payload,
        fate``): keeps the controller's snapshots and the agents' acks as they were sent."""
        if event.direction != "to_server" or event.op not in ("PUB", "HPUB"):
            return
        subject = event.subject
        if subject.startswith(_DESIRED):
            node = subject[len(_DESIRED) :]
            try:
                head = decode(_body(event.payload), _Head)
            except msgspec.MsgspecError as e:
                self._violate(
                    "decode", f"{node}: snapshot on {subject} does not decode: {e}", event
                )
                return
            with self._lock:
                self.checks += 1
                if head.node != node:
                    self._violate("subject", f"snapshot for node {head.node!r} on {subject}", event)
                if (section := head.node_section()) is not None:
                    self._named.setdefault((node, section), head.version)
            self.published(node, head.version, head.digest, head.tap_macs())
        elif subject.startswith(_ACK):
            node = subject[len(_ACK) :]
            try:
                ack = decode(_body(event.payload), Ack)
            except msgspec.MsgspecError as e:
                self._violate("decode", f"{node}: ack on {subject} does not decode: {e}", event)
                return
            self.acked(node, ack)
        elif subject.startswith(_SECTION_GET) and event.reply:
            with self._lock:
                self._fetches[event.reply] = subject[len(_SECTION_GET) :]
                while len(self._fetches) > _FETCHES_KEPT:
                    del self._fetches[next(iter(self._fetches))]
        else:
            self._fetched(event)

    def _fetched(self, event) -> None:
        """A section.get reply: a tap in a node section fetched rather than attached to a HEAD
        (the change's HEAD lost with a controller killed before sending it, or too large)."""
        with self._lock:
            node = self._fetches.pop(event.subject, None)
        if node is None:
            return
        try:
            data = decode(_body(event.payload), _SectionHead)
        except msgspec.MsgspecError:
            return  # an error reply
        if macs := data.tap_macs():
            with self._lock:
                version = self._named.get((node, data.version), data.version)
                for mac in macs:
                    self.first_with_mac.setdefault((node, mac), version)

    def published(self, node: str, version: int, digest: str, macs=()) -> None:
        with self._lock:
            seen = self.publications.setdefault(node, {})
            self.checks += 1
            last = self._last_published.get(node, -1)
            if version < last:
                self._violate(
                    "monotonic",
                    f"{node}: published version {version} after {last}",
                    (node, version, digest),
                )
            self._last_published[node] = max(last, version)
            for mac in macs:
                self.first_with_mac.setdefault((node, mac), version)
            self.checks += 1
            if seen.get(version, digest) != digest:  # a version names one content, always
                self._violate(
                    "published",
                    f"{node}: version {version} published with digest {digest}, "
                    f"earlier with {seen[version]}",
                    (node, version, digest),
                )
            seen[version] = digest
            if version >= self.latest.get(node, (-1, ""))[0]:
                self.latest[node] = (version, digest)

    def acked(self, node: str, ack: Ack) -> None:
        with self._lock:
            self.acks.setdefault(node, []).append(ack)
            seen = self.publications.get(node, {})
            known = seen.keys() | {self.start.get(node, 0), 0}

            self.checks += 1
            before = self._applied.get(node, self.start.get(node, 0))
            if ack.applied_version < before:
                self._violate(
                    "monotonic",
                    f"{node}: applied version went down from {before} to {ack.applied_version}",
                    ack,
                )
            self._applied[node] = max(before, ack.applied_version)

            self.checks += 1
            for what, version in (
                ("version", ack.version),
                ("applied_version", ack.applied_version),
            ):
                if version not in known:
                    self._violate(
                        "published",
                        f"{node}: ack {what} {version} was never published for {node} "
                        f"(published: {_span(seen)})",
                        ack,
                    )

            self.checks += 1
            if ack.ok and ack.version in seen and ack.digest != seen[ack.version]:
                self._violate(
                    "digest",
                    f"{node}: ack of version {ack.version} has digest {ack.digest!r}, "
                    f"published {seen[ack.version]!r}",
                    ack,
                )

    def _violate(self, invariant: str, message: str, event) -> None:
        self.violations.append(Violation(invariant, message, event))

    # --- judging -----------------------------------------------------------------------------

    def converged(self, node: str) -> bool:
        """The node's last ack applied the latest version published for it, with its digest."""
        with self._lock:
            latest = self.latest.get(node)
            acks = self.acks.get(node)
            if latest is None or not acks:
                return False
            last = acks[-1]
            return last.ok and (last.applied_version, last.digest) == latest

    async def wait_converged(
        self, nodes, within_heartbeats: int, heartbeat: float, poll: float = 0.02
    ) -> int:
        """Call once faults have stopped: every node in ``nodes`` acks the latest version
        published for it, with its digest, within ``within_heartbeats`` heartbeats. Returns the
        heartbeats it took (rounded up; 0 if already there); records a violation and raises
        AssertionError if not."""
        started = time.monotonic()
        deadline = started + within_heartbeats * heartbeat
        pending = set(nodes)
        polls = 0
        while True:
            pending = {n for n in pending if not self.converged(n)}
            if not pending:
                with self._lock:
                    self.checks += len(set(nodes))
                return 0 if not polls else math.ceil((time.monotonic() - started) / heartbeat)
            polls += 1
            if time.monotonic() > deadline:
                detail = "; ".join(
                    f"{n}: latest published {self.latest.get(n)}, last ack "
                    f"{_ack_text(self.acks.get(n, [None])[-1])}"
                    for n in sorted(pending)
                )
                with self._lock:
                    self.checks += len(set(nodes))
                    self._violate(
                        "converged",
                        f"not converged within {within_heartbeats} heartbeats: {detail}",
                        sorted(pending),
                    )
                raise AssertionError(self.violations[-1].message)
            await asyncio.sleep(poll)

    async def wait_acked_mac(self, node: str, mac: str, timeout: float, poll: float = 0.005):
        """The first ok ack of ``node`` applying a version at or past the first published for
        it with a tap of ``mac``, as soon as it is recorded (polled every ``poll`` s)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._lock:
                wanted = self.first_with_mac.get((node, mac))
                acks = self.acks.get(node, [])
                fresh, seen = acks[seen:], len(acks)
            for ack in fresh if wanted is not None else ():
                if ack.ok and ack.applied_version >= wanted:
                    return ack
            if wanted is None:
                seen = 0  # not published yet: every ack so far is older
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{node}: no ack of the version carrying {mac} (first: {wanted}) within "
                    f"{timeout}s; last ack {_ack_text(acks[-1] if acks else None)}"
                )
            await asyncio.sleep(poll)

    def assert_ok(self) -> None:
        if self.violations:
            lines = [f"[{v.invariant}] {v.message}" for v in self.violations[:20]]
            more = len(self.violations) - len(lines)
            raise AssertionError(
                f"{len(self.violations)} invariant violation(s) in {self.checks} checks:\n"
                + "\n".join(lines)
                + (f"\n… and {more} more" if more > 0 else "")
            )


def _body(payload: bytes) -> bytes:
    """An HPUB/HMSG payload may still carry its header block ("NATS/1.0 …\\r\\n\\r\\n")."""
    if payload.startswith(b"NATS/"):
        _, _, body = payload.partition(b"\r\n\r\n")
        return body
    return payload


def _span(versions: dict[int, str]) -> str:
    if not versions:
        return "none"
    return f"{len(versions)} version(s), {min(versions)}..{max(versions)}"


def _ack_text(ack: Ack | None) -> str:
    if ack is None:
        return "none"
    return f"version {ack.version} applied {ack.applied_version} ok {ack.ok} digest {ack.digest}"


@dataclass
class DeliveryOrder:
    """Per node, the versions of the snapshots the proxy delivered to its agent, in delivery
    order; ``late`` counts those that arrived after a newer one (reordering that happened)."""

    delivered: dict[str, list[int]] = field(default_factory=dict)
    late: int = 0

    def observe(self, event) -> None:
        if event.direction != "to_client" or not event.subject.startswith(_DESIRED):
            return
        with contextlib.suppress(msgspec.MsgspecError):
            version = decode(_body(event.payload), _Head).version
            versions = self.delivered.setdefault(event.subject[len(_DESIRED) :], [])
            if versions and version < max(versions):
                self.late += 1
            versions.append(version)


# --- acknowledged intent -------------------------------------------------------------------------


@dataclass
class IntentLedger:
    """API writes the controller acknowledged (it answered with success), in order. Only the
    final effect per object counts: a network created then deleted must be absent. Call
    ``unknown(id)`` before a write that may time out (a NIC id or network name); the write's
    own record, once acknowledged, makes the outcome known again."""

    networks: dict[str, bool] = field(default_factory=dict)  # name → exists
    nics: dict[str, tuple[str, str, bool]] = field(
        default_factory=dict
    )  # id → network, node, attached
    writes: int = 0
    uncertain: set[str] = field(default_factory=set)  # last write's outcome unknown

    def unknown(self, key: str) -> None:
        self.uncertain.add(key)

    def network_created(self, name: str) -> None:
        self.networks[name] = True
        self._known(name)

    def network_deleted(self, name: str) -> None:
        self.networks[name] = False
        self._known(name)

    def nic_attached(self, nic_id: str, network: str, node: str) -> None:
        self.nics[nic_id] = (network, node, True)
        self._known(nic_id)

    def nic_detached(self, nic_id: str) -> None:
        network, node, _ = self.nics.get(nic_id, ("", "", True))
        self.nics[nic_id] = (network, node, False)
        self._known(nic_id)

    def _known(self, key: str) -> None:
        self.uncertain.discard(key)
        self.writes += 1

    async def verify(self, api) -> list[str]:
        """Each acknowledged write the controller's intent no longer reflects, one line each."""
        networks = {i.network.name for i in await api.network_list()}
        nics = {i.nic.id: i.nic for i in await api.nic_list()}
        lost = []
        for name, exists in sorted(self.networks.items()):
            if name in self.uncertain:
                continue
            if exists and name not in networks:
                lost.append(f"network {name}: creation acknowledged, missing from intent")
            elif not exists and name in networks:
                lost.append(f"network {name}: deletion acknowledged, still in intent")
        for nic_id, (network, node, attached) in sorted(self.nics.items()):
            nic = nics.get(nic_id)
            if nic_id in self.uncertain:
                continue
            if attached and nic is None:
                lost.append(f"nic {nic_id} ({network}, {node}): attach acknowledged, missing")
            elif attached and (nic.network, nic.node) != (network, node):
                lost.append(
                    f"nic {nic_id}: attached to {network} on {node}, intent says "
                    f"{nic.network} on {nic.node}"
                )
            elif not attached and nic is not None:
                lost.append(f"nic {nic_id}: detach acknowledged, still attached")
        return lost


# --- data-path probe -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def loss(self) -> float:
        """Share of echo requests without a reply (0.0 … 1.0); 1.0 if none was sent."""
        return 1.0 if not self.sent else self.lost / self.sent


_SUMMARY = re.compile(rb"(\d+) packets transmitted, (\d+) (?:packets )?received")


class PingProbe:
    """``ping -i 0.1`` from namespace ``netns`` to ``dst`` until ``stop``; ``async with`` works.

    The namespace must be the lab's (a VM's); nothing is sent outside it but what the VM sends."""

    def __init__(self, netns: str, dst: str, interval: float = 0.1, wait: float = 1.0):
        self.argv = ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-i", str(interval),
                     "-W", str(wait), dst]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self.result: PingResult | None = None

    async def start(self) -> "PingProbe":
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        return self

    async def stop(self, timeout: float = 5.0) -> PingResult:
        """SIGINT makes ping print its summary; a reply still in flight counts as lost."""
        if self.result is not None:
            return self.result
        proc = self.proc
        if proc is None:
            raise RuntimeError("PingProbe.stop before start")
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{' '.join(self.argv)} did not stop within {timeout}s") from None
        match = _SUMMARY.search(out)
        if match is None:
            raise AssertionError(f"{' '.join(self.argv)}: no summary: {out!r} {err!r}")
        self.result = PingResult(int(match[1]), int(match[2]))
        return self.result

    async def __aenter__(self) -> "PingProbe":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        if self.proc is not None and self.result is None:
            try:
                await self.stop()
            except AssertionError:
                if exc[0] is None:
                    raise
