"""Log lines that name the node, and failure logging that does not repeat itself (Calico Felix).

``FailureLog`` logs the first failure of each kind (op, device, errno) as a warning, counts the
repeats quietly, and logs one "in sync again" line once a heartbeat has no failure left.
"""

import logging
from collections import Counter
from collections.abc import Iterable, MutableMapping
from typing import Any

from agent.errors import ApplyError


class NodeLog(logging.LoggerAdapter):
    """Prefixes every message with ``node <name>:`` (and puts ``node`` in the record)."""

    def __init__(self, logger: logging.Logger, node: str | None):
        super().__init__(logger, {"node": node})
        self.prefix = f"node {node}: " if node else ""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs.setdefault("extra", self.extra)
        return f"{self.prefix}{msg}", kwargs


class FailureLog:
    def __init__(self, log: logging.Logger | logging.LoggerAdapter):
        self.log = log
        self.counts: Counter[tuple[str, str, int | str]] = Counter()
        self.heartbeats = 0  # consecutive heartbeats with failures

    def record(self, errors: Iterable[ApplyError]) -> None:
        errors = list(errors)
        if not errors:
            if self.counts:
                self.log.info(
                    "in sync again after %d failing heartbeat(s), %d failure(s) of %d kind(s)",
                    self.heartbeats, self.counts.total(), len(self.counts),
                )  # fmt: skip
                self.counts.clear()
                self.heartbeats = 0
            return
        self.heartbeats += 1
        for error in errors:
            if error.kind not in self.counts:
                self.log.warning(
                    "%s failed (%s): %s; repeats are counted, not logged",
                    error.op, "temporary" if error.temporary else "refused", error,
                )  # fmt: skip
            self.counts[error.kind] += 1
