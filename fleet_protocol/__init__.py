"""The wire protocol: every message that travels between workers and the aggregator.

Wire types and their decoding only (msgspec), no I/O: the worker library encodes them, the
aggregator decodes them, and both import this package alone for it. The JSON of the legacy
modules is what NVIDIA Dynamo 0.1-0.5 workers and KV router put on core NATS.
"""

from __future__ import annotations

__version__ = "0.2.0"

from .codec import decode, encode, encode_json
from .errors import (
    INCONSISTENT,
    MISSING_FIELD,
    NOT_JSON,
    OUT_OF_RANGE,
    OVERSIZED,
    REJECT_REASONS,
    WRONG_TYPE,
    MessageRejected,
)
from .gpu import (
    GPU_METRICS,
    MAX_GPU_TEXT_LENGTH,
    MAX_GPUS_PER_MESSAGE,
    MAX_HOSTNAME_LENGTH,
    MAX_PROCESSES_PER_GPU,
    Celsius,
    GpuIndex,
    GpuMetricsEvent,
    GpuProcess,
    GpuReading,
    GpuText,
    MHz,
    MiB,
    MilliJoules,
    Percent,
    Pid,
    Watts,
    check_gpu_metrics,
    decode_gpu_metrics,
)
from .hit_rate import KvHitRateEvent, decode_hit_rate_event
from .load import (
    ForwardPassMetrics,
    KvStats,
    LoadEvent,
    SpecDecodeStats,
    WorkerStats,
    check_forward_pass_metrics,
    decode_forward_pass_metrics,
    decode_load_event,
    flat_forward_pass_metrics,
)
from .names import LABEL_NAME, METRIC_NAME
from .service_stats import (
    STATS_PREFIX,
    STATS_RESPONSE_TYPE,
    StatsEndpoint,
    StatsReply,
    decode_stats_endpoint,
    decode_stats_reply,
    endpoint_name,
    endpoint_subject,
    parse_worker_id,
    service_name,
    slugify,
    stats_subject,
)
from .snapshots import (
    MetricsSnapshot,
    SnapshotFamily,
    SnapshotSample,
    decode_metrics_snapshot,
    sample_value,
    snapshot_value,
)
from .subjects import (
    COMPONENT_METRICS,
    DEFAULT_COMPONENT,
    DEFAULT_ENDPOINT,
    DEFAULT_NAMESPACE,
    KV_HIT_RATE,
    KV_METRICS,
    component_of,
    component_subject,
    namespace_subject,
)
from .values import (
    MAX_COUNT,
    MAX_LABEL_LENGTH,
    MAX_WORKER_ID,
    Count,
    EndpointName,
    Fraction,
    Rank,
    WorkerId,
    check_worker_id,
)

__all__ = ['__version__', 'KV_METRICS', 'KV_HIT_RATE', 'COMPONENT_METRICS', 'DEFAULT_NAMESPACE', 'DEFAULT_COMPONENT', 'DEFAULT_ENDPOINT', 'namespace_subject', 'component_subject', 'component_of', 'OVERSIZED', 'NOT_JSON', 'MISSING_FIELD', 'WRONG_TYPE', 'OUT_OF_RANGE', 'INCONSISTENT', 'REJECT_REASONS', 'MessageRejected', 'decode', 'encode', 'encode_json', 'MAX_COUNT', 'MAX_LABEL_LENGTH', 'Count', 'Fraction', 'MAX_WORKER_ID', 'WorkerId', 'Rank', 'EndpointName', 'check_worker_id', 'WorkerStats', 'KvStats', 'SpecDecodeStats', 'ForwardPassMetrics', 'LoadEvent', 'check_forward_pass_metrics', 'decode_load_event', 'decode_forward_pass_metrics', 'flat_forward_pass_metrics', 'KvHitRateEvent', 'decode_hit_rate_event', 'SnapshotSample', 'SnapshotFamily', 'MetricsSnapshot', 'snapshot_value', 'sample_value', 'decode_metrics_snapshot', 'STATS_RESPONSE_TYPE', 'StatsEndpoint', 'StatsReply', 'decode_stats_reply', 'decode_stats_endpoint', 'STATS_PREFIX', 'slugify', 'service_name', 'stats_subject', 'endpoint_name', 'endpoint_subject', 'parse_worker_id', 'GPU_METRICS', 'MAX_GPUS_PER_MESSAGE', 'MAX_PROCESSES_PER_GPU', 'MAX_GPU_TEXT_LENGTH', 'MAX_HOSTNAME_LENGTH', 'GpuIndex', 'Percent', 'MiB', 'Celsius', 'Watts', 'MilliJoules', 'MHz', 'Pid', 'GpuText', 'GpuProcess', 'GpuReading', 'GpuMetricsEvent', 'check_gpu_metrics', 'decode_gpu_metrics', 'METRIC_NAME', 'LABEL_NAME']
