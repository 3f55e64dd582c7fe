"""The KV router's hit-rate events (Dynamo 0.1-0.5, JSON on `kv-hit-rate`)."""

from __future__ import annotations

import msgspec
from msgspec import Struct

from .codec import decode
from .errors import INCONSISTENT, MessageRejected
from .values import Count, Rank, WorkerId, check_worker_id


class KvHitRateEvent(Struct, gc=False):
    """The KV router's estimate of prefix reuse for one routed request."""

    worker_id: WorkerId
    isl_blocks: Count
    overlap_blocks: Count
    dp_rank: Rank | None = None



_hit_rate_decoder = msgspec.json.Decoder(KvHitRateEvent)


def decode_hit_rate_event(payload: bytes, max_bytes: int) -> KvHitRateEvent:
    event = decode(_hit_rate_decoder, payload, max_bytes)
    check_worker_id(event.worker_id)
    if event.overlap_blocks > event.isl_blocks:
        raise MessageRejected(
            INCONSISTENT, f"overlap_blocks {event.overlap_blocks} > isl_blocks {event.isl_blocks}"
        )
    return event

