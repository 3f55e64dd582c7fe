"""MessagePack in and out (Dynamo 1.x's event plane), every decode failure a MessageRejected with its reason."""

from __future__ import annotations

from typing import Any

import msgspec

from .codec import _classify
from .errors import NOT_JSON, NOT_MSGPACK, OVERSIZED, MessageRejected

# One encoder: msgspec writes struct fields in declaration order and every int in its
# smallest form, as rmp-serde's `to_vec_named` does, so equal values give equal bytes.
_encoder = msgspec.msgpack.Encoder()


def decode_msgpack(decoder: msgspec.msgpack.Decoder, payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise MessageRejected(OVERSIZED, f"{len(payload)} bytes > limit {max_bytes}")
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as error:
        rejected = _classify(error)
        if rejected.reason == NOT_JSON:
            rejected = MessageRejected(NOT_MSGPACK, rejected.detail)
        raise rejected from None
    except RecursionError:
        raise MessageRejected(NOT_MSGPACK, "nesting too deep") from None
    except UnicodeDecodeError as error:
        raise MessageRejected(NOT_MSGPACK, f"invalid UTF-8: {error}") from None


def encode_msgpack(value: object) -> bytes:
    """A structure of this package (or plain values) as MessagePack, absent optionals as nil."""
    return _encoder.encode(value)
