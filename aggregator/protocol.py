"""The wire protocol: every message that travels between workers and the aggregator.

Defined once, as msgspec structures, and used by both sides: the publisher library
encodes them, the aggregator decodes them. The JSON is what NVIDIA Dynamo's workers
and KV router put on core NATS, so real Dynamo publishers work unchanged.

Decoding is strict about types and ranges (a negative block count, a fraction above 1,
a string where a number belongs are all rejected) and lenient about unknown fields,
because Dynamo added fields over time and an older aggregator must keep working.
"""

from __future__ import annotations

import math
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

# Subjects -----------------------------------------------------------------------------

KV_METRICS: Final = "kv_metrics"
KV_HIT_RATE: Final = "kv-hit-rate"
COMPONENT_METRICS: Final = "metrics"  # snapshots of a worker's MetricsRegistry

DEFAULT_NAMESPACE: Final = "dynamo"
DEFAULT_COMPONENT: Final = "backend"
DEFAULT_ENDPOINT: Final = "generate"


def namespace_subject(namespace: str, event: str) -> str:
    """Dynamo's `Namespace.publish(event)` subject."""
    return f"namespace.{namespace}.{event}"


def component_subject(namespace: str, component: str, event: str) -> str:
    """Dynamo's `Component.publish(event)` subject."""
    return f"namespace.{namespace}.component.{component}.{event}"


def component_of(subject: str) -> str | None:
    """The component token of a `namespace.{ns}.component.{component}.{event}` subject."""
    parts = subject.split(".")
    if len(parts) == 5 and parts[2] == "component":
        return parts[3]
    return None


# Every structure below holds only scalars, lists and other structures, never a cycle, so
# they are untracked by the cyclic GC (`gc=False`): a fleet keeps hundreds of thousands of
# them alive, and tracked ones make each full collection walk all of them.

# Value types --------------------------------------------------------------------------

# Beyond 2**40 blocks or slots no engine exists; such a value is a bug or an attack.
MAX_COUNT: Final = 2**40
MAX_LABEL_LENGTH: Final = 128

Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
# Dynamo's worker id is an etcd lease id (i64, later u64); exported in decimal.
# msgspec cannot bound ints beyond int64, so the u64 ceiling is checked after decoding.
MAX_WORKER_ID: Final = 2**64 - 1
WorkerId = Annotated[int, Meta(ge=0)]
Rank = Annotated[int, Meta(ge=0, le=65535)]
EndpointName = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL_LENGTH)]


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


class KvHitRateEvent(Struct, gc=False):
    """The KV router's estimate of prefix reuse for one routed request."""

    worker_id: WorkerId
    isl_blocks: Count
    overlap_blocks: Count
    dp_rank: Rank | None = None


class SnapshotSample(Struct, array_like=True, gc=False):
    """`[name, {label: value}, value]`; a value JSON cannot carry is the string "NaN", "+Inf" or "-Inf"."""

    name: str
    labels: dict[str, str]
    value: float | str


class SnapshotFamily(Struct, gc=False):
    """One metric family as prometheus_client collects it: counters named without `_total`, their
    samples with it; histogram samples `_bucket` (with `le`), `_sum`, `_count`."""

    name: str
    type: str
    help: str
    samples: list[SnapshotSample]


class MetricsSnapshot(Struct, gc=False):
    """A worker's MetricsRegistry, as Prometheus text (`text`) or already structured (`families`).

    `text` is what any Prometheus client renders for /metrics (exposition format 0.0.4);
    `families` is the same content as typed structures, which this project's publisher
    sends: reading it costs the aggregator a JSON decode instead of the text parser (~13 µs
    a line). Exactly one of the two is set. The envelope adds who the worker is, so the
    aggregator can add `worker_id` and expire the series with the worker (same identity as
    its LoadEvents: worker_id, endpoint, rank).
    """

    worker_id: WorkerId
    text: str | None = None
    families: list[SnapshotFamily] | None = None
    endpoint: EndpointName = DEFAULT_ENDPOINT
    dp_rank: Rank | None = None


_SPECIAL_VALUES: Final = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}


def snapshot_value(value: float) -> float | str:
    """A sample value for `SnapshotSample`: JSON has no NaN or infinities."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def sample_value(value: float | str) -> float:
    """The float a `SnapshotSample` value stands for; MessageRejected for any other string."""
    if isinstance(value, str):
        try:
            return _SPECIAL_VALUES[value]
        except KeyError:
            raise MessageRejected(WRONG_TYPE, f"sample value {value[:40]!r} is not a number, NaN or ±Inf") from None
    return float(value)


# Decoding -----------------------------------------------------------------------------

# Reasons a message is rejected; each is a label value of the rejected-messages counter.
OVERSIZED: Final = "oversized"
NOT_JSON: Final = "not_json"
MISSING_FIELD: Final = "missing_field"
WRONG_TYPE: Final = "wrong_type"
OUT_OF_RANGE: Final = "out_of_range"
INCONSISTENT: Final = "inconsistent"
REJECT_REASONS: Final = (OVERSIZED, NOT_JSON, MISSING_FIELD, WRONG_TYPE, OUT_OF_RANGE, INCONSISTENT)


class MessageRejected(Exception):
    """A message that cannot be used; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
