"""The wire protocol: every message that travels between workers and the aggregator.

Wire types and their decoding only (msgspec), no I/O: the worker library encodes them, the
aggregator decodes them, and both import this package alone for it. The JSON of the legacy
modules is what NVIDIA Dynamo 0.1-0.5 workers and KV router put on core NATS; the
MessagePack of event_plane, active_load, forward_pass and kv_events, and the JSON of
discovery, are what Dynamo 1.x workers publish and register.
"""

from __future__ import annotations

__version__ = "0.2.0"

from .active_load import ActiveLoad, decode_active_load, encode_active_load
from .codec import decode, encode, encode_json
from .discovery import (
    BUCKETS,
    ETCD_LEASE_TTL_S,
    EVENT_CHANNELS,
    EVENT_SOURCES,
    FILE_ENTRY_TTL_S,
    FILE_KEEP_ALIVE_S,
    INSTANCES,
    MODEL_CARDS,
    DiscoveryEntry,
    DiscoveryKey,
    EndpointScope,
    EventChannelEntry,
    EventScope,
    EventSourceEntry,
    InstanceEntry,
    ModelCard,
    ModelEntry,
    NatsConfig,
    NatsTransport,
    RuntimeConfig,
    SourceMetadata,
    SourceWorker,
    ZmqConfig,
    ZmqTransport,
    decode_discovery_entry,
    decode_keyed_entry,
    encode_discovery_entry,
    event_channel_key,
    file_name,
    instance_key,
    key_of_file,
    model_card_key,
    parse_discovery_key,
)
from .errors import (
    EVENT_REJECT_REASONS,
    INCONSISTENT,
    MISSING_FIELD,
    NOT_JSON,
    NOT_MSGPACK,
    OUT_OF_RANGE,
    OVERSIZED,
    REJECT_REASONS,
    WRONG_TYPE,
    MessageRejected,
)
from .event_plane import (
    EVENT_TOPICS,
    FORWARD_PASS_METRICS_TOPIC,
    KV_EVENTS_TOPIC,
    KV_METRICS_TOPIC,
    ZMQ_FRAME_VERSION,
    EventEnvelope,
    EventSubject,
    ZmqEvent,
    component_event_subject,
    decode_envelope,
    decode_event_segment,
    decode_zmq_frames,
    encode_envelope,
    encode_event_segment,
    encode_zmq_frames,
    endpoint_event_subject,
    event_subject_pattern,
    parse_event_subject,
)
from .forward_pass import (
    FORWARD_PASS_METRICS_VERSION,
    ForwardPassMetricsV1,
    QueuedRequests,
    ScheduledRequests,
    decode_forward_pass_v1,
    encode_forward_pass_v1,
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
from .kv_events import (
    CLEARED,
    REMOVED,
    STORED,
    KvCacheEvent,
    KvEventData,
    KvRemoved,
    KvStored,
    RouterEvent,
    StoredBlock,
    decode_kv_events,
    encode_kv_events,
)
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
from .msgpack_codec import decode_msgpack, encode_msgpack
from .names import LABEL_NAME, METRIC_NAME
from .service_stats import (
    STATS_PREFIX,
    STATS_RESPONSE_TYPE,
    EndpointStatsV1,
    StatsEndpoint,
    StatsReply,
    StatsReplyV1,
    decode_endpoint_stats_v1,
    decode_stats_endpoint,
    decode_stats_reply,
    encode_stats_reply_v1,
    endpoint_name,
    endpoint_subject,
    has_stats_data,
    instance_endpoint_name,
    parse_instance_endpoint_name,
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

__all__ = ['__version__', 'KV_METRICS', 'KV_HIT_RATE', 'COMPONENT_METRICS', 'DEFAULT_NAMESPACE', 'DEFAULT_COMPONENT', 'DEFAULT_ENDPOINT', 'namespace_subject', 'component_subject', 'component_of', 'OVERSIZED', 'NOT_JSON', 'MISSING_FIELD', 'WRONG_TYPE', 'OUT_OF_RANGE', 'INCONSISTENT', 'REJECT_REASONS', 'MessageRejected', 'decode', 'encode', 'encode_json', 'MAX_COUNT', 'MAX_LABEL_LENGTH', 'Count', 'Fraction', 'MAX_WORKER_ID', 'WorkerId', 'Rank', 'EndpointName', 'check_worker_id', 'WorkerStats', 'KvStats', 'SpecDecodeStats', 'ForwardPassMetrics', 'LoadEvent', 'check_forward_pass_metrics', 'decode_load_event', 'decode_forward_pass_metrics', 'flat_forward_pass_metrics', 'KvHitRateEvent', 'decode_hit_rate_event', 'SnapshotSample', 'SnapshotFamily', 'MetricsSnapshot', 'snapshot_value', 'sample_value', 'decode_metrics_snapshot', 'STATS_RESPONSE_TYPE', 'StatsEndpoint', 'StatsReply', 'decode_stats_reply', 'decode_stats_endpoint', 'STATS_PREFIX', 'slugify', 'service_name', 'stats_subject', 'endpoint_name', 'endpoint_subject', 'parse_worker_id', 'GPU_METRICS', 'MAX_GPUS_PER_MESSAGE', 'MAX_PROCESSES_PER_GPU', 'MAX_GPU_TEXT_LENGTH', 'MAX_HOSTNAME_LENGTH', 'GpuIndex', 'Percent', 'MiB', 'Celsius', 'Watts', 'MilliJoules', 'MHz', 'Pid', 'GpuText', 'GpuProcess', 'GpuReading', 'GpuMetricsEvent', 'check_gpu_metrics', 'decode_gpu_metrics', 'METRIC_NAME', 'LABEL_NAME', 'NOT_MSGPACK', 'EVENT_REJECT_REASONS', 'decode_msgpack', 'encode_msgpack', 'EVENT_TOPICS', 'KV_METRICS_TOPIC', 'FORWARD_PASS_METRICS_TOPIC', 'KV_EVENTS_TOPIC', 'ZMQ_FRAME_VERSION', 'EventEnvelope', 'EventSubject', 'ZmqEvent', 'decode_envelope', 'encode_envelope', 'encode_event_segment', 'decode_event_segment', 'endpoint_event_subject', 'component_event_subject', 'event_subject_pattern', 'parse_event_subject', 'decode_zmq_frames', 'encode_zmq_frames', 'ActiveLoad', 'decode_active_load', 'encode_active_load', 'FORWARD_PASS_METRICS_VERSION', 'ForwardPassMetricsV1', 'ScheduledRequests', 'QueuedRequests', 'decode_forward_pass_v1', 'encode_forward_pass_v1', 'CLEARED', 'STORED', 'REMOVED', 'StoredBlock', 'KvStored', 'KvRemoved', 'KvEventData', 'KvCacheEvent', 'RouterEvent', 'decode_kv_events', 'encode_kv_events', 'BUCKETS', 'INSTANCES', 'MODEL_CARDS', 'EVENT_CHANNELS', 'EVENT_SOURCES', 'ETCD_LEASE_TTL_S', 'FILE_ENTRY_TTL_S', 'FILE_KEEP_ALIVE_S', 'DiscoveryKey', 'DiscoveryEntry', 'InstanceEntry', 'ModelEntry', 'ModelCard', 'RuntimeConfig', 'EventChannelEntry', 'EventSourceEntry', 'EventScope', 'EndpointScope', 'NatsConfig', 'ZmqConfig', 'NatsTransport', 'ZmqTransport', 'SourceMetadata', 'SourceWorker', 'parse_discovery_key', 'instance_key', 'model_card_key', 'event_channel_key', 'file_name', 'key_of_file', 'decode_discovery_entry', 'decode_keyed_entry', 'encode_discovery_entry', 'EndpointStatsV1', 'StatsReplyV1', 'decode_endpoint_stats_v1', 'encode_stats_reply_v1', 'has_stats_data', 'instance_endpoint_name', 'parse_instance_endpoint_name']
