"""Pure: how desired versions only grow, also across restarts, without a write per change.

Every change the controller commits is one *generation* (``controller.sections``), and a node's
version is the generation of the last change that affected it. Only a high-water mark is
persisted, reserved in blocks: no version above it is ever sent, and a restarted controller
continues above it, so the store sees one write per ``BLOCK`` changes, not one per node and
change. A node that has applied a version above ours (a lost or restored store) makes the
generation continue above that version. These functions return values; they never read a clock,
write the store or publish: ``controller.publisher`` persists a mark before sending below it.
"""

from collections.abc import Iterable

from schemas import MAX_VERSION
from schemas.intent import NodeVersion

BLOCK = 1024  # generations reserved per store write


def start_generation(reserved: int, loaded: Iterable[NodeVersion] = ()) -> int:
    """Where a starting controller's generations continue: above everything it (or an older
    release, which persisted each node's version) may have issued."""
    return max([reserved, *(v.version for v in loaded)])


def reservation(generation: int, reserved: int, block: int = BLOCK) -> int | None:
    """The mark to persist before sending ``generation``, or None while ``reserved`` covers it."""
    if generation <= reserved:
        return None
    return min(generation + block, MAX_VERSION)


def continue_above(current: int, applied_version: int) -> bool:
    """Whether a node's report of ``applied_version`` must move its version above it. Never up
    to ``MAX_VERSION``: there must be room for the next generation."""
    return current < applied_version < MAX_VERSION
