"""TCP relay from 127.0.0.1:PORT inside node namespaces to a target in the root namespace.

Agents run inside node namespaces, nats-server listens on the root namespace's loopback, and
the lab may only use loopback. For each namespace named on the command line the relay creates
a listening socket *inside* that namespace (enter it, bind, listen, come back: a socket keeps
its namespace), and pipes every accepted connection to the target, which is connected from the
namespace the relay was started in.

    python -m lab.relay --target 127.0.0.1:4222 --listen-port 4222 NS [NS...]

A cluster's servers each get a listener: ``--target`` and ``--listen-port`` repeated, paired in
order (one process per namespace whatever the number of servers).

Owns only its sockets; exits on SIGTERM/SIGINT, closing every connection. One relay process per
node namespace is the simple way to add namespaces later (``start_relay``).
"""

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path

from lab.netns import enter_netns, mark_ready, python_module, spawn, wait_ready

log = logging.getLogger("lab.relay")
CONNECT_TIMEOUT = 5.0
CHUNK = 65536


def listen_in(ns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to host:port inside namespace ``ns``."""
    with enter_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # bind/listen act in the socket's namespace, not ours
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``dst`` so the peer sees the EOF too."""
    while data := await src.read(CHUNK):
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        dst.write_eof()


class Relay:
    def __init__(self, target: tuple[str, int]):
        self.target = target  # the default for ``add``
        self.servers: list[asyncio.Server] = []
        self.conns: set[asyncio.Task] = set()

    async def add(
        self, ns: str, port: int, host: str = "127.0.0.1", target: tuple[str, int] | None = None
    ) -> None:
        target = target or self.target
        sock = listen_in(ns, host, port)
        server = await asyncio.start_server(
            lambda r, w: self._accepted(ns, target, r, w), sock=sock, limit=CHUNK
        )
        self.servers.append(server)
        log.info("listening on %s:%d in %s -> %s:%d", host, port, ns, *target)

    async def _accepted(
        self, ns: str, target: tuple[str, int], cr: asyncio.StreamReader, cw: asyncio.StreamWriter
    ):
        self.conns.add(task := asyncio.current_task())
        uw = None
        try:
            ur, uw = await asyncio.wait_for(
                asyncio.open_connection(*target, limit=CHUNK), CONNECT_TIMEOUT
            )
            up, down = (asyncio.ensure_future(c) for c in (_pipe(cr, uw), _pipe(ur, cw)))
            # both directions must end (half-closes); an error on either ends the connection
            done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            for t in pending:
                t.cancel()
            for t in done:
                if not t.cancelled() and t.exception():
                    log.debug("%s: connection ended: %s", ns, t.exception())
        except (OSError, TimeoutError) as e:
            log.warning("%s: cannot reach %s:%d: %s", ns, *target, e)
        finally:
            for w in (cw, uw):
                if w is not None:
                    w.close()
            self.conns.discard(task)

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self.conns):
            t.cancel()
        await asyncio.gather(*self.conns, return_exceptions=True)
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2.0)


def hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for loopback) as a (host, port) pair."""
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(pairs: list[tuple[tuple[str, int], int]], namespaces: list[str], ready_file=None):
    """``pairs``: (target, listen port) for each listener made in every namespace."""
    relay = Relay(pairs[0][0])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for ns in namespaces:
            for target, port in pairs:
                await relay.add(ns, port, target=target)
        mark_ready(ready_file)
        await stop.wait()
    finally:
        await relay.close()


async def start_relay(
    namespaces: list[str],
    target: str | list[str],
    listen_port: int | list[int],
    *,
    state_dir: Path,
    name: str,
) -> asyncio.subprocess.Process:
    """Start ``python -m lab.relay`` detached and wait until it listens (10 s at most). Lists
    of targets and ports (paired in order) give one listener per server of a cluster."""
    ready = state_dir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    targets = [target] if isinstance(target, str) else target
    ports = [listen_port] if isinstance(listen_port, int) else listen_port
    if len(targets) != len(ports):
        raise ValueError("one listen port per target")
    pairs = [
        a
        for t, p in zip(targets, ports, strict=True)
        for a in ("--target", t, "--listen-port", str(p))
    ]
    argv = python_module("lab.relay", *pairs, "--ready-file", str(ready), *namespaces)
    proc = await spawn(argv, state_dir=state_dir, name=name)
    try:
        await wait_ready(proc, ready, 10.0, state_dir / f"{name}.log")
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.relay", description=__doc__.split("\n")[0])
    ap.add_argument("--target", action="append", help="HOST:PORT to connect to (repeatable)")
    ap.add_argument("--listen-port", type=int, action="append",
                    help="port on 127.0.0.1 in each ns, one per --target")  # fmt: skip
    ap.add_argument("--ready-file", help="created once every listener is up")
    ap.add_argument("namespaces", nargs="+", metavar="NS")
    args = ap.parse_args(argv)
    targets, ports = args.target or ["127.0.0.1:4222"], args.listen_port or [4222]
    if len(targets) != len(ports):
        ap.error("give one --listen-port per --target")
    pairs = [(hostport(t), p) for t, p in zip(targets, ports, strict=True)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(levelname)s %(message)s")
    try:
        asyncio.run(serve(pairs, args.namespaces, args.ready_file))
    except OSError as e:
        log.error("relay failed: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
