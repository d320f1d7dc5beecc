"""One encoding for every message: JSON via msgspec (readable with `nats sub`, fast to decode)."""

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder] = {}


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode and validate; raises msgspec.ValidationError / DecodeError with a path in the text."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder.decode(data)
