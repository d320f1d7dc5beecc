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


def add_common(p: argparse.ArgumentParser) -> None:
    option(p, "--nats", "OTHERIX_NATS_URL", "nats://127.0.0.1:4222", "NATS server URL")
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
