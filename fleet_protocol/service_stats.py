"""The NATS service API's stats replies (pull mode) and Dynamo's service and endpoint naming."""

from __future__ import annotations

import re
from typing import Final

import msgspec
from msgspec import Struct

from .codec import decode
from .errors import OUT_OF_RANGE, MessageRejected

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

