"""JSON in and out, with every decode failure turned into a MessageRejected with its reason."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from .errors import (
    MISSING_FIELD,
    NOT_JSON,
    OUT_OF_RANGE,
    OVERSIZED,
    WRONG_TYPE,
    MessageRejected,
)

_encoder = msgspec.json.Encoder()


def _classify(error: msgspec.DecodeError) -> MessageRejected:
    text = str(error)
    if not isinstance(error, msgspec.ValidationError):
        return MessageRejected(NOT_JSON, text)
    if "missing required field" in text:
        return MessageRejected(MISSING_FIELD, text)
    # msgspec words range failures as "Expected `int` >= 0", "... of length <= 128".
    if ">=" in text or "<=" in text or "length" in text or "out of range" in text:
        return MessageRejected(OUT_OF_RANGE, text)
    return MessageRejected(WRONG_TYPE, text)


def decode(decoder: msgspec.json.Decoder, payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise MessageRejected(OVERSIZED, f"{len(payload)} bytes > limit {max_bytes}")
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as error:
        raise _classify(error) from None
    except RecursionError:
        raise MessageRejected(NOT_JSON, "nesting too deep") from None
    except UnicodeDecodeError as error:  # msgspec raises it, not DecodeError, for bad UTF-8 in a string
        raise MessageRejected(NOT_JSON, f"invalid UTF-8: {error}") from None



def encode(message: Struct) -> bytes:
    """JSON as Dynamo's serde writes it (absent optionals as null)."""
    return _encoder.encode(message)


def encode_json(value: object) -> bytes:
    """Any mix of dicts, lists and the structures above, as JSON."""
    return _encoder.encode(value)

