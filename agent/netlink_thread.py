"""The netlink thread: one thread with a stock asyncio loop that owns the agent's rtnetlink sockets.

pyroute2's async sockets do not run on uvloop (the agent's main loop), so every netlink job runs
here: ``await thread.run(job)`` from any loop executes ``job(sockets)`` in this thread, one job at
a time (observe and apply never interleave), which also keeps slow netlink writes off the
heartbeat path. The sockets: pyroute2's ``AsyncIPRoute`` for links and addresses, and the bulk
FDB socket (``agent.links.fdb_socket``). This module runs jobs; it never decides what to read
or write.
"""

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netns import popns, pushns

from agent.links.fdb_socket import FdbSocket

log = logging.getLogger(__name__)

T = TypeVar("T")
START_TIMEOUT = 10.0
# One job (a cold apply of the largest snapshot) takes well under a second; a netlink call that
# never answers must not hang the apply worker: the job is cancelled and the next heartbeat retries.
JOB_TIMEOUT = 60.0


@dataclass
class Sockets:
    ipr: AsyncIPRoute
    fdb: FdbSocket


class NetlinkThread:
    """Owns the netlink sockets and the thread/loop they live in."""

    def __init__(self, netns: str | None = None):
        self._netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sockets: Sockets | None = None
        self._lock: asyncio.Lock | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("netlink thread already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="netlink", daemon=True)
        self._thread.start()
        # The socket must be created inside the thread: pyroute2 keeps it in thread-locals.
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(timeout=START_TIMEOUT)
        except BaseException as e:
            self.stop()
            if isinstance(e, FileNotFoundError) and self._netns is not None:
                # pyroute2 says only "No such file or directory"
                raise FileNotFoundError(
                    errno.ENOENT, f"no network namespace {self._netns}"
                ) from None
            raise
        log.info("netlink thread started (netns=%s)", self._netns or "current")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=START_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=START_TIMEOUT)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None
        log.info("netlink thread stopped")

    @property
    def alive(self) -> bool:
        """The thread runs its loop (liveness, ``/healthz``)."""
        return self._thread is not None and self._thread.is_alive()

    async def run(
        self, job: Callable[[Sockets], Coroutine[Any, Any, T]], timeout: float = JOB_TIMEOUT
    ) -> T:
        """Run ``job(sockets)`` in the netlink thread, alone; awaitable from any event loop.
        A job still running after ``timeout`` seconds is cancelled (freeing the thread for the
        next one) and ``TimeoutError`` says so."""
        if self._loop is None:
            raise RuntimeError("netlink thread is not running")
        future = asyncio.run_coroutine_threadsafe(self._locked(job), self._loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"netlink job did not finish within {timeout:g}s; cancelled"
            ) from None

    async def _locked(self, job: Callable[[Sockets], Coroutine[Any, Any, T]]) -> T:
        assert self._lock is not None and self._sockets is not None
        async with self._lock:
            return await job(self._sockets)

    async def _open(self) -> None:
        # groups=0: no multicast subscriptions, so no unread events pile up in pyroute2's queue
        # flags=0: fail on a missing namespace instead of creating one (pyroute2's default)
        ipr = AsyncIPRoute(netns=self._netns, groups=0, flags=0)
        try:
            await ipr.link("get", index=1)  # the socket opens lazily: prove it works now
        except BaseException:
            ipr.close()
            raise
        self._sockets = Sockets(ipr=ipr, fdb=_open_fdb_socket(self._netns))
        self._lock = asyncio.Lock()

    async def _close(self) -> None:
        if self._sockets is not None:
            self._sockets.ipr.close()
            self._sockets.fdb.close()
            self._sockets = None


T = TypeVar("T")


def made_in(netns: str | None, make: Callable[[], T], name: str) -> T:
    """``make()`` run inside ``netns`` (None: here) by a short-lived thread, so that no other
    thread ever changes namespace; for sockets, which keep the namespace they were made in. A
    namespace that does not exist is an error, never created."""
    if netns is None:
        return make()
    out: list = []

    def inside() -> None:
        if not os.path.exists(f"/run/netns/{netns}"):  # pushns would create it
            out.append(FileNotFoundError(errno.ENOENT, f"no network namespace {netns}"))
            return
        pushns(netns)
        try:
            out.append(make())
        except BaseException as e:
            out.append(e)
        finally:
            popns()

    thread = threading.Thread(target=inside, name=name)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _open_fdb_socket(netns: str | None) -> FdbSocket:
    """A raw rtnetlink socket in ``netns`` (a socket keeps the namespace it was made in)."""
    if netns is None:
        return FdbSocket()
    pushns(netns)
    try:
        return FdbSocket()
    finally:
        popns()
