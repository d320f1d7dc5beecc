"""Test helpers for the secured bus: a nats-server started from an ``otherix-bus`` directory,
clients connected as one identity, and probes that prove an action was allowed or refused.

Refusals arrive asynchronously (nats-py hands the server's ``-ERR 'Permissions Violation …'`` to
``error_cb``), so a probe waits for that error naming the subject, and for publishes also checks
that a watcher with the right identity saw nothing before a marker sent after the refusal. Being
allowed is always shown by a received message or a reply, never by ``flush()`` alone.
"""

import asyncio
import os
import subprocess
import time
from pathlib import Path

import nats
from nats.aio.client import Client

from client.bus import files
from client.bus.connect import denied
from tests.conftest import free_port, nats_server_binary, stop_server, wait_listening

TIMEOUT = 5.0


class BusServer:
    """nats-server on 127.0.0.1 with the configuration of a bus directory (TLS, users).

    ``extra`` is configuration added on top (e.g. ``max_payload: 65536``), through a wrapper file
    beside the bus directory: nats-server resolves ``include`` relative to the including file
    and rejects absolute paths there. The store must come from the bus configuration: ``-sd``
    beside a configured ``store_dir`` is a "Duplicate 'store_dir'" error."""

    def __init__(self, bus_dir: Path, extra: str = ""):
        self.dir, self.extra = bus_dir, extra
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = bus_dir.parent / f"nats-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        conf = self.dir / files.SERVER_CONF
        if self.extra:
            wrapper = self.dir.parent / f"nats-{self.port}.conf"
            include = os.path.relpath(conf, wrapper.parent)
            wrapper.write_text(f'include "{include}"\n{self.extra}\n')
            conf = wrapper
        cmd = [nats_server_binary(), "-c", str(conf)]
        cmd += ["-a", "127.0.0.1", "-p", str(self.port)]  # JetStream stays in the bus dir
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.proc, self.port, self.log, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def reloads(self) -> int:
        return self.log.read_text().count("Reloaded server configuration")

    async def wait_reloaded(self, reloads_before: int, timeout: float = TIMEOUT) -> None:
        """Wait for the log line that says a new configuration is in force."""
        deadline = time.monotonic() + timeout
        while self.reloads() == reloads_before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reload in {timeout}s: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.02)

    async def reload(self) -> None:
        before = self.reloads()
        files.reload_server(self.pid)
        await self.wait_reloaded(before)

    def stop(self) -> None:
        stop_server(self.proc)
        self.proc = None


class Peer:
    """One connection and the errors the server sent it."""

    def __init__(self, label: str):
        self.label = label
        self.nc: Client | None = None
        self.errors: list[Exception] = []
        self.closed = asyncio.Event()

    async def _on_error(self, e: Exception) -> None:
        self.errors.append(e)

    async def _on_closed(self) -> None:
        self.closed.set()

    async def connect(self, url: str, **kwargs) -> "Peer":
        self.nc = await nats.connect(
            url,
            connect_timeout=2,
            allow_reconnect=False,
            error_cb=self._on_error,
            closed_cb=self._on_closed,
            **kwargs,
        )
        return self

    async def wait_error(self, *words: str, timeout: float = TIMEOUT) -> str:
        """The first error containing every word (e.g. "Publish", the subject), ignoring case:
        nats-py lowercases the server's message."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.errors:
                if all(w.lower() in str(e).lower() for w in words):
                    return str(e)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label}: no error with {words}; got {self.errors}")
            await asyncio.sleep(0.01)

    async def wait_denied(self, kind: str, subject: str, timeout: float = TIMEOUT) -> None:
        """Wait until the server refused this ``"publish"`` or ``"subscription"`` on exactly
        ``subject`` (nats-py lowercases the message, subject included)."""
        want = (kind, subject.lower())
        deadline = time.monotonic() + timeout
        while not any(denied(e) == want for e in self.errors):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.label}: {kind} of {subject} not refused: {self.errors}"
                )
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


def seed_of(bus_dir: Path, who: str) -> Path:
    """``controller``, ``admin``, ``viewer`` or ``node:<name>``."""
    return files.seed_file(bus_dir, who.removeprefix("node:"))


async def connect_as(server: BusServer, who: str) -> Peer:
    kwargs = files.identity_kwargs(server.dir, who.removeprefix("node:"), name=who)
    return await Peer(who).connect(server.url, **kwargs)


async def assert_receives(sub, publish, timeout: float = TIMEOUT) -> bytes:
    """Publish (again every 50 ms, since the subscription may not be in place yet) until the
    subscription receives a message; returns its data."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await publish()
        try:
            return (await sub.next_msg(timeout=0.05)).data
        except nats.errors.TimeoutError:
            continue
    raise AssertionError("subscription received nothing")


async def can_subscribe(
    subscriber: Peer, subject: str, publisher: Peer, pub_subject: str | None = None
) -> None:
    sub = await subscriber.nc.subscribe(subject)
    try:
        await assert_receives(sub, lambda: publisher.nc.publish(pub_subject or subject, b"probe"))
    finally:
        await sub.unsubscribe()


async def cannot_subscribe(
    subscriber: Peer, subject: str, publisher: Peer, pub_subject: str | None = None
) -> None:
    """The server refuses the subscription, and a message published afterwards does not arrive
    (a round trip on the subscriber's own connection shows it had time to)."""
    sub = await subscriber.nc.subscribe(subject)
    await subscriber.wait_denied("subscription", subject)
    await publisher.nc.publish(pub_subject or subject, b"probe")
    await publisher.nc.flush()
    await subscriber.nc.flush()
    try:
        msg = await sub.next_msg(timeout=0.2)
    except nats.errors.TimeoutError:
        return
    raise AssertionError(f"{subscriber.label} received {msg.subject} despite the refusal")


async def can_publish(publisher: Peer, subject: str, watcher: Peer) -> object:
    """``watcher`` (allowed to subscribe) receives what ``publisher`` sends; returns the live
    subscription so a refusal can be checked against it."""
    sub = await watcher.nc.subscribe(subject)
    await assert_receives(sub, lambda: publisher.nc.publish(subject, b"allowed"))
    return sub


async def cannot_publish(publisher: Peer, subject: str, watcher: Peer, allowed: Peer) -> None:
    """``allowed`` can publish ``subject`` (the watcher sees it); ``publisher`` is refused: the
    server sends it a violation and the watcher sees only a marker ``allowed`` sends after."""
    sub = await can_publish(allowed, subject, watcher)
    try:
        while True:  # drain the retries of the positive probe
            await sub.next_msg(timeout=0.1)
    except nats.errors.TimeoutError:
        pass
    await publisher.nc.publish(subject, b"forged")
    await publisher.wait_denied("publish", subject)
    await allowed.nc.publish(subject, b"marker")
    try:
        data = (await sub.next_msg(timeout=TIMEOUT)).data
        assert data == b"marker", f"{watcher.label} received {data!r} from {publisher.label}"
    finally:
        await sub.unsubscribe()


def file_modes(directory: Path) -> dict[str, int]:
    return {p.name: os.stat(p).st_mode & 0o777 for p in [directory, *directory.iterdir()]}