_hit_rate_decoder = msgspec.json.Decoder(KvHitRateEvent)
_snapshot_decoder = msgspec.json.Decoder(MetricsSnapshot)
_forward_pass_decoder = msgspec.json.Decoder(_AnyForwardPassMetrics)
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


def _decode(decoder: msgspec.json.Decoder, payload: bytes, max_bytes: int):
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


def _check_worker_id(worker_id: int) -> None:
    if worker_id > MAX_WORKER_ID:
        raise MessageRejected(OUT_OF_RANGE, f"worker_id {worker_id} does not fit in 64 bits")


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
    raw = _decode(_load_decoder, payload, max_bytes)
    _check_worker_id(raw.worker_id)
    return LoadEvent(worker_id=raw.worker_id, data=_normalise(raw.data), endpoint=raw.endpoint)


def decode_forward_pass_metrics(payload: bytes, max_bytes: int) -> ForwardPassMetrics:
    """A bare ForwardPassMetrics (any shape), as a NATS service's stats handler returns it."""
    return _normalise(_decode(_forward_pass_decoder, payload, max_bytes))


def decode_hit_rate_event(payload: bytes, max_bytes: int) -> KvHitRateEvent:
    event = _decode(_hit_rate_decoder, payload, max_bytes)
    _check_worker_id(event.worker_id)
    if event.overlap_blocks > event.isl_blocks:
        raise MessageRejected(
            INCONSISTENT, f"overlap_blocks {event.overlap_blocks} > isl_blocks {event.isl_blocks}"
        )
    return event


def decode_metrics_snapshot(payload: bytes, max_bytes: int) -> MetricsSnapshot:
    """The envelope, and `families` typed; the text or families are checked by `component_metrics`."""
    snapshot = _decode(_snapshot_decoder, payload, max_bytes)
    _check_worker_id(snapshot.worker_id)
    if (snapshot.text is None) == (snapshot.families is None):
        if snapshot.text is None:
            raise MessageRejected(MISSING_FIELD, "a metrics snapshot needs `text` or `families`")
        raise MessageRejected(INCONSISTENT, "a metrics snapshot has `text` or `families`, not both")
    return snapshot


def encode(message: Struct) -> bytes:
    """JSON as Dynamo's serde writes it (absent optionals as null)."""
    return _encoder.encode(message)


def encode_json(value: object) -> bytes:
    """Any mix of dicts, lists and the structures above, as JSON."""
    return _encoder.encode(value)


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


# NATS service API stats (pull mode) ----------------------------------------------------
#
# Dynamo workers also expose their ForwardPassMetrics through the NATS service API: a
# `$SRV.STATS.{service}` request is answered by every instance of the service with one
# `io.nats.micro.v1.stats_response`, whose endpoints carry the metrics in `data`.
# Only `subject` and `data` are used; the other fields are optional here so that a
# framework that omits a counter does not cost us the load data.

STATS_RESPONSE_TYPE: Final = "io.nats.micro.v1.stats_response"


class StatsEndpoint(Struct, gc=False):
    """One endpoint of a stats reply; `data` is kept raw and decoded on its own."""

    subject: str
    name: str | None = None
    # Raw, not Raw | None: msgspec would then only accept null. Absent reads as null.
    data: msgspec.Raw = msgspec.Raw(b"null")
    queue_group: str | None = None
    num_requests: int | None = None
    num_errors: int | None = None
    last_error: str | None = None
    processing_time: int | None = None
    average_processing_time: int | None = None


class StatsReply(Struct, gc=False):
    """A service instance's stats reply; endpoints are kept raw so one bad entry cannot spoil the others."""

    endpoints: list[msgspec.Raw]
    name: str | None = None
    id: str | None = None
    version: str | None = None
    started: str | None = None
    type: str | None = None


_stats_reply_decoder = msgspec.json.Decoder(StatsReply)
_stats_endpoint_decoder = msgspec.json.Decoder(StatsEndpoint)


def decode_stats_reply(payload: bytes, max_bytes: int) -> StatsReply:
    """The envelope of a `$SRV.STATS` reply; its endpoints stay undecoded (`decode_stats_endpoint`)."""
    return _decode(_stats_reply_decoder, payload, max_bytes)


def decode_stats_endpoint(raw: msgspec.Raw) -> StatsEndpoint:
    """One endpoint entry of a stats reply (its `data` still raw); the reply's size was checked already."""
    return _decode(_stats_endpoint_decoder, raw, len(raw))


