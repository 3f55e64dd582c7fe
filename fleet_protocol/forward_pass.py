"""ForwardPassMetrics v1 on topic `forward-pass-metrics` (Dynamo 1.x), the payload of an EventEnvelope.

One message per scheduler iteration per dp_rank, and a zeroed one (wall_time 0) after
each idle second: a heartbeat. Opt-in on the engine side (`DYN_FORWARDPASS_METRIC_PORT`
for vLLM and SGLang, `FpmDirectPublisher` for TRT-LLM). Not to be confused with the
legacy `ForwardPassMetrics` of `load.py` (Dynamo 0.1-0.5, JSON), which shares only the name.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

from .errors import OUT_OF_RANGE, MessageRejected
from .event_plane import U64
from .msgpack_codec import decode_msgpack, encode_msgpack
from .values import MAX_WORKER_ID, Count, Rank

FORWARD_PASS_METRICS_VERSION: Final = 1
# Bounds that only reject nonsense (NaN and infinities included).
Seconds = Annotated[float, Meta(ge=0.0, le=1e6)]
Variance = Annotated[float, Meta(ge=0.0, le=1e30)]
DecimalWorkerId = Annotated[str, Meta(pattern=r"^[0-9]{1,20}$")]


class ScheduledRequests(Struct, gc=False):
    """What the iteration ran."""

    num_prefill_requests: Count = 0
    sum_prefill_tokens: Count = 0  # prompt tokens computed in this iteration
    var_prefill_length: Variance = 0.0  # population variance of the prompt lengths
    sum_prefill_kv_tokens: Count = 0  # prompt tokens read from the KV cache (prefix hits, earlier chunks)
    num_decode_requests: Count = 0
    sum_decode_kv_tokens: Count = 0  # decode context tokens
    var_decode_kv_tokens: Variance = 0.0


class QueuedRequests(Struct, gc=False):
    """What waits: prefill = WAITING requests, decode = preempted ones."""

    num_prefill_requests: Count = 0
    sum_prefill_tokens: Count = 0
    var_prefill_length: Variance = 0.0
    num_decode_requests: Count = 0
    sum_decode_kv_tokens: Count = 0
    var_decode_kv_tokens: Variance = 0.0


class ForwardPassMetricsV1(Struct, gc=False):
    """One iteration of one dp_rank; fields in the runtime's order. `worker_id` is a decimal string on the wire."""

    version: int
    worker_id: DecimalWorkerId
    dp_rank: Rank = 0
    counter_id: U64 = 0  # per-rank count from 1, heartbeats included
    wall_time: Seconds = 0.0  # seconds from schedule to update; 0 in a heartbeat
    scheduled_requests: ScheduledRequests = msgspec.field(default_factory=ScheduledRequests)
    queued_requests: QueuedRequests = msgspec.field(default_factory=QueuedRequests)

    @property
    def worker(self) -> int:
        """The worker id as the number the other topics and discovery use."""
        return int(self.worker_id)


_forward_pass_decoder = msgspec.msgpack.Decoder(ForwardPassMetricsV1)


def decode_forward_pass_v1(payload: bytes, max_bytes: int) -> ForwardPassMetricsV1:
    metrics: ForwardPassMetricsV1 = decode_msgpack(_forward_pass_decoder, payload, max_bytes)
    if metrics.version != FORWARD_PASS_METRICS_VERSION:
        raise MessageRejected(OUT_OF_RANGE, f"ForwardPassMetrics version {metrics.version}, only 1 is known")
    if int(metrics.worker_id) > MAX_WORKER_ID:
        raise MessageRejected(OUT_OF_RANGE, f"worker_id {metrics.worker_id} does not fit in 64 bits")
    return metrics


def encode_forward_pass_v1(metrics: ForwardPassMetricsV1) -> bytes:
    return encode_msgpack(metrics)
