"""Why something is not used: every reject reason of the aggregator, each defined once.

A reason is a label value of `llm_aggregator_messages_rejected_total{kind,reason}` or
`llm_aggregator_stats_scrape_errors_total{service,reason}`. This is the bottom of the
aggregator's layers, so every layer can name a reason: the fleet state raises the limit
ones, ingest the decode ones, the pull-mode edge its own. `DESCRIPTIONS` lists them all
with one line each: the counters of a kind are created at 0 from it, and docs quote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# Defined by the protocol package, where the decoders raise them.
from fleet_protocol.errors import (
    INCONSISTENT,
    MISSING_FIELD,
    NOT_JSON,
    NOT_MSGPACK,
    OUT_OF_RANGE,
    OVERSIZED,
    WRONG_TYPE,
)

# Cardinality limits of the fleet state: a new worker, group or series is refused.
WORKER_LIMIT: Final = "worker_limit"
GROUP_LIMIT: Final = "group_limit"
LABEL_LIMIT: Final = "label_limit"
SERIES_LIMIT: Final = "series_limit"

# Dynamo 1.x's event plane: an envelope its publisher's sequence already passed (seen twice: two brokers,
# or one publisher on two planes), dropped so that it is applied once.
DUPLICATE: Final = "duplicate"

# Workers' own metrics (MetricsRegistry snapshots).
NOT_EXPOSITION: Final = "not_exposition"
BAD_NAME: Final = "bad_name"
RESERVED_NAME: Final = "reserved_name"
BAD_FAMILY: Final = "bad_family"
TYPE_CONFLICT: Final = "type_conflict"

# Pull mode: one endpoint entry of a `$SRV.STATS` reply.
NO_WORKER_ID: Final = "no_worker_id"
NO_DATA: Final = "no_data"

# Pull mode: a stats request that could not be made.
NOT_CONNECTED: Final = "not_connected"
REQUEST_FAILED: Final = "request_failed"

WIRE: Final = (OVERSIZED, NOT_JSON, MISSING_FIELD, WRONG_TYPE, OUT_OF_RANGE, INCONSISTENT)
# Dynamo 1.x's event plane is MessagePack: the reason its decoders give where the JSON ones say not_json.
EVENT_WIRE: Final = (NOT_MSGPACK,)
EVENT_STREAM: Final = (DUPLICATE,)
# What a new worker can run into, whatever the message that brings it.
WORKER_LIMITS: Final = (WORKER_LIMIT, GROUP_LIMIT, LABEL_LIMIT)
COMPONENT_METRICS: Final = (NOT_EXPOSITION, SERIES_LIMIT, BAD_NAME, RESERVED_NAME, BAD_FAMILY, TYPE_CONFLICT)
STATS_ENDPOINT: Final = (NO_WORKER_ID, NO_DATA)
STATS_REQUEST: Final = (NOT_CONNECTED, REQUEST_FAILED)

DESCRIPTIONS: Final[Mapping[str, str]] = MappingProxyType({
    OVERSIZED: "larger than the configured maximum size (--max-message-bytes, --component-metrics-max-bytes)",
    NOT_JSON: "not JSON: bad syntax, invalid UTF-8 or nested too deep",
    NOT_MSGPACK: "not MessagePack (Dynamo 1.x event plane): bad bytes, invalid UTF-8 or nested too deep",
    MISSING_FIELD: "a required field is absent",
    WRONG_TYPE: "a field, an entry or the subject has the wrong type or shape",
    OUT_OF_RANGE: "a number or a text outside its allowed range (negative, too large, too long)",
    INCONSISTENT: "fields that contradict each other (e.g. more active blocks than blocks)",
    DUPLICATE: "a Dynamo 1.x event its publisher's sequence already passed (received twice: two ZMQ brokers, "
               "or NATS and ZMQ at once); applied once",
    WORKER_LIMIT: "a new worker past --max-workers; known workers are still taken",
    GROUP_LIMIT: "a new component endpoint past --max-groups; known ones are still taken",
    LABEL_LIMIT: "a component name longer than a label value may be",
    SERIES_LIMIT: "a snapshot with more series than one worker or the whole fleet may hold",
    NOT_EXPOSITION: "a snapshot whose text is not the Prometheus text format",
    BAD_NAME: "a family outside --component-metrics-prefixes (that family is dropped)",
    RESERVED_NAME: "a family named like the aggregator's own llm_*, process_*, python_* (that family is dropped)",
    BAD_FAMILY: "a family Prometheus or OpenMetrics would refuse (that family is dropped)",
    TYPE_CONFLICT: "a family whose type differs from other live workers' (that family is dropped)",
    NO_WORKER_ID: "a stats endpoint without the worker id suffix `-{hex}`",
    NO_DATA: "a stats endpoint without data: the worker has no stats handler (yet)",
    NOT_CONNECTED: "a stats poll skipped: not connected to NATS",
    REQUEST_FAILED: "a stats request that NATS refused or that failed mid-way",
})

__all__ = [
    "BAD_FAMILY", "BAD_NAME", "COMPONENT_METRICS", "DESCRIPTIONS", "DUPLICATE", "EVENT_STREAM", "EVENT_WIRE", "GROUP_LIMIT", "INCONSISTENT",
    "LABEL_LIMIT", "MISSING_FIELD", "NOT_CONNECTED", "NOT_EXPOSITION", "NOT_JSON", "NOT_MSGPACK", "NO_DATA",
    "NO_WORKER_ID", "OUT_OF_RANGE", "OVERSIZED", "REQUEST_FAILED", "RESERVED_NAME", "SERIES_LIMIT", "STATS_ENDPOINT",
    "STATS_REQUEST", "TYPE_CONFLICT", "WIRE", "WORKER_LIMIT", "WORKER_LIMITS", "WRONG_TYPE",
]