# GPU telemetry ------------------------------------------------------------------------
#
# One message per worker (per data-parallel rank) per sampling interval, on
# `namespace.{ns}.component.{component}.gpu_metrics`. Readings are in the units
# dcgm-exporter exports (%, MiB, °C, W, mJ, MHz); the sampler converts NVML's mW and
# bytes. A field the GPU does not support is absent, never 0. The bounds are physical
# ceilings with a wide margin: NVML's "not available" sentinels (0xFFFFFFFF and the like)
# fall outside them, so a sentinel can never travel as a reading.

GPU_METRICS: Final = "gpu_metrics"

# Chosen so that the largest legal message (64 GPUs, 32 processes each, every string at
# its limit) stays under the aggregator's default --max-message-bytes of 256 KiB.
MAX_GPUS_PER_MESSAGE: Final = 64
MAX_PROCESSES_PER_GPU: Final = 32
MAX_GPU_TEXT_LENGTH: Final = 128
MAX_HOSTNAME_LENGTH: Final = 253  # a DNS name

GpuIndex = Annotated[int, Meta(ge=0, le=1023)]
Percent = Annotated[int, Meta(ge=0, le=100)]
MiB = Annotated[int, Meta(ge=0, le=2**30)]  # 1 PiB of framebuffer
Celsius = Annotated[int, Meta(ge=0, le=250)]
Watts = Annotated[float, Meta(ge=0.0, le=100_000.0)]
MilliJoules = Annotated[int, Meta(ge=0)]  # since driver load; a u64 in NVML, int64 here (292 years at 1 kW)
MHz = Annotated[int, Meta(ge=0, le=100_000)]
Pid = Annotated[int, Meta(ge=0, le=2**32 - 1)]
GpuText = Annotated[str, Meta(max_length=MAX_GPU_TEXT_LENGTH)]


class GpuProcess(Struct, omit_defaults=True, gc=False):
    """A process holding memory on the GPU (NVML's compute processes)."""

    pid: Pid
    used_memory_mib: MiB | None = None  # None where NVML cannot tell (e.g. WDDM, some containers)


class GpuReading(Struct, omit_defaults=True, gc=False):
    """One GPU, read once. Identity fields first, then dcgm-exporter's default fields."""

    index: GpuIndex  # NVML index: dcgm-exporter's `gpu` label
    uuid: GpuText  # "GPU-xxxxxxxx-..."
    name: GpuText  # model, dcgm-exporter's `modelName`
    pci_bus_id: GpuText = ""
    gpu_util: Percent | None = None
    mem_copy_util: Percent | None = None
    fb_used_mib: MiB | None = None
    fb_free_mib: MiB | None = None
    fb_reserved_mib: MiB | None = None
    fb_total_mib: MiB | None = None
    gpu_temp_c: Celsius | None = None
    memory_temp_c: Celsius | None = None
    power_usage_w: Watts | None = None
    total_energy_mj: MilliJoules | None = None
    sm_clock_mhz: MHz | None = None
    mem_clock_mhz: MHz | None = None
    processes: Annotated[list[GpuProcess], Meta(max_length=MAX_PROCESSES_PER_GPU)] = []


class GpuMetricsEvent(Struct, omit_defaults=True, gc=False):
    """The GPUs one worker (one data-parallel rank of it) uses, read at one instant.

    `gpus` is empty when the worker has no usable GPU; `sampler_error` then says why
    (e.g. "NVMLError_LibraryNotFound"), so a fleet can tell "no GPU" from "no reports".
    """

    worker_id: WorkerId
    hostname: Annotated[str, Meta(max_length=MAX_HOSTNAME_LENGTH)] = ""
    endpoint: EndpointName = DEFAULT_ENDPOINT
    dp_rank: Rank | None = None
    driver_version: GpuText | None = None
    gpus: Annotated[list[GpuReading], Meta(max_length=MAX_GPUS_PER_MESSAGE)] = []
    sampler_error: GpuText | None = None


_gpu_metrics_decoder = msgspec.json.Decoder(GpuMetricsEvent)


def check_gpu_metrics(event: GpuMetricsEvent) -> None:
    """Reject readings that contradict themselves: two GPUs with one identity, used > total."""
    _check_worker_id(event.worker_id)
    indexes: set[int] = set()
    uuids: set[str] = set()
    for gpu in event.gpus:
        if gpu.index in indexes or (gpu.uuid and gpu.uuid in uuids):
            raise MessageRejected(INCONSISTENT, f"GPU {gpu.index} ({gpu.uuid}) appears twice")
        indexes.add(gpu.index)
        uuids.add(gpu.uuid)
        if gpu.fb_total_mib is not None:
            for name in ("fb_used_mib", "fb_free_mib", "fb_reserved_mib"):
                value = getattr(gpu, name)
                if value is not None and value > gpu.fb_total_mib:
                    raise MessageRejected(
                        INCONSISTENT, f"GPU {gpu.index}: {name} {value} > fb_total_mib {gpu.fb_total_mib}"
                    )


def decode_gpu_metrics(payload: bytes, max_bytes: int) -> GpuMetricsEvent:
    event = _decode(_gpu_metrics_decoder, payload, max_bytes)
    check_gpu_metrics(event)
    return event
