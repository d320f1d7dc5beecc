"""How a process joins the bus as one identity: its nkey seed file (nats-py signs the server's
nonce with it, re-reading the file on every reconnect), a TLS context that trusts only the bus
CA, and the identity's private inbox prefix (``_INBOX.<public key>``), the only inbox the server
lets it subscribe to, so no identity can read another's replies.

Shared by every command (the controller depends on ``schemas`` alone). It builds keyword
arguments for ``nats.connect`` and never connects; ``client.bus`` writes the files.

``Reconnect`` is how the long-running processes (controller, agents) stay on the bus: they retry
for ever, with capped exponential back-off and jitter so a restarted nats-server is not hit by
every node at the same instant. nats-py 2.x has no jitter option; its reconnect loop takes a
delay from ``reconnect_to_server_handler``, and its first connect awaits ``error_cb`` after each
failed try, so both get their delay from the pure ``backoff`` here.
"""

import asyncio
import contextlib
import logging
import random
import re
import ssl
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nkeys
from nats import errors as nats_errors

log = logging.getLogger(__name__)

CREDS_ENV = "OTHERIX_NATS_CREDS"  # path of the identity's seed file (*.nk)
CA_ENV = "OTHERIX_NATS_CA"  # path of the bus CA certificate (ca.pem)
INBOX_ROOT = "_INBOX"

_PUBLIC_USER_KEY = re.compile(r"^U[A-Z2-7]{55}$")


def valid_public_key(key: str) -> bool:
    return bool(_PUBLIC_USER_KEY.match(key))


def inbox_prefix(public_key: str) -> str:
    """The inbox prefix an identity must connect with (nats-py ``inbox_prefix``)."""
    if not valid_public_key(public_key):
        raise ValueError("not a public user nkey (U…)")
    return f"{INBOX_ROOT}.{public_key}"


def public_key(seed: bytes) -> str:
    """The public user key (``U…``) of a seed; ValueError if it is not a user seed."""
    try:
        kp = nkeys.from_seed(bytearray(seed.strip()))
    except (nkeys.NkeysError, ValueError) as e:
        raise ValueError(f"not an nkey seed: {e}") from None
    try:
        if not kp.public_key.startswith(b"U"):
            raise ValueError("not a user nkey seed (SU…)")
        return kp.public_key.decode()
    finally:
        kp.wipe()


def tls_context(ca_file: str | Path) -> ssl.SSLContext:
    """Verify the server's certificate and host name against the bus CA only."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def identity_inbox(seed_file: str | Path) -> str:
    return inbox_prefix(public_key(Path(seed_file).read_bytes()))


def connect_kwargs(
    seed_file: str | Path | None, ca_file: str | Path | None, name: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``. Either file may be None (an open bus, or a
    TLS-only one); a missing or malformed file raises here with its path, not at connect time."""
    kwargs: dict[str, Any] = {}
    if name:
        kwargs["name"] = name
    if seed_file is not None:
        try:
            kwargs["inbox_prefix"] = identity_inbox(seed_file)
        except (OSError, ValueError) as e:
            raise BusConfigError(f"credentials {seed_file}: {e}") from None
        kwargs["nkeys_seed"] = str(seed_file)
    if ca_file is not None:
        # TLS first, before the server's INFO: nats-py otherwise starts TLS only when an INFO in
        # clear asks for it, and a man in the middle could strip that request
        kwargs["tls_handshake_first"] = True
        try:
            kwargs["tls"] = tls_context(ca_file)
        except (OSError, ssl.SSLError) as e:
            raise BusConfigError(f"CA certificate {ca_file}: {e}") from None
    return kwargs


class BusConfigError(ValueError):
    """A credentials or CA file that cannot be used; the message names the file."""


