"""HTTP for operators and orchestrators: Prometheus metrics on ``/metrics``, liveness on
``/healthz``, readiness on ``/readyz``.

It runs on the process's own event loop on purpose: ``/healthz`` is answered only while that loop
turns, so a wedged loop fails liveness instead of a helper thread answering for it. Each check is
a callable returning None when fine, else the reason, which a 503 carries as its body. The
server reads one request per connection (bounded in size and time) and never blocks the loop on
a slow client. It reads the process's state and never changes it.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], str | None]  # None: fine; a text: why not

SCRAPE_SHARE = 10  # a costly exposition is answered again for 10× what it took to make
COSTLY_SCRAPE = 0.01  # seconds
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request
MAX_REQUEST = 16 * 1024  # bytes of request line and headers
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) → (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host.removeprefix("[").removesuffix("]"), int(port)


class ProbeServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        live: Check = lambda: None,
        ready: Check = lambda: None,
        refresh: Callable[[], None] | None = None,
    ):
        """``refresh`` runs before each scrape, to set gauges that are read, not counted."""
        self.registry, self.live, self.ready, self.refresh = registry, live, ready, refresh
        self._server: asyncio.Server | None = None
        self._scraped: tuple[float, float, bytes] | None = None  # (made at, cost, body)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        log.info("metrics and probes on http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int:
        """The bound port (start with port 0 to let the kernel choose)."""
        assert self._server is not None, "not started"
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; pure apart from the checks."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics()
        check = {"/healthz": self.live, "/readyz": self.ready}.get(path)
        if check is None:
            return 404, "text/plain", b"not found: /metrics, /healthz or /readyz\n"
        why = check()
        return (
            (200, "text/plain", b"ok\n")
            if why is None
            else (503, "text/plain", f"{why}\n".encode())
        )

    def _metrics(self) -> bytes:
        """The exposition, made anew once the last one is older than ``SCRAPE_SHARE`` times what
        it cost, if it cost more than ``COSTLY_SCRAPE``: a client scraping in a loop takes at most
        ~1/SCRAPE_SHARE of the event loop from the heartbeat (30 ms a scrape at 5,000 nodes),
        and a cheap scrape (a small cluster's) is never stale."""
        now = time.monotonic()
        made_at, cost, _ = self._scraped or (0.0, 0.0, b"")
        if cost < COSTLY_SCRAPE or now - made_at >= SCRAPE_SHARE * cost:
            if self.refresh is not None:
                self.refresh()
            body = generate_latest(self.registry)
            self._scraped = (time.monotonic(), time.monotonic() - now, body)
        return self._scraped[2]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = self.respond(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, ctype, body, method = 400, "text/plain", b"bad request\n", "GET"
        except ConnectionError:
            writer.close()
            return
        except Exception:  # a failing check or collector must not kill the server
            log.exception("probes: answering a request failed")
            status, ctype, body, method = 503, "text/plain", b"internal error\n", "GET"
        header = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header if method == "HEAD" else header + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, TimeoutError):
            # close() would wait for a reader forever, holding the socket and the answer
            writer.transport.abort()
            return
        writer.close()
