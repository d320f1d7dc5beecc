"""Gratuitous ARP for the NICs this node hosts, sent by the agent on each NIC's behalf.

When an address comes back with a new MAC (an operator asked for it, or the pool was full), VMs
that talked to the old NIC still hold the old MAC and would lose their first packets until their
ARP entry times out. So after an apply, every NIC that is new on this node, or whose MAC for its
address changed, is announced: an ARP request with sender IP = target IP = the NIC's address and
sender MAC = the NIC's MAC, broadcast, written into the NIC's bridge from the node (an
``AF_PACKET`` socket on the bridge device). The bridge floods it to its taps and through the
VXLAN flood list to the other nodes; Linux replaces an existing neighbour entry on such a frame.
It is sent a few times over about one heartbeat, since a lost frame is not fatal but costly.
What was announced is kept in the state directory, so a restarted agent announces only what
changed while it was down, not every NIC it hosts (a rolling upgrade would be an ARP storm,
each frame copied to every node of the flood list).

``plan`` (which NICs to announce) and ``garp_frame`` are pure; ``Announcer`` only sends. It never
learns anything from the wire and never writes anything but these frames.
"""

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from schemas.desired import Tap

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
REPEATS = 4  # sends per announcement, spread over one heartbeat


class Announcement(msgspec.Struct, frozen=True, order=True):
    bridge: str
    ip: str
    mac: str


Known = dict[tuple[str, str], str]  # (bridge, ip) → MAC last announced
KNOWN_FILE = "announced.json"


def plan(known: Known, taps: Iterable[Tap]) -> tuple[list[Announcement], Known]:
    """The NICs to announce (new here, or a new MAC for an address) and the new ``known``;
    a NIC that went is forgotten, so one that comes back is announced again."""
    now: Known = {(t.bridge, t.ip): t.mac for t in taps if t.ip and t.mac}
    due = sorted(
        Announcement(b, ip, mac) for (b, ip), mac in now.items() if known.get((b, ip)) != mac
    )
    return due, now


def garp_frame(mac: str, ip: str) -> bytes:
    """Ethernet broadcast + ARP request (RFC 5227 announcement): sender = target = ``ip``."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = ipaddress.IPv4Address(ip).packed
    ethernet = BROADCAST + hw + ETH_P_ARP.to_bytes(2, "big")
    arp = bytes.fromhex("0001080006040001") + hw + addr + b"\x00" * 6 + addr
    return ethernet + arp


def send_frame(bridge: str, frame: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((bridge, 0))
        s.send(frame)


class Announcer:
    def __init__(
        self,
        node: str,
        send: Callable[[str, bytes], None] = send_frame,
        state_dir: Path | None = None,
    ):
        self.node, self.send = node, send
        self.path = state_dir / KNOWN_FILE if state_dir is not None else None
        self.known: Known = self._load()
        self.sent = 0  # frames written, for tests and logs
        self._gaps: collections.deque[float] = collections.deque(maxlen=16)
        self._tasks: dict[Announcement, asyncio.Task] = {}

    def update(self, taps: Iterable[Tap], gap: float) -> list[Announcement]:
        """Start announcing what ``plan`` says is due, and stop announcing what is no longer
        true (a NIC detached, or its address moved to another MAC, while its frames were still
        going out: they would poison the caches the new NIC's announcement just fixed).
        ``gap``: time since the previous snapshot; a change is published at once, so the
        spread uses the longest recent gap (about one heartbeat), not this one."""
        self._gaps.append(gap)
        due, known = plan(self.known, taps)
        if known != self.known:
            self.known = known
            self._save()
        for a, task in list(self._tasks.items()):
            if known.get((a.bridge, a.ip)) != a.mac:
                task.cancel()
                del self._tasks[a]
        spread = max(self._gaps)
        for a in due:
            task = asyncio.create_task(self._announce(a, spread), name=f"announce {a.ip}")
            self._tasks[a] = task
            task.add_done_callback(lambda done, a=a: self._finished(a, done))
        return due

    def _finished(self, a: Announcement, task: asyncio.Task) -> None:
        if self._tasks.get(a) is task:
            del self._tasks[a]

    def _load(self) -> Known:
        if self.path is None or not self.path.exists():
            return {}
        try:
            entries = msgspec.json.decode(self.path.read_bytes(), type=list[Announcement])
        except (OSError, msgspec.DecodeError) as e:  # lose nothing but a few extra frames
            log.warning(
                "agent %s: %s unreadable (%s); announcing every NIC", self.node, self.path, e
            )
            return {}
        return {(a.bridge, a.ip): a.mac for a in entries}

    def _save(self) -> None:
        if self.path is None:
            return
        entries = sorted(Announcement(b, ip, mac) for (b, ip), mac in self.known.items())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(entries))
        tmp.chmod(0o600)
        tmp.replace(self.path)

    async def _announce(self, a: Announcement, heartbeat: float) -> None:
        frame = garp_frame(a.mac, a.ip)
        for i in range(REPEATS):
            if i:
                await asyncio.sleep(heartbeat / (REPEATS - 1))
            try:
                self.send(a.bridge, frame)
                self.sent += 1
            except OSError as e:  # the bridge went meanwhile: the next apply decides again
                log.debug("agent %s: announcing %s on %s failed: %s", self.node, a.ip, a.bridge, e)
                return
        log.debug("agent %s: announced %s at %s on %s", self.node, a.ip, a.mac, a.bridge)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
