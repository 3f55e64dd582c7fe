"""Snapshots of a worker's metrics registry, re-exported by the aggregator with `worker_id`."""

from __future__ import annotations

import math
from typing import Final

import msgspec
from msgspec import Struct

from .codec import decode
from .errors import INCONSISTENT, MISSING_FIELD, WRONG_TYPE, MessageRejected
from .subjects import DEFAULT_ENDPOINT
from .values import EndpointName, Rank, WorkerId, check_worker_id


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


_snapshot_decoder = msgspec.json.Decoder(MetricsSnapshot)


def decode_metrics_snapshot(payload: bytes, max_bytes: int) -> MetricsSnapshot:
    """The envelope, and `families` typed; the text or families are checked by `component_metrics`."""
    snapshot = decode(_snapshot_decoder, payload, max_bytes)
    check_worker_id(snapshot.worker_id)
    if (snapshot.text is None) == (snapshot.families is None):
        if snapshot.text is None:
            raise MessageRejected(MISSING_FIELD, "a metrics snapshot needs `text` or `families`")
        raise MessageRejected(INCONSISTENT, "a metrics snapshot has `text` or `families`, not both")
    return snapshot
