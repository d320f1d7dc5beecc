"""A fault-injecting NATS proxy: drops, duplicates and delays single frames, cuts, partitions and
stalls the connections of one bus identity, seeded so that a failing chaos run replays.

Every accepted client connection gets its own upstream connection to nats-server; either side
closing closes the other. Bytes pass unchanged; the proxy parses the NATS text protocol only to
find frame boundaries (``PUB``/``HPUB`` from clients, ``MSG``/``HMSG`` from the server, payloads
of any size, pipelined or split across reads) and the client's ``CONNECT``.

TLS: the lab's bus is TLS with ``handshake_first`` and nkey identities. The proxy TERMINATES TLS
towards clients with the lab's own server certificate and key (``server-cert.pem``/
``server-key.pem`` of the bus directory, valid for 127.0.0.1) and RE-ORIGINATES TLS to
nats-server trusting the lab CA, both handshake-first. The server's INFO (with its nonce) and the
client's CONNECT (with the nonce signed by the identity's nkey) pass through unchanged, so the
server still authenticates every identity and enforces its permissions end to end; the proxy
holds no identity's seed. It learns who a connection is from CONNECT: the ``nkey`` mapped through
the lab roster (``controller``, ``admin``, ``viewer`` or a node name); without TLS (labs with
``secure=False``) from the CONNECT ``name`` (``otherix-agent-<node>`` → the node,
``…controller`` → ``controller``).

Faults, as rules in order; the first rule that matches a frame and fires decides its fate:
``drop``; ``duplicate`` (``copies`` extra copies); ``delay`` (``delay`` + uniform(0, ``jitter``)
seconds, written later by its own task while later frames pass: reordering). Filters: direction
(``to_server`` = what a client publishes, ``to_client`` = what it receives), a subject pattern
with ``*``/``>``, identity, probability ``p``, at most ``count`` firings. A rule's decision for
a frame (and a delay's jitter) is a hash of (proxy seed, rule index, identity, direction,
subject, how many frames of that identity, direction and subject this rule has judged), not a
draw from a shared random sequence: a run replays frame by frame per subject however several
publishers interleave (``count`` is the one filter that spans subjects). Observers see every
PUB/HPUB/MSG/HMSG as a ``FrameEvent`` with its fate, before the fault is applied; delivery
observers (``observe_delivered``) see each copy once it is written on (fate ``delivered``),
a delayed frame when it finally goes: the order frames really arrived in.

A frame declaring a payload over ``MAX_PAYLOAD`` closes its connection (logged) rather than
being buffered without limit.

Connection faults: ``cut`` aborts an identity's connections now; ``partition`` cuts them and
refuses that identity's new connections (after reading their CONNECT) until ``heal``; ``stall``
stops forwarding both ways until ``unstall``: bytes are HELD, never dropped (the proxy stops
reading, so TCP back-pressure holds the rest).

    python -m lab.natsfault --listen PORT --upstream HOST:PORT [--tls-dir BUS_DIR]
                            --control SOCKET --seed N

runs one proxy with a unix control socket taking JSON lines (``{"cmd": "add_rule", ...}``,
``clear``, ``cut``, ``partition``, ``heal``, ``stall``, ``unstall``, ``stats``) and answering
one JSON line each. Only for labs and tests: it must never face anything but loopback.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.netns import mark_ready
from lab.relay import hostport
from schemas.bus import tls_context
from schemas.options import quiet_tls_close

log = logging.getLogger("lab.natsfault")

TO_SERVER, TO_CLIENT = "to_server", "to_client"
DIRECTIONS = (TO_SERVER, TO_CLIENT)
ACTIONS = ("drop", "duplicate", "delay")
SIZED = {"PUB", "HPUB", "MSG", "HMSG"}  # control line, then a payload of a stated size
CHUNK = 65536
CONNECT_TIMEOUT = 5.0
MAX_PAYLOAD = 64 * 2**20  # nats-server's own max_payload is far lower; anything above is garbage


class ProtocolError(ValueError):
    """A frame the proxy refuses to buffer; its connection is closed."""


def draw(*key) -> float:
    """A uniform number in [0, 1) that depends on ``key`` only (replayable, order-free)."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcards: ``*`` one token, ``>`` one or more trailing tokens."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


