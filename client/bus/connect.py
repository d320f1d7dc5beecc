"""A client's view of the bus: ``connect_kwargs`` (shared with the controller, so it lives in
``schemas.bus``) and ``denied``, which tells a permission refusal from other errors."""

import re

from schemas.bus import (  # noqa: F401 (the commands' shared half, re-exported for callers)
    CA_ENV,
    CREDS_ENV,
    connect_kwargs,
    identity_inbox,
    tls_context,
)

_DENIED = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.I)


def denied(error: Exception) -> tuple[str, str] | None:
    """``("publish" | "subscription", subject)`` when ``error`` (as nats-py hands it to
    ``error_cb``) is nats-server refusing a permission, else None. nats-py lowercases the
    server's message, so the subject comes back lowercased. A refused publish is dropped
    silently on the caller's side: a request then just times out, so a client that wants to
    say "not allowed" must watch for this."""
    m = _DENIED.search(str(error))
    return (m.group(1).lower(), m.group(2)) if m else None