def backoff(
    attempt: int, base: float = 0.25, cap: float = 5.0, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before try ``attempt`` + 1 (0 = after the first failure): doubling from
    ``base`` up to ``cap``, and a random half of it ("equal jitter"), so clients that lost the
    server together come back spread over time, yet none waits longer than ``cap``."""
    ceiling = min(cap, base * 2 ** min(max(attempt, 0), 32))
    return ceiling / 2 + ceiling / 2 * rand()


class Reconnect:
    """``nats.connect`` keywords for a process that must stay on the bus: never give up, back
    off with jitter, log the first failure and then a count (not a line per try), and count
    slow-consumer drops instead of logging each one. Set ``connected`` once ``connect`` returned.
    """

    def __init__(self, who: str, base: float = 0.25, cap: float = 5.0, rand=random.random):
        self.who, self.base, self.cap, self.rand = who, base, cap, rand
        self.connected = False  # the first connect succeeded (the caller sets it)
        self.down = False  # lost the connection since, not back yet
        self.failures = 0  # failed tries since the last success
        self.slow_consumer: Counter[str] = Counter()  # subject → messages dropped
        self.server: str | None = None  # host:port of the server last connected or tried

    def delay(self, attempt: int) -> float:
        return backoff(attempt, self.base, self.cap, self.rand)

    def kwargs(self) -> dict[str, Any]:
        return {
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0,  # the first connect: error_cb waits instead, with jitter
            "connect_timeout": 2,
            "error_cb": self.on_error,
            "disconnected_cb": self.on_disconnected,
            "reconnected_cb": self.on_reconnected,
            "reconnect_to_server_handler": self.next_server,
        }

    def next_server(self, servers: list, _info: dict) -> tuple[Any, float]:
        """nats-py's reconnect loop: which server next, after our delay. Left to itself with a
        handler, nats-py would retry the first server for ever, even the one that died; so pick
        among the least-failed servers one other than the last tried (a cluster's survivor),
        at random so clients spread over the survivors. nats-py counts a server's failed tries
        and resets them on success."""
        attempt = min((s.reconnects for s in servers), default=0)
        fewest = [s for s in servers if s.reconnects == attempt]
        others = [s for s in fewest if s.uri.netloc != self.server] or fewest
        chosen = self.rand_choice(others) if others else None
        self.server = chosen.uri.netloc if chosen is not None else None
        return chosen, self.delay(attempt)

    def rand_choice(self, items: list):
        return items[int(self.rand() * len(items)) % len(items)]

    def connected_to(self, nc) -> None:
        """Call once ``nats.connect`` returned: the first connect succeeded, to this server."""
        self.connected = True
        url = nc.connected_url
        self.server = url.netloc if url is not None else None

    async def on_error(self, e: Exception) -> None:
        if isinstance(e, nats_errors.SlowConsumerError):
            self.slow_consumer[e.subject] += 1
            n = self.slow_consumer[e.subject]
            if n == 1 or n % 1000 == 0:  # the first, then a count: a flood must not flood logs
                log.warning(
                    "%s: slow consumer on %s: %d message(s) dropped", self.who, e.subject, n
                )
            return
        if self.connected and not self.down:  # an error on a working connection
            log.warning("%s: bus error: %s", self.who, e or type(e).__name__)
            return
        self.failures += 1
        if self.failures == 1 or self.failures % 20 == 0:
            why = e or type(e).__name__
            log.warning("%s: cannot reach the bus (%d tries): %s", self.who, self.failures, why)
        if not self.connected:  # the first connect: nats-py itself would retry at once
            await asyncio.sleep(self.delay(self.failures - 1))

    async def on_disconnected(self) -> None:
        if self.connected and not self.down:
            log.warning("%s: disconnected from the bus; reconnecting", self.who)
            self.down = True

    async def on_reconnected(self) -> None:
        log.info("%s: reconnected to the bus after %d failed tries", self.who, self.failures)
        self.failures, self.down = 0, False


STALLED_CONNECT = 15.0  # seconds: above the longest normal gap between two first-connect tries


async def connect_patiently(servers: list[str], bus: Reconnect, connect=None, **kwargs):
    """``nats.connect`` with ``bus``'s keywords until it succeeds. nats-py 2.16 can hang for
    ever after a failed first try over TLS (closing the half-made TLS transport waits on it
    with no timeout), so a connect whose tries stopped (no new failure for
    ``STALLED_CONNECT`` seconds) is cancelled and begun anew."""
    if connect is None:
        import nats

        connect = nats.connect
    while True:
        task = asyncio.ensure_future(connect(servers, **kwargs, **bus.kwargs()))
        try:
            while True:
                tried = bus.failures
                done, _ = await asyncio.wait({task}, timeout=STALLED_CONNECT)
                if done:
                    return task.result()
                if bus.failures == tried:
                    log.warning("%s: connecting stalled; starting over", bus.who)
                    break
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def cancel_and_wait(tasks: list[asyncio.Task]) -> None:
    """Cancel ``tasks`` and wait for them to end. On Python 3.11 ``asyncio.wait_for`` (inside
    every nats-py request) swallows a cancel that lands as its inner future completes
    (cpython gh-86296), and a loop around such a request then runs on for ever: cancel again
    until each task has ended."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    for task in tasks:  # retrieved, so that nothing is logged as never retrieved
        if not task.cancelled():
            task.exception()