@dataclass(frozen=True, slots=True)
class Frame:
    op: str  # upper case: PUB, MSG, PING, CONNECT, ...
    args: list[str]
    raw: bytes  # exactly the bytes read, control line and payload with their CRLFs
    head: int = 0  # length of the control line with its CRLF (sized frames)

    @property
    def subject(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def reply(self) -> str | None:
        # PUB s [r] n · HPUB s [r] h n · MSG s sid [r] n · HMSG s sid [r] h n
        sized = {"PUB": 3, "HPUB": 4, "MSG": 4, "HMSG": 5}[self.op]
        return self.args[-2 - self.op.startswith("H")] if len(self.args) == sized else None

    def body(self) -> tuple[bytes, bytes]:
        """(headers, payload) of a sized frame."""
        total = int(self.args[-1])
        hdr = int(self.args[-2]) if self.op.startswith("H") else 0
        data = self.raw[self.head : self.head + total]
        return data[:hdr], data[hdr:]


class Parser:
    """Splits a byte stream into frames; keeps an incomplete frame until the rest arrives."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self.buf
        buf += data
        frames, pos = [], 0
        while (eol := buf.find(b"\r\n", pos)) >= 0:
            words = bytes(buf[pos:eol]).decode("latin-1").split()
            op = words[0].upper() if words else ""
            size = words[-1] if words else ""
            if op in SIZED and size.isascii() and size.isdigit():  # not '²', which isdigit()
                if int(size) > MAX_PAYLOAD:
                    raise ProtocolError(f"{op} declares {size} bytes, over {MAX_PAYLOAD}")
                end = eol + 2 + int(size) + 2
                if len(buf) < end:
                    break
                frames.append(Frame(op, words[1:], bytes(buf[pos:end]), eol + 2 - pos))
                pos = end
            else:  # anything else passes as a line, malformed ones included (the server judges)
                frames.append(Frame(op, words[1:], bytes(buf[pos : eol + 2])))
                pos = eol + 2
        del buf[:pos]
        return frames


@dataclass(frozen=True, slots=True)
class FrameEvent:
    identity: str | None
    direction: str  # to_server | to_client
    op: str  # PUB | HPUB | MSG | HMSG
    subject: str
    reply: str | None
    payload: bytes  # without headers
    fate: str  # passed | dropped | duplicated | delayed; delivered (delivery observers)
    headers: bytes = b""  # the raw NATS/1.0 header block of HPUB/HMSG


@dataclass
class Rule:
    action: str
    subject: str = ">"
    direction: str | None = None  # None: both
    identity: str | None = None  # None: every connection
    p: float = 1.0
    count: int | None = None  # fire at most this many times
    copies: int = 1  # duplicate: extra copies
    delay: float = 0.0
    jitter: float = 0.0
    key: str = ""  # proxy seed and rule index: the stem of every draw
    judged: dict = field(default_factory=dict, repr=False)  # (identity, dir, subject) → frames
    matched: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r}: one of {', '.join(ACTIONS)}")
        if self.direction not in (None, *DIRECTIONS):
            raise ValueError(f"direction {self.direction!r}: to_server or to_client")
        if not 0.0 <= self.p <= 1.0 or self.copies < 1 or self.delay < 0 or self.jitter < 0:
            raise ValueError("p in [0, 1], copies >= 1, delay and jitter >= 0")
        if self.count is not None and self.count < 0:
            raise ValueError("count >= 0")

    @property
    def fired(self) -> int:
        return self.dropped + self.duplicated + self.delayed

    def draws(self, identity: str | None, direction: str, subject: str) -> tuple[float, float]:
        """This frame's two draws (fire?, jitter), from its place in its own subject's stream."""
        stream = (identity, direction, subject)
        n = self.judged.get(stream, 0)
        self.judged[stream] = n + 1
        return draw(self.key, *stream, n, "p"), draw(self.key, *stream, n, "jitter")

    def applies(self, identity: str | None, direction: str, subject: str) -> bool:
        return (
            (self.direction is None or self.direction == direction)
            and (self.identity is None or self.identity == identity)
            and (self.count is None or self.fired < self.count)
            and subject_matches(self.subject, subject)
        )

    def as_dict(self) -> dict:
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("key", "judged")
            and not (v is None or (k in ("copies", "delay", "jitter") and not v))
        }


FATES = {"drop": "dropped", "duplicate": "duplicated", "delay": "delayed"}


def identity_from_name(name: str | None) -> str | None:
    """Plaintext labs: the CONNECT name says who it is."""
    if not name:
        return None
    if name.startswith("otherix-agent-"):
        return name.removeprefix("otherix-agent-")
    return "controller" if name.endswith("controller") else name


class Connection:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: "FaultProxy", reader, writer):
        self.proxy = proxy
        self.client = (reader, writer)
        self.identity: str | None = None
        self.name: str | None = None
        self.writers: dict[str, asyncio.StreamWriter] = {TO_CLIENT: writer}
        self.locks = {d: asyncio.Lock() for d in DIRECTIONS}
        self.delayed: set[asyncio.Task] = set()
        self.pumps: list[asyncio.Task] = []

    async def run(self) -> None:
        reader, writer = self.client
        try:
            ur, uw = await asyncio.wait_for(self.proxy.open_upstream(), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            log.warning("upstream %s:%d unreachable: %s", *self.proxy.upstream, e)
            writer.close()
            return
        self.writers[TO_SERVER] = uw
        self.pumps = pumps = [
            asyncio.create_task(self._pump(reader, TO_SERVER)),
            asyncio.create_task(self._pump(ur, TO_CLIENT)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*pumps, *self.delayed):
                task.cancel()
            await asyncio.gather(*pumps, *self.delayed, return_exceptions=True)
            for w in self.writers.values():
                w.close()

    def abort(self) -> None:
        """Cut now: no TLS goodbye, nothing flushed."""
        for w in self.writers.values():
            w.transport.abort()
        for task in self.pumps:  # also those held by a stall
            task.cancel()

    async def _pump(self, reader: asyncio.StreamReader, direction: str) -> None:
        parser = Parser()
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(CHUNK):
                out, delivered = bytearray(), []
                try:
                    frames = parser.feed(data)
                except ProtocolError as e:
                    log.warning("closing %s (%s): %s", self.identity or "?", direction, e)
                    return
                for frame in frames:
                    if frame.op == "CONNECT" and direction == TO_SERVER:
                        self._identify(frame)
                        if self.identity in self.proxy.partitioned:
                            log.info("refused %s: partitioned", self.identity)
                            return
                    if frame.op in SIZED:
                        raw, event = self._fault(frame, direction)
                        out += raw
                        if event is not None and raw:
                            delivered += [event] * (len(raw) // len(frame.raw))
                    else:
                        out += frame.raw
                if out:
                    await self.write(direction, bytes(out))
                    self.proxy.notify_delivered(delivered)

    def _identify(self, frame: Frame) -> None:
        try:
            connect = json.loads(frame.raw[len("CONNECT") :])
        except ValueError:
            return
        self.name = connect.get("name")
        key = connect.get("nkey")
        self.identity = self.proxy.identity_of_key(key) if key else identity_from_name(self.name)

    def _fault(self, frame: Frame, direction: str) -> tuple[bytes, FrameEvent | None]:
        """The bytes to forward now, and the frame as a delivered event (if anyone watches
        deliveries); schedules a delayed copy if a delay rule fires."""
        rule, jitter = self.proxy.decide(self.identity, direction, frame.subject)
        fate = "passed" if rule is None else FATES[rule.action]
        event = delivered = None
        if self.proxy.observers or self.proxy.delivery_observers:
            headers, payload = frame.body()
            event = FrameEvent(
                self.identity, direction, frame.op, frame.subject, frame.reply, payload, fate,
                headers,
            )  # fmt: skip
            self.proxy.notify(event)
            if self.proxy.delivery_observers:
                delivered = dataclasses.replace(event, fate="delivered")
        if rule is None:
            return frame.raw, delivered
        if rule.action == "drop":
            return b"", None
        if rule.action == "duplicate":
            return frame.raw * (1 + rule.copies), delivered
        seconds = rule.delay + jitter * rule.jitter
        task = asyncio.create_task(self._later(direction, frame.raw, seconds, delivered))
        self.delayed.add(task)
        task.add_done_callback(self.delayed.discard)
        return b"", None

    async def _later(
        self, direction: str, raw: bytes, seconds: float, delivered: FrameEvent | None
    ) -> None:
        await asyncio.sleep(seconds)
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.write(direction, raw)
            self.proxy.notify_delivered([delivered] if delivered else [])

    async def write(self, direction: str, data: bytes) -> None:
        """Serialised per direction; waits while this identity is stalled (bytes held)."""
        await self.proxy.gate(self.identity).wait()
        async with self.locks[direction]:
            writer = self.writers[direction]
            writer.write(data)
            await writer.drain()


class FaultProxy:
    """The proxy; create and ``start()`` it inside the event loop that will run it."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        tls_dir: Path | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.upstream, self.host, self.port = upstream, host, port
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.seed = seed
        self.rules: list[Rule] = []
        self.observers: list[Callable[[FrameEvent], None]] = []
        self.delivery_observers: list[Callable[[FrameEvent], None]] = []
        self.conns: set[Connection] = set()
        self.partitioned: set[str] = set()
        self.stalled: dict[str, asyncio.Event] = {}
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._keys: dict[str, str] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._server_tls = self._client_tls = None
        if self.tls_dir:
            from client.bus import files as bus_files

            self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._server_tls.load_cert_chain(
                self.tls_dir / bus_files.SERVER_CERT, self.tls_dir / bus_files.SERVER_KEY
            )
            self._client_tls = tls_context(self.tls_dir / bus_files.CA_CERT)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> "FaultProxy":
        self._server = await asyncio.start_server(
            self._accepted, self.host, self.port, ssl=self._server_tls, limit=CHUNK,
            ssl_handshake_timeout=CONNECT_TIMEOUT if self._server_tls else None,
        )  # fmt: skip
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d -> %s:%d (tls %s, seed %d)", self.host, self.port,
                 *self.upstream, bool(self.tls_dir), self.seed)  # fmt: skip
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> "FaultProxy":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def open_upstream(self):
        host, port = self.upstream
        tls = {"ssl": self._client_tls, "server_hostname": host} if self._client_tls else {}
        return await asyncio.open_connection(host, port, limit=CHUNK, **tls)

    async def _accepted(self, reader, writer) -> None:
        conn = Connection(self, reader, writer)
        self.conns.add(conn)
        self._tasks.add(task := asyncio.current_task())
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # close(): asyncio's stream callback logs a cancelled handler task as an error
        finally:
            self.conns.discard(conn)
            self._tasks.discard(task)

    def identity_of_key(self, key: str) -> str:
        if key not in self._keys:  # nodes join while the lab runs: re-read the roster
            from client.bus import files as bus_files

            with contextlib.suppress(Exception):
                roster = bus_files.load_roster(self.tls_dir)
                roles = {r: getattr(roster, r) for r in bus_files.ROLES}
                self._keys = {k: name for name, k in (roles | roster.nodes).items()}
        return self._keys.get(key, f"unknown-{key[:8]}")

    # --- frame faults ---------------------------------------------------------------------------

    def add_rule(self, action: str, subject: str = ">", **filters) -> Rule:
        index = len(self.rules)
        rule = Rule(action, subject, key=f"{self.seed}:{index}", **filters)
        self.rules.append(rule)
        return rule

    def clear(self, seed: int | None = None) -> None:
        """Remove every rule (a new seed applies to the rules added next)."""
        self.rules.clear()
        if seed is not None:
            self.seed = seed

    def decide(
        self, identity: str | None, direction: str, subject: str
    ) -> tuple[Rule | None, float]:
        """The rule that fires on this frame (None: it passes) and its jitter draw."""
        for rule in self.rules:
            if not rule.applies(identity, direction, subject):
                continue
            rule.matched += 1
            fire, jitter = rule.draws(identity, direction, subject)
            if fire < rule.p:
                setattr(rule, FATES[rule.action], getattr(rule, FATES[rule.action]) + 1)
                return rule, jitter
        return None, 0.0

    def observe(self, callback: Callable[[FrameEvent], None]) -> Callable[[FrameEvent], None]:
        self.observers.append(callback)
        return callback

    def unobserve(self, callback: Callable[[FrameEvent], None]) -> None:
        for observers in (self.observers, self.delivery_observers):
            with contextlib.suppress(ValueError):
                observers.remove(callback)

    def observe_delivered(
        self, callback: Callable[[FrameEvent], None]
    ) -> Callable[[FrameEvent], None]:
        """``callback`` sees each frame copy right after it was written on (fate 'delivered')."""
        self.delivery_observers.append(callback)
        return callback

    def notify(self, event: FrameEvent, observers: list | None = None) -> None:
        for callback in list(self.observers if observers is None else observers):
            try:
                callback(event)
            except Exception:
                log.exception("observer %r failed", callback)

    def notify_delivered(self, events: list[FrameEvent]) -> None:
        for event in events:
            self.notify(event, self.delivery_observers)

    # --- connection faults ----------------------------------------------------------------------

    def connections(self, identity: str | None = None) -> list[Connection]:
        return [c for c in self.conns if identity is None or c.identity == identity]

    def cut(self, identity: str) -> int:
        found = self.connections(identity)
        for conn in found:
            conn.abort()
        log.info("cut %s: %d connection(s)", identity, len(found))
        return len(found)

    def partition(self, identity: str) -> int:
        self.partitioned.add(identity)
        return self.cut(identity)

    def heal(self, identity: str | None = None) -> None:
        """End ``identity``'s partition (every partition if None)."""
        if identity is None:
            self.partitioned.clear()
        else:
            self.partitioned.discard(identity)

    def gate(self, identity: str | None) -> asyncio.Event:
        return self.stalled.get(identity, self._flowing) if identity else self._flowing

    def stall(self, identity: str) -> None:
        self.stalled.setdefault(identity, asyncio.Event()).clear()

    def unstall(self, identity: str | None = None) -> None:
        for name in [identity] if identity else list(self.stalled):
            event = self.stalled.pop(name, None)
            if event is not None:
                event.set()

    def stats(self) -> dict:
        return {
            "seed": self.seed,
            "port": self.port,
            "rules": [r.as_dict() for r in self.rules],
            "connections": sorted(c.identity or "?" for c in self.conns),
            "partitioned": sorted(self.partitioned),
            "stalled": sorted(self.stalled),
        }

    # --- the control socket ---------------------------------------------------------------------

    def command(self, request: dict) -> dict:
        """One control request (``{"cmd": ..., ...}``) → its answer; never raises."""
        request = dict(request)
        cmd = request.pop("cmd", None)
        try:
            match cmd:
                case "add_rule":
                    rule = self.add_rule(request.pop("action"), **request)
                    return {"ok": True, "rule": len(self.rules) - 1, **rule.as_dict()}
                case "clear":
                    self.clear(request.get("seed"))
                case "cut" | "partition":
                    return {"ok": True, "cut": getattr(self, cmd)(request["identity"])}
                case "stall":
                    self.stall(request["identity"])
                case "heal" | "unstall":
                    getattr(self, cmd)(request.get("identity"))
                case "stats":
                    return {"ok": True, **self.stats()}
                case _:
                    return {"ok": False, "error": f"unknown command {cmd!r}"}
        except (KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": f"{cmd}: {e!r}"}
        return {"ok": True}

    async def serve_control(self, path: Path) -> asyncio.Server:
        async def handle(reader, writer):
            with contextlib.suppress(OSError):
                while line := await reader.readline():
                    try:
                        answer = self.command(json.loads(line))
                    except (ValueError, AttributeError) as e:
                        answer = {"ok": False, "error": f"not a JSON object: {e}"}
                    writer.write(json.dumps(answer).encode() + b"\n")
                    await writer.drain()
            writer.close()

        Path(path).unlink(missing_ok=True)
        return await asyncio.start_unix_server(handle, str(path))


async def control(path: Path, request: dict, timeout: float = 10.0) -> dict:
    """Send one request to a proxy process's control socket; its answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        return json.loads(await asyncio.wait_for(reader.readline(), timeout))
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    proxy = FaultProxy(
        hostport(args.upstream), tls_dir=args.tls_dir, seed=args.seed, port=args.listen
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    control_server = await proxy.serve_control(args.control)
    try:
        mark_ready(args.ready_file)
        await stop.wait()
    finally:
        control_server.close()
        Path(args.control).unlink(missing_ok=True)
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.natsfault", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--upstream", required=True, help="nats-server HOST:PORT")
    ap.add_argument("--tls-dir", type=Path, help="the bus directory (TLS both ways)")
    ap.add_argument("--control", type=Path, required=True, help="unix socket for commands")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-file", help="created once the proxy listens")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s natsfault %(levelname)s %(message)s"
    )
    quiet_tls_close()
    try:
        asyncio.run(serve(args))
    except OSError as e:
        log.error("natsfault failed: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
