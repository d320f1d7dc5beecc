"""The process contract every command shares: flags that fall back to ``OTHERIX_*`` environment
variables (compose files and units rely on those names), and logging (text, or JSON lines for log
shippers). It sits in ``schemas`` because the controller depends on ``schemas`` alone; this is the
one module here that reads the environment.
"""

import argparse
import logging
import os
import sys

import msgspec

from schemas import bus, probes


def env(name: str, default: str | None = None) -> str | None:
    """An environment default; an empty variable counts as unset (compose files often set "")."""
    return os.environ.get(name) or default


def option(
    p: argparse.ArgumentParser, flag: str, var: str, default: str | None, help: str, **kw
) -> None:
    """A flag whose default comes from ``var``; argparse converts it like a typed value."""
    value = env(var, default)
    choices = kw.get("choices")
    if choices and value is not None and kw.get("type", str)(value) not in choices:
        # argparse checks choices on the command line only, not on defaults
        p.error(
            f"argument {flag} (env {var}): invalid choice: {value!r} (choose from {', '.join(choices)})"
        )
    p.add_argument(flag, default=value, help=f"{help} (env {var})", **kw)


class ServerUrls(list):
    """The servers ``--nats`` names: a list for ``nats.connect`` (nats-py connects to one and,
    losing it, reconnects to another), printed as the comma-separated text it came from."""

    def __str__(self) -> str:
        return ",".join(self)


def server_urls(value: str) -> ServerUrls:
    """``--nats``: one URL, or every server of a cluster comma-separated."""
    urls = ServerUrls(u.strip() for u in value.split(",") if u.strip())
    if not urls:
        raise argparse.ArgumentTypeError("no NATS server URL")
    return urls


def add_bus(p: argparse.ArgumentParser) -> None:
    """Who this process is on the bus (``otherix-bus`` writes these files)."""
    option(p, "--nats", "OTHERIX_NATS_URL", "nats://127.0.0.1:4222",
           "NATS server URL, or a cluster's URLs comma-separated", type=server_urls)  # fmt: skip
    option(p, "--nats-creds", bus.CREDS_ENV, None, "this identity's nkey seed file (*.nk)")
    option(p, "--nats-ca", bus.CA_ENV, None, "CA certificate the server's must chain to")


def connect_kwargs(args: argparse.Namespace, name: str) -> dict:
    """``nats.connect`` keywords for the identity the flags name; BusConfigError names a bad
    file before any connection is tried."""
    return bus.connect_kwargs(args.nats_creds, args.nats_ca, name=name)


def metrics_address(value: str) -> tuple[str, int] | None:
    """``--metrics-address``: HOST:PORT, or "" for none."""
    if not value:
        return None
    try:
        return probes.listen_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_metrics(p: argparse.ArgumentParser, default: str = "") -> None:
    """Where Prometheus metrics, /healthz and /readyz are served (``schemas.probes``)."""
    option(p, "--metrics-address", "OTHERIX_METRICS_ADDRESS", default,
           "HOST:PORT serving /metrics, /healthz and /readyz; empty: none",
           type=metrics_address)  # fmt: skip


def add_common(p: argparse.ArgumentParser) -> None:
    add_bus(p)
    option(
        p,
        "--log-format",
        "OTHERIX_LOG_FORMAT",
        "text",
        "log as text or JSON lines",
        choices=("text", "json"),
    )
    option(p, "--log-level", "OTHERIX_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR",
           choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet_tls_close()


def quiet_tls_close() -> None:
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time
    a TLS connection to NATS closes; it is harmless and would fill every log and terminal."""
    logging.getLogger("asyncio").setLevel(logging.ERROR)
