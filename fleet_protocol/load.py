"""ForwardPassMetrics and the LoadEvent that carries it (Dynamo 0.1-0.5, JSON on `kv_metrics`).

Decoding is strict about types and ranges (a negative block count, a fraction above 1,
a string where a number belongs are all rejected) and lenient about unknown fields,
because Dynamo added fields over time and an older aggregator must keep working.
"""

from __future__ import annotations

from typing import Final

import msgspec
from msgspec import Struct

from .codec import decode
from .errors import INCONSISTENT, MISSING_FIELD, MessageRejected
from .subjects import DEFAULT_ENDPOINT
from .values import Count, EndpointName, Fraction, Rank, WorkerId, check_worker_id

# ForwardPassMetrics (the nested shape Dynamo has sent since July 2025) ----------------


class WorkerStats(Struct, gc=False):
    request_active_slots: Count
    request_total_slots: Count
    num_requests_waiting: Count | None = None
    data_parallel_rank: Rank | None = None


class KvStats(Struct, gc=False):
    kv_active_blocks: Count
    kv_total_blocks: Count
    gpu_cache_usage_perc: Fraction | None = None
    gpu_prefix_cache_hit_rate: Fraction | None = None


class SpecDecodeStats(Struct, gc=False):
    num_spec_tokens: Count | None = None
    num_drafts: Count | None = None
    num_draft_tokens: Count | None = None
    num_accepted_tokens: Count | None = None
    num_accepted_tokens_per_pos: list[Count] | None = None


class ForwardPassMetrics(Struct, gc=False):
    worker_stats: WorkerStats
    kv_stats: KvStats
    spec_decode_stats: SpecDecodeStats | None = None


class LoadEvent(Struct, gc=False):
    """KV and slot stats of one worker (one data-parallel rank of it)."""

    worker_id: WorkerId
    data: ForwardPassMetrics
    endpoint: EndpointName = DEFAULT_ENDPOINT



class _AnyForwardPassMetrics(Struct, gc=False):
    """Every field of the three shapes Dynamo has sent, so one decode pass reads any of them."""

    # flat (Feb-July 2025)
    request_active_slots: Count | None = None
    request_total_slots: Count | None = None
    kv_active_blocks: Count | None = None
    kv_total_blocks: Count | None = None
    num_requests_waiting: Count | None = None
    gpu_cache_usage_perc: Fraction | None = None
    gpu_prefix_cache_hit_rate: Fraction | None = None
    data_parallel_rank: Rank | None = None
    # nested (July 2025 on)
    worker_stats: WorkerStats | None = None
    kv_stats: KvStats | None = None
    spec_decode_stats: SpecDecodeStats | None = None
    # wrapped in LoadMetrics::EngineLoadMetrics
    engine_load_metrics: ForwardPassMetrics | None = None


class _AnyLoadEvent(Struct, gc=False):
    worker_id: WorkerId
    data: _AnyForwardPassMetrics
    endpoint: EndpointName = DEFAULT_ENDPOINT


_FLAT_REQUIRED: Final = ("request_active_slots", "request_total_slots", "kv_active_blocks", "kv_total_blocks")

_load_decoder = msgspec.json.Decoder(_AnyLoadEvent)
_forward_pass_decoder = msgspec.json.Decoder(_AnyForwardPassMetrics)


def _normalise(data: _AnyForwardPassMetrics) -> ForwardPassMetrics:
    if data.engine_load_metrics is not None:
        metrics = data.engine_load_metrics
    elif data.worker_stats is not None or data.kv_stats is not None:
        if data.worker_stats is None or data.kv_stats is None:
            missing = "worker_stats" if data.worker_stats is None else "kv_stats"
            raise MessageRejected(MISSING_FIELD, f"nested ForwardPassMetrics without `{missing}`")
        metrics = ForwardPassMetrics(data.worker_stats, data.kv_stats, data.spec_decode_stats)
    else:
        for name in _FLAT_REQUIRED:
            if getattr(data, name) is None:
                raise MessageRejected(MISSING_FIELD, f"ForwardPassMetrics missing field `{name}`")
        # Each checked above: none is None here.
        assert data.request_active_slots is not None and data.request_total_slots is not None
        assert data.kv_active_blocks is not None and data.kv_total_blocks is not None
        metrics = ForwardPassMetrics(
            WorkerStats(
                request_active_slots=data.request_active_slots,
                request_total_slots=data.request_total_slots,
                num_requests_waiting=data.num_requests_waiting,
                data_parallel_rank=data.data_parallel_rank,
            ),
            KvStats(
                kv_active_blocks=data.kv_active_blocks,
                kv_total_blocks=data.kv_total_blocks,
                gpu_cache_usage_perc=data.gpu_cache_usage_perc,
                gpu_prefix_cache_hit_rate=data.gpu_prefix_cache_hit_rate,
            ),
        )
    check_forward_pass_metrics(metrics)
    return metrics


def check_forward_pass_metrics(metrics: ForwardPassMetrics) -> None:
    """Reject stats that contradict themselves; a worker cannot use more than it has."""
    w, kv = metrics.worker_stats, metrics.kv_stats
    if w.request_active_slots > w.request_total_slots:
        raise MessageRejected(
            INCONSISTENT, f"request_active_slots {w.request_active_slots} > request_total_slots {w.request_total_slots}"
        )
    if kv.kv_active_blocks > kv.kv_total_blocks:
        raise MessageRejected(
            INCONSISTENT, f"kv_active_blocks {kv.kv_active_blocks} > kv_total_blocks {kv.kv_total_blocks}"
        )


def decode_load_event(payload: bytes, max_bytes: int) -> LoadEvent:
    """A LoadEvent in any of Dynamo's ForwardPassMetrics shapes, normalised to the nested one."""
    raw = decode(_load_decoder, payload, max_bytes)
    check_worker_id(raw.worker_id)
    return LoadEvent(worker_id=raw.worker_id, data=_normalise(raw.data), endpoint=raw.endpoint)


def decode_forward_pass_metrics(payload: bytes, max_bytes: int) -> ForwardPassMetrics:
    """A bare ForwardPassMetrics (any shape), as a NATS service's stats handler returns it."""
    return _normalise(decode(_forward_pass_decoder, payload, max_bytes))



def flat_forward_pass_metrics(metrics: ForwardPassMetrics) -> dict:
    """The flat shape Dynamo's workers sent from February to July 2025."""
    w, kv = metrics.worker_stats, metrics.kv_stats
    return {
        "data_parallel_rank": w.data_parallel_rank,
        "request_active_slots": w.request_active_slots,
        "request_total_slots": w.request_total_slots,
        "kv_active_blocks": kv.kv_active_blocks,
        "kv_total_blocks": kv.kv_total_blocks,
        "num_requests_waiting": w.num_requests_waiting,
        "gpu_cache_usage_perc": kv.gpu_cache_usage_perc,
        "gpu_prefix_cache_hit_rate": kv.gpu_prefix_cache_hit_rate,
    }

