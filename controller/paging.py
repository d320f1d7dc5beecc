"""One page of a listing that fits on the bus: keyset cursors and a byte budget.

Pure: sorted items in, one page of encoded items and the next cursor out. A cursor is the sort
key of the last item sent (base64url of its JSON), so paging through a list that changes
meanwhile never repeats an item nor skips one that stays; it holds no state on the controller and
survives a restart. A page ends at the request's ``limit`` or before the item that would pass the
byte budget, whichever comes first, but always holds at least one item (progress). Each item is
encoded once (``msgspec.Raw``), to measure it and to send it. Never does I/O.
"""

import base64
import binascii
import bisect
from collections.abc import Callable, Sequence
from typing import TypeVar

import msgspec

from schemas.errors import BadRequest

T = TypeVar("T")
Key = tuple[str, ...]


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int) -> Key | None:
    """The sort key a cursor stands for (None: no cursor, the first page), or a ``BadRequest``
    for anything this controller did not hand out (wrong encoding, wrong shape)."""
    if cursor is None:
        return None
    try:
        key = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        key = None
    if not (isinstance(key, list) and len(key) == arity and all(isinstance(k, str) for k in key)):
        raise BadRequest(f"cursor {cursor[:80]!r} is not one this API handed out")
    return tuple(key)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise BadRequest(f"limit {limit} must be at least 1")


def page(
    items: Sequence[T],
    key: Callable[[T], Key],
    after: Key | None,
    limit: int | None,
    budget: int,
    render: Callable[[T], bytes],
) -> tuple[list[msgspec.Raw], str | None]:
    """The encoded items whose key follows ``after`` (``items`` sorted by ``key``; None: from the
    start), at most ``limit`` of them and ``budget`` bytes (each plus one separator), and the
    cursor of the next page (None: this was the last)."""
    check_limit(limit)
    start = 0 if after is None else bisect.bisect_right(items, after, key=key)
    taken: list[msgspec.Raw] = []
    used = 0
    for item in items[start:]:
        if limit is not None and len(taken) >= limit:
            break
        data = render(item)
        if taken and used + len(data) + 1 > budget:
            break
        taken.append(msgspec.Raw(data))
        used += len(data) + 1
    end = start + len(taken)
    return taken, encode_cursor(key(items[end - 1])) if taken and end < len(items) else None
