"""The NATS service API's stats replies (pull mode) and Dynamo's service and endpoint naming."""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

from .codec import decode
from .errors import OUT_OF_RANGE, MessageRejected
from .values import Count

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
    return decode(_stats_reply_decoder, payload, max_bytes)


def decode_stats_endpoint(raw: msgspec.Raw) -> StatsEndpoint:
    """One endpoint entry of a stats reply (its `data` still raw); the reply's size was checked already."""
    return decode(_stats_endpoint_decoder, raw, len(raw))


# Naming -------------------------------------------------------------------------------

STATS_PREFIX: Final = "$SRV.STATS"

_NOT_SLUG = re.compile(r"[^a-z0-9_-]")
_HEX = re.compile(r"[0-9a-fA-F]+")
_MAX_HEX_DIGITS: Final = 16


def slugify(text: str) -> str:
    """Dynamo's `Slug::slugify`: lower-case, anything outside [a-z0-9_-] becomes `_`, leading `_` trimmed."""
    return _NOT_SLUG.sub("_", text.lower()).lstrip("_")


def service_name(namespace: str, component: str) -> str:
    """The NATS service a Dynamo component's workers run (Dynamo since May 2025)."""
    return slugify(f"{namespace}_{component}")


def stats_subject(service: str) -> str:
    """Where a stats request reaches every instance of `service`."""
    return f"{STATS_PREFIX}.{service}"


def endpoint_name(endpoint: str, worker_id: int) -> str:
    """A worker's endpoint name in its service: `{endpoint}-{worker_id as lower-case hex}`."""
    return f"{endpoint}-{worker_id:x}"


def endpoint_subject(service: str, endpoint: str, worker_id: int) -> str:
    return f"{service}.{endpoint_name(endpoint, worker_id)}"


def parse_worker_id(text: str) -> int | None:
    """The worker id a hex suffix names (1-16 hex digits, as Dynamo prints a 64-bit lease id).

    None if `text` is not hex at all; MessageRejected(out_of_range) if it is hex but
    wider than 64 bits.
    """
    if _HEX.fullmatch(text) is None:
        return None
    if len(text.lstrip("0")) > _MAX_HEX_DIGITS:
        raise MessageRejected(OUT_OF_RANGE, f"worker id {text!r} does not fit in 64 bits")
    return int(text, 16)



# Dynamo 1.x ----------------------------------------------------------------------------
#
# With the `nats` request plane a 1.x worker still answers `$SRV.STATS.{service}`, but as a
# plain NATS micro service: no `data`, only the framework's counters. Each worker's endpoint
# is named `{service}-{endpoint}-{hex}` (subject `{service}.{endpoint}-{hex}`, queue group `q`).
# With the default `tcp` request plane there is no NATS service and no reply at all.

Nanoseconds = Annotated[int, Meta(ge=0)]
MAX_NANOSECONDS: Final = 2**64 - 1
DYNAMO_QUEUE_GROUP: Final = "q"


class EndpointStatsV1(Struct, gc=False):
    """A 1.x endpoint entry; fields in the order async-nats writes them."""

    name: str
    subject: str
    num_requests: Count
    num_errors: Count
    processing_time: Nanoseconds  # total, nanoseconds
    average_processing_time: Nanoseconds = 0
    last_error: str = ""
    queue_group: str | None = DYNAMO_QUEUE_GROUP


class StatsReplyV1(Struct, tag_field="type", tag=STATS_RESPONSE_TYPE, gc=False):
    """A whole 1.x reply, for publishers (mock workers); readers keep using `decode_stats_reply`."""

    name: str
    id: str
    version: str
    started: str
    endpoints: list[EndpointStatsV1]


_endpoint_stats_v1_decoder = msgspec.json.Decoder(EndpointStatsV1)
_stats_encoder = msgspec.json.Encoder()


def has_stats_data(entry: StatsEndpoint) -> bool:
    """Whether an entry carries Dynamo 0.x ForwardPassMetrics in `data` (a 1.x entry never does)."""
    return bytes(entry.data) != b"null"


def decode_endpoint_stats_v1(raw: msgspec.Raw) -> EndpointStatsV1:
    """The counters of one endpoint entry; the reply's size was checked already."""
    stats: EndpointStatsV1 = decode(_endpoint_stats_v1_decoder, raw, len(raw))
    for value in (stats.processing_time, stats.average_processing_time):
        if value > MAX_NANOSECONDS:
            raise MessageRejected(OUT_OF_RANGE, f"processing time {value} ns does not fit in 64 bits")
    return stats


def encode_stats_reply_v1(reply: StatsReplyV1) -> bytes:
    return _stats_encoder.encode(reply)


def instance_endpoint_name(service: str, endpoint: str, worker_id: int) -> str:
    """A 1.x endpoint entry's `name`: `{service}-{endpoint}-{worker_id as lower-case hex}`."""
    return f"{service}-{endpoint_name(endpoint, worker_id)}"


def parse_instance_endpoint_name(name: str, service: str) -> tuple[str, int] | None:
    """(endpoint, worker_id) of a 1.x entry name of `service`; None if the name is not of that shape."""
    prefix = service + "-"
    if not name.startswith(prefix):
        return None
    endpoint, dash, suffix = name[len(prefix):].rpartition("-")
    if not dash or not endpoint:
        return None
    worker_id = parse_worker_id(suffix)
    return None if worker_id is None else (endpoint, worker_id)
