"""A worker's load on topic `kv_metrics` (Dynamo 1.x's `ActiveLoad`), the payload of an EventEnvelope.

Published by `WorkerMetricsPublisher` only when a value changes (debounced 1 ms, per
dp_rank); Dynamo 1.6.1 sends no heartbeat. `kv_used_blocks` is the authoritative count
of KV blocks in use; capacity is not here but in the model card (discovery).
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

from .event_plane import U64
from .msgpack_codec import decode_msgpack, encode_msgpack
from .values import Count, Rank


class ActiveLoad(Struct, gc=False):
    """Fields in rmp-serde's order; None is nil on the wire. Unknown keys are ignored.

    Dynamo after 1.6.1 adds `scheduler_load_scope`, which this reader does not need.
    """

    worker_id: U64  # the worker's discovery instance id (`connection_id`)
    dp_rank: Rank = 0
    active_decode_blocks: Count | None = None
    active_prefill_tokens: Count | None = None  # always nil from 1.6.1 workers
    kv_used_blocks: Count | None = None


_active_load_decoder = msgspec.msgpack.Decoder(ActiveLoad)


def decode_active_load(payload: bytes, max_bytes: int) -> ActiveLoad:
    return decode_msgpack(_active_load_decoder, payload, max_bytes)


def encode_active_load(load: ActiveLoad) -> bytes:
    return encode_msgpack(load)
