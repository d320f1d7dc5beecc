"""schemas.errors: one hierarchy on both sides of the wire."""

import pytest

import client.api
from schemas import errors


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (400, errors.BadRequest),
        (404, errors.NotFound),
        (409, errors.Conflict),
        (500, errors.Internal),
        (501, errors.Deferred),
        (503, errors.Unavailable),
        (504, errors.Timeout),
    ],
)
def test_a_reply_code_becomes_its_class(code, cls):
    e = errors.from_code(code, "why")
    assert type(e) is cls and (e.code, e.message, str(e)) == (code, "why", "why")
    assert cls("why").code == code


def test_an_unknown_code_keeps_its_value_on_the_base():
    e = errors.from_code(418, "teapot")
    assert type(e) is errors.ApiError and e.code == 418


def test_the_client_raises_the_controllers_classes():
    assert client.api.ApiError is errors.ApiError
    with pytest.raises(client.api.ApiError):
        raise errors.Conflict("in use")
