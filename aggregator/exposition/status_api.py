"""The status API's documents (`/api/v1/...`), version 1: what a program reads about the fleet.

Field names and meanings are stable within a version (docs/status-page.md): fields may be
added, none renamed, retyped or removed without a new `api_version`. Times are Unix seconds
(floats); ages and durations are seconds; a value a worker never reported is `null`, never 0.
The same documents feed the HTML page (status_html.py), so the page shows what programs get.
"""

from __future__ import annotations

from msgspec import Struct

API_VERSION = 1


class NatsConnection(Struct, kw_only=True):
    """The aggregator's NATS connection (push, pull and the journal share it)."""

    connected: bool
    subscribed: bool  # subscribed and settled: the aggregator is ready (/health)
    servers: list[str]  # as configured, credentials masked
    server: str | None  # host:port of the server connected to now
    reconnects: int  # since the aggregator started
    messages_in: int
    bytes_in: int


class GroupSummary(Struct, kw_only=True):
    """One component endpoint: its live workers and their statistics, as /metrics exports them."""

    component: str
    endpoint: str
    workers: int  # live
    expired: int  # workers dropped after stale_after since the aggregator started
    load_avg: float | None  # llm_load_avg: mean kv_active_blocks of the workers that reported load
    load_std: float | None  # llm_load_std: its population standard deviation
    kv_blocks_active: int
    kv_blocks_total: int
    kv_usage_percent: float | None  # 100 * active / total over the group; null without blocks
    hit_rate_percent: float | None  # llm_fleet_kv_hit_rate_percent: cumulative, expired workers included
    gpus: int  # GPUs of the group's workers with fresh readings


class Summary(Struct, kw_only=True):
    """`/api/v1/summary`."""

    api_version: int = API_VERSION
    generated_at: float
    uptime_seconds: float
    workers: int
    max_workers: int  # --max-workers: past it, a new worker is refused (reason worker_limit)
    stale_after_seconds: float
    kv_blocks_active: int
    kv_blocks_total: int
    kv_usage_percent: float | None
    hit_rate_percent: float | None  # over every group, expired workers included
    gpus: int
    messages_received: int  # every source, every kind (the counts of llm_aggregator_messages_*_total)
    messages_accepted: int
    messages_rejected: int
    groups: list[GroupSummary]
    nats: NatsConnection
    discovery: dict[str, object] | None = None  # null until the aggregator reads a discovery store


class Worker(Struct, kw_only=True):
    """One worker: one data-parallel rank of one worker process on one component endpoint."""

    component: str
    endpoint: str
    worker_id: int  # up to 2**64-1: JavaScript's Number is exact only up to 2**53
    dp_rank: int
    source: str | None  # where its load reports come from: "nats" (push), "pull", ...; null: none yet
    discovery: str | None = None  # its discovery status; null until the aggregator reads a discovery store
    last_seen: float  # the last message from it, of any kind
    age_seconds: float
    expires_in_seconds: float  # dropped (with all its series) if silent that much longer
    kv_blocks_active: int | None
    kv_blocks_total: int | None
    kv_usage_percent: float | None
    slots_active: int | None
    slots_total: int | None
    requests_waiting: int | None
    hit_rate_percent: float | None  # cumulative, from the hit-rate events naming it
    isl_blocks: int
    overlap_blocks: int
    gpus: int  # GPUs in its latest reading, while fresher than stale_after
    component_series: int  # series of its own metrics (MetricsRegistry snapshot) re-exported


class WorkerFilters(Struct, kw_only=True):
    component: str | None = None
    endpoint: str | None = None
    source: str | None = None
    q: str | None = None


class WorkersPage(Struct, kw_only=True):
    """`/api/v1/workers`: one page of the workers that match the filters, in the order asked."""

    api_version: int = API_VERSION
    generated_at: float
    total: int  # every live worker
    matched: int  # those that match the filters
    page: int
    page_size: int
    pages: int
    sort: str
    order: str
    filters: WorkerFilters
    workers: list[Worker]


class Gpu(Struct, kw_only=True):
    index: int
    name: str
    uuid: str
    gpu_util_percent: float | None
    fb_used_mib: float | None
    fb_total_mib: float | None
    temperature_c: float | None
    power_w: float | None


class WorkerDetail(Struct, kw_only=True):
    """`/api/v1/workers/{component}/{endpoint}/{worker_id}/{dp_rank}`."""

    api_version: int = API_VERSION
    generated_at: float
    worker: Worker
    hostname: str | None  # from its GPU readings
    gpu_driver_version: str | None
    gpu_sampler_error: str | None
    gpu_list: list[Gpu]
    component_families: list[str]  # names of its own metric families re-exported


class KindCounts(Struct, kw_only=True):
    """One source's messages of one kind, as llm_aggregator_messages_*_total count them."""

    source: str
    kind: str
    received: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]  # reasons with a count above 0


class RejectedMessage(Struct, kw_only=True):
    at: float
    age_seconds: float
    reason: str
    detail: str
    payload: str  # its first bytes as text; bytes that are not UTF-8 as \\xNN escapes
    payload_bytes: int  # the whole payload's size
    truncated: bool  # payload holds only the first bytes


class SubjectCounts(Struct, kw_only=True):
    """What one source received on one subject (an exact subject, not a pattern)."""

    source: str
    subject: str
    kind: str
    received: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    last_seen: float | None
    age_seconds: float | None
    last_rejected: list[RejectedMessage]  # newest first


class Publisher(Struct, kw_only=True):
    """An event-plane publisher (Dynamo 1.x): its sequence, gaps and restarts."""

    source: str
    publisher_id: int
    topic: str
    worker_id: int | None
    dp_rank: int | None
    last_sequence: int
    gaps: int  # sequence numbers skipped
    restarts: int  # sequence went back to the start
    last_seen: float
    age_seconds: float


class Sources(Struct, kw_only=True):
    """`/api/v1/sources`."""

    api_version: int = API_VERSION
    generated_at: float
    kinds: list[KindCounts]
    subjects: list[SubjectCounts]
    publishers: list[Publisher]  # empty until the aggregator reads the 1.x event plane
    reasons: dict[str, str]  # every reject reason, with what it means
    nats: NatsConnection
    discovery: dict[str, object] | None = None


class ApiError(Struct, kw_only=True):
    """Any 4xx answer of /api/v1."""

    api_version: int = API_VERSION
    error: str  # "bad_request", "not_found"
    message: str
