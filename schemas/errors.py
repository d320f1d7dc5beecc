"""The API's one error hierarchy, shared by the controller (which raises it) and the client
(which re-creates it from a reply's code), so ``except ApiError`` works on both sides.

Flat, like nats.py's: one base carrying ``code`` and ``message``, one subclass per code. On the
wire an error is only its code and message (``schemas.api.ErrorReply`` and the micro-service
headers); this module never encodes, logs or does I/O.
"""


class ApiError(Exception):
    """A request failed; ``code`` is the API's HTTP-like code, ``message`` says why to an operator."""

    code: int = 500

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    """Malformed or invalid input; nothing was changed."""

    code = 400


class NotFound(ApiError):
    """The named network, NIC or node does not exist."""

    code = 404


class Conflict(ApiError):
    """Valid on its own but clashes with what exists (in use, overlapping, exhausted)."""

    code = 409


class Internal(ApiError):
    """The controller failed unexpectedly while handling the request."""

    code = 500


class Deferred(ApiError):
    """Understood but not supported yet (deferred network types)."""

    code = 501


class Unavailable(ApiError):
    """No controller answers on this NATS server."""

    code = 503


class Timeout(ApiError):
    """The controller did not answer in time."""

    code = 504


_BY_CODE: dict[int, type[ApiError]] = {
    cls.code: cls
    for cls in (BadRequest, NotFound, Conflict, Internal, Deferred, Unavailable, Timeout)
}


def from_code(code: int, message: str) -> ApiError:
    """The error a reply's code stands for; an unknown code keeps its value on the base class."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else ApiError(message, code)
