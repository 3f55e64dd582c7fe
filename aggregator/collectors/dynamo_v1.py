"""The series only Dynamo 1.x sources give: per worker rank, and the event plane's own health.

The 1.x values of the shared families (`llm_kv_blocks_active`, `llm_kv_blocks_total`,
`llm_requests_*`) are FleetCollector's, beside the legacy ones; everything here is new:

- kv_metrics (ActiveLoad): `llm_kv_active_decode_blocks`, `llm_active_prefill_tokens`;
- forward-pass-metrics: `llm_prefill_tokens_computed_total`, `llm_prefill_tokens_from_cache_total`
  (rate(from_cache) / rate(from_cache + computed) is the engine's prefix-cache hit rate) and the
  histogram `llm_forward_pass_duration_seconds`;
- kv-events: `llm_kv_cached_blocks{storage_tier}`, `llm_kv_cached_blocks_reliable` (1 while
  the count is exact) and `llm_kv_events_lost_total`;
- `$SRV.STATS` without data: `llm_worker_requests_total`, `llm_worker_request_errors_total`,
  `llm_worker_processing_seconds_total`;
- the event plane as a whole: lost events, publisher starts and (ZMQ) events sent before the
  aggregator connected, per (component, endpoint, topic), the publisher table, and the blocks tracked (and not) under the memory limits.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    Sample,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from aggregator.collectors.fleet_kv import WORKER_LABELS, WorkerLabels
from aggregator.exposition.chunked_metric import ChunkedMetric
from aggregator.exposition.encoder import RenderedLabels, rows_chunk
from aggregator.state.event_publishers import EventPublishers
from aggregator.state.fleet import Fleet
from aggregator.state.kv_cache import IN_TOTAL, PER_WORKER

STREAM_LABELS = ["component", "endpoint", "topic"]
NANOSECONDS = 1e-9


class DynamoV1Collector(Collector):
    """Reads the fleet's 1.x fields and the event plane's publisher table; labels from `labels` (FleetCollector's)."""

    def __init__(self, fleet: Fleet, labels: WorkerLabels, publishers: EventPublishers) -> None:
        self.fleet = fleet
        self.labels = labels
        self.publishers = publishers

    def collect(self) -> Iterator[Metric]:
        known, labels_of = self.labels.by_worker, self.labels.of
        rows = [(known.get(key) or labels_of(key), state) for key, state in list(self.fleet.workers.items())
                if state.load is None]
        loads = [(labels, state.active_load) for labels, state in rows if state.active_load is not None]
        yield _rows("llm_kv_active_decode_blocks", "KV blocks of requests in decode (Dynamo 1.x kv_metrics "
                    "active_decode_blocks)", "gauge", "llm_kv_active_decode_blocks",
                    [(labels, load.active_decode_blocks) for labels, load in loads
                     if load.active_decode_blocks is not None])
        yield _rows("llm_active_prefill_tokens", "Prompt tokens waiting for or in prefill (Dynamo 1.x kv_metrics "
                    "active_prefill_tokens; workers of 1.6.1 leave it out)", "gauge", "llm_active_prefill_tokens",
                    [(labels, load.active_prefill_tokens) for labels, load in loads
                     if load.active_prefill_tokens is not None])

        passes = [(labels, state.forward_passes) for labels, state in rows if state.forward_passes is not None]
        yield _rows("llm_prefill_tokens_computed", "Prompt tokens the engine computed (Dynamo 1.x forward passes, "
                    "scheduled sum_prefill_tokens)", "counter", "llm_prefill_tokens_computed_total",
                    [(labels, fp.prefill_computed) for labels, fp in passes])
        yield _rows("llm_prefill_tokens_from_cache", "Prompt tokens the engine read from its KV cache instead of "
                    "computing them: prefix-cache hits and earlier chunks (Dynamo 1.x forward passes, scheduled "
                    "sum_prefill_kv_tokens)", "counter", "llm_prefill_tokens_from_cache_total",
                    [(labels, fp.prefill_from_cache) for labels, fp in passes])
        durations = HistogramMetricFamily("llm_forward_pass_duration_seconds", "Wall time of the engine's forward "
                                          "passes, schedule to update (Dynamo 1.x forward passes; idle heartbeats "
                                          "left out)", labels=WORKER_LABELS)
        for labels, fp in passes:
            if fp.iterations:
                durations.add_metric(_values(labels), [(floatToGoString(bound), count) for bound, count
                                                       in fp.cumulative_buckets()], fp.seconds)
        yield durations

        caches = [(labels, state.kv_cache) for labels, state in rows if state.kv_cache is not None]
        cached = GaugeMetricFamily("llm_kv_cached_blocks", "KV blocks the worker holds per storage tier, from its "
                                   "Dynamo 1.x kv-events (stored - removed, emptied by cleared); exact only while "
                                   "llm_kv_cached_blocks_reliable is 1", labels=[*WORKER_LABELS, "storage_tier"])
        for labels, blocks in caches:
            values = _values(labels)
            for tier, hashes in list(blocks.tiers.items()):
                cached.add_metric([*values, tier], len(hashes))
        yield cached
        yield _rows("llm_kv_cached_blocks_reliable", "1 while llm_kv_cached_blocks is exact: every kv-event since "
                    "the worker's first, or since its last cleared, was seen and tracked; else 0",
                    "gauge", "llm_kv_cached_blocks_reliable",
                    [(labels, 1 if blocks.reliable else 0) for labels, blocks in caches])
        yield _rows("llm_kv_events_lost", "kv-events of the worker never received (event_id gaps)", "counter",
                    "llm_kv_events_lost_total", [(labels, blocks.lost_events) for labels, blocks in caches])

        stats = [(labels, state.service_stats) for labels, state in rows if state.service_stats is not None]
        yield _rows("llm_worker_requests", "Requests the worker process served ($SRV.STATS num_requests, Dynamo 1.x "
                    "request plane nats)", "counter", "llm_worker_requests_total",
                    [(labels, s.num_requests) for labels, s in stats])
        yield _rows("llm_worker_request_errors", "Requests that failed ($SRV.STATS num_errors)", "counter",
                    "llm_worker_request_errors_total", [(labels, s.num_errors) for labels, s in stats])
        yield _rows("llm_worker_processing_seconds", "Time spent handling requests ($SRV.STATS processing_time)",
                    "counter", "llm_worker_processing_seconds_total",
                    [(labels, s.processing_time * NANOSECONDS) for labels, s in stats])

        yield from self._event_plane()

    def _event_plane(self) -> Iterator[Metric]:
        lost = CounterMetricFamily("llm_aggregator_event_plane_lost_events", "Dynamo 1.x events never received: "
                                   "gaps in their publishers' sequence numbers", labels=STREAM_LABELS)
        starts = CounterMetricFamily("llm_aggregator_event_plane_publisher_starts", "Dynamo 1.x event publishers "
                                     "seen from their first message (sequence 0): worker processes that started or "
                                     "restarted", labels=STREAM_LABELS)
        unseen = CounterMetricFamily("llm_aggregator_event_plane_unseen_events", "Dynamo 1.x events sent before "
                                     "the aggregator first received from their publisher (the first sequence seen, "
                                     "when not 0), on the ZMQ event plane: PUB/SUB drops what a publisher sends "
                                     "before the subscriber has connected", labels=STREAM_LABELS)
        for key, counts in list(self.publishers.streams.items()):
            lost.add_metric(list(key), counts.lost)
            starts.add_metric(list(key), counts.starts)
            unseen.add_metric(list(key), counts.unseen)
        yield lost
        yield starts
        yield unseen
        yield GaugeMetricFamily("llm_aggregator_event_plane_publishers", "Event publishers whose sequence is "
                                "followed", value=len(self.publishers))
        yield CounterMetricFamily("llm_aggregator_event_plane_publishers_evicted", "Publishers dropped from the "
                                  "table (the oldest first) to stay under its limit", value=self.publishers.evicted)
        budget = self.fleet.kv_blocks
        yield GaugeMetricFamily("llm_aggregator_kv_blocks_tracked", "KV block hashes held to count workers' cached "
                                "blocks", value=budget.tracked)
        untracked = CounterMetricFamily("llm_aggregator_kv_blocks_untracked", "Stored KV blocks not tracked, by the "
                                        "limit they hit (--max-cached-blocks-per-worker, --max-cached-blocks)",
                                        labels=["limit"])
        for limit in (PER_WORKER, IN_TOTAL):
            untracked.add_metric([limit], budget.untracked[limit])
        yield untracked

    def describe(self) -> Iterator[Metric]:
        return iter(_described())


@cache
def _described() -> tuple[Metric, ...]:
    # The families of an empty fleet: every name this collector yields, without samples.
    fleet = Fleet(stale_after=1.0)
    return tuple(DynamoV1Collector(fleet, WorkerLabels(fleet), EventPublishers()).collect())


def _values(labels: RenderedLabels) -> list[str]:
    return [labels[name] for name in WORKER_LABELS]


def _rows(name: str, doc: str, typ: str, sample_name: str, rows: list[tuple[RenderedLabels, float]]) -> Metric:
    family = ChunkedMetric(name, doc, typ)
    family.add_chunk(lambda: [Sample(sample_name, labels, value) for labels, value in rows],
                     rows_chunk(sample_name, rows))
    return family
