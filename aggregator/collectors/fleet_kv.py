"""Turns the fleet state into Prometheus metric families at scrape time.

A custom collector rather than labelled Gauge objects: an expired worker simply stops
being yielded (nothing to remove), and the state is read once per scrape instead of
being copied into metric children on every message.

Names follow Dynamo's `components/metrics` aggregator so its dashboards keep working.
prometheus_client writes counters with a `_total` suffix, so Dynamo's counter
`llm_kv_hit_rate_isl_blocks` is exposed as `llm_kv_hit_rate_isl_blocks_total` (OpenMetrics
requires the suffix). `llm_kv_blocks_total` is a gauge whose name merely ends in
`_total`; it keeps Dynamo's name although linters flag it (see README, "Compatibility").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import cache
from operator import attrgetter

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    Sample,
)
from prometheus_client.registry import Collector

from aggregator.exposition.chunked_metric import ChunkedMetric
from aggregator.exposition.encoder import RenderedLabels, rows_chunk
from aggregator.state.fleet import Fleet, WorkerKey, WorkerState
from aggregator.state.fleet_stats import hit_rate_percent

WORKER_LABELS = ["component", "endpoint", "worker_id", "dp_rank"]
GROUP_LABELS = ["component", "endpoint"]

# (name, help, field of ForwardPassMetrics); None values are omitted, never exported as 0.
# The first five also come from Dynamo 1.x sources (`_v1_values`) for workers that send no legacy load.
_LOAD_GAUGES: list[tuple[str, str, str]] = [
    ("llm_kv_blocks_active", "Active KV cache blocks (Dynamo 1.x: kv_used_blocks)", "kv_stats.kv_active_blocks"),
    ("llm_kv_blocks_total", "Total KV cache blocks (Dynamo 1.x: the model card's total_kv_blocks)",
     "kv_stats.kv_total_blocks"),
    ("llm_requests_active_slots", "Active request slots (Dynamo 1.x: requests running in the last forward pass)",
     "worker_stats.request_active_slots"),
    ("llm_requests_total_slots", "Total request slots (Dynamo 1.x: the model card's max_num_seqs)",
     "worker_stats.request_total_slots"),
    ("llm_requests_waiting", "Requests waiting for a slot, as the worker reports (Dynamo 1.x: queued and preempted "
     "requests of the last forward pass)", "worker_stats.num_requests_waiting"),
    ("llm_gpu_cache_usage_ratio", "KV cache usage (0..1), as the worker reports (gpu_cache_usage_perc)",
     "kv_stats.gpu_cache_usage_perc"),
    ("llm_gpu_prefix_cache_hit_ratio", ("Prefix cache hit rate (0..1), as the worker reports "
                                        "(gpu_prefix_cache_hit_rate)"), "kv_stats.gpu_prefix_cache_hit_rate"),
]
# All seven values of one worker in one C call.
_load_values = attrgetter(*(path for _, _, path in _LOAD_GAUGES))


class WorkerLabels:
    """The render cache of workers' label sets (component, endpoint, worker_id, dp_rank), keyed by
    worker: each rendered once, at the first scrape that shows the worker, and freed when it
    expires (a FleetListener)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self.by_worker: dict[WorkerKey, RenderedLabels] = {}  # read directly by scrapes (C-speed lookups)

    def __len__(self) -> int:
        return len(self.by_worker)

    def of(self, key: WorkerKey) -> RenderedLabels:
        labels = self.by_worker.get(key)
        if labels is None:
            labels = self.by_worker[key] = RenderedLabels(dict(zip(
                WORKER_LABELS, (key.component, key.endpoint, str(key.worker_id), str(key.dp_rank)))))
            # Made by a scrape, on the render thread: a worker that expired since that scrape listed it
            # was already let go of by `workers_expired`, so its entry is dropped here.
            if key not in self._fleet.workers:
                self.by_worker.pop(key, None)
        return labels

    def gpu_reading(self, state: WorkerState) -> None:
        """A worker's label set does not depend on its readings."""

    def workers_expired(self, keys: list[WorkerKey]) -> None:
        for key in keys:
            self.by_worker.pop(key, None)


class FleetCollector(Collector):
    """Per-worker KV series and per component endpoint statistics.

    Register `labels` with the fleet (`Fleet.add_listener`) so expired workers' label sets are freed.
    With `groups=False` it leaves the per component endpoint families to a FleetGroupCollector
    registered beside it.
    """

    def __init__(self, fleet: Fleet, *, wall_clock: Callable[[], float] = time.time,
                 monotonic_clock: Callable[[], float] = time.monotonic, groups: bool = True) -> None:
        self.fleet = fleet
        self.labels = WorkerLabels(fleet)
        self.groups = groups
        self._wall = wall_clock
        self._monotonic = monotonic_clock

    def collect(self) -> Iterator[Metric]:
        yield from self._worker_families()
        if self.groups:
            yield from group_families(self.fleet)

    def _worker_families(self) -> Iterator[Metric]:
        # Rendered straight from the state into one chunk per family (see encoder.py): a
        # scrape of 10,000 workers makes no Sample objects here unless something reads them.
        offset = self._wall() - self._monotonic()  # last-seen is kept on the monotonic clock
        known, labels_of = self.labels.by_worker, self.labels.of
        rows = [(known.get(key) or labels_of(key), state) for key, state in list(self.fleet.workers.items())]
        loaded = [(labels, state.load) for labels, state in rows if state.load is not None]
        # One row of values per worker, transposed into one column per family.
        columns = zip(*(_load_values(metrics) for _, metrics in loaded)) if loaded else ((),) * len(_LOAD_GAUGES)
        worker_labels = [labels for labels, _ in loaded]
        v1 = _v1_values([(labels, state) for labels, state in rows if state.load is None])
        for (name, doc, _), column in zip(_LOAD_GAUGES, columns):
            values = [(labels, value) for labels, value in zip(worker_labels, column) if value is not None]
            yield _chunked(name, doc, "gauge", name, values + v1.get(name, []))
        counted = [(labels, state.isl_blocks, state.overlap_blocks) for labels, state in rows
                   if state.isl_blocks or state.overlap_blocks]
        rates = [(labels, rate) for labels, isl, overlap in counted
                 if (rate := hit_rate_percent(overlap, isl)) is not None]
        yield _chunked("llm_kv_hit_rate_percent",
                       "Cumulative KV hit rate per worker, 100 * sum(overlap_blocks) / sum(isl_blocks) of its "
                       "hit-rate events", "gauge", "llm_kv_hit_rate_percent", rates)
        yield _chunked("llm_kv_hit_rate_isl_blocks", "Cumulative count of ISL blocks in KV hit rate events",
                       "counter", "llm_kv_hit_rate_isl_blocks_total", [(labels, isl) for labels, isl, _ in counted])
        yield _chunked("llm_kv_hit_rate_overlap_blocks", "Cumulative count of overlapping blocks in KV hit rate "
                       "events", "counter", "llm_kv_hit_rate_overlap_blocks_total",
                       [(labels, overlap) for labels, _, overlap in counted])
        yield _chunked("llm_worker_last_seen_timestamp_seconds", "Unix time of the last message from the worker",
                       "gauge", "llm_worker_last_seen_timestamp_seconds",
                       [(labels, state.last_seen + offset) for labels, state in rows])

    def describe(self) -> Iterator[Metric]:
        return iter(_described(self.groups))


class FleetGroupCollector(Collector):
    """The per component endpoint families alone, beside a FleetCollector(groups=False): a scrape that
    selects only them (`?name[]=llm_workers`, a fleet-level Prometheus reading the partials of
    docs/sharding.md) does not render every worker's series."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        return group_families(self.fleet)

    def describe(self) -> Iterator[Metric]:
        return iter(_described_groups())


def group_families(fleet: Fleet) -> Iterator[Metric]:
    """The per component endpoint families: live workers, load statistics, hit-rate totals, expiries."""
    live = GaugeMetricFamily("llm_workers", "Live workers (seen within --stale-after, or registered in discovery)",
                             labels=GROUP_LABELS)
    avg = GaugeMetricFamily(
        "llm_load_avg", "Average load (kv_active_blocks; Dynamo 1.x: kv_used_blocks) across live workers",
        labels=GROUP_LABELS
    )
    std = GaugeMetricFamily(
        "llm_load_std",
        "Population standard deviation of load (kv_active_blocks; Dynamo 1.x: kv_used_blocks) across live workers",
        labels=GROUP_LABELS,
    )
    fleet_rate = GaugeMetricFamily(
        "llm_fleet_kv_hit_rate_percent",
        "Cumulative KV hit rate of the component endpoint since the aggregator started, expired workers included",
        labels=GROUP_LABELS,
    )
    fleet_isl = CounterMetricFamily(
        "llm_fleet_kv_hit_rate_isl_blocks", "ISL blocks in all KV hit rate events", labels=GROUP_LABELS
    )
    fleet_overlap = CounterMetricFamily(
        "llm_fleet_kv_hit_rate_overlap_blocks", "Overlapping blocks in all KV hit rate events", labels=GROUP_LABELS
    )
    expired = CounterMetricFamily(
        "llm_workers_expired", "Workers dropped after --stale-after seconds of silence", labels=GROUP_LABELS
    )
    deregistered = CounterMetricFamily(
        "llm_workers_deregistered", "Workers dropped at once because their discovery instance entry went away",
        labels=GROUP_LABELS,
    )
    for stats in fleet.group_stats():
        labels = [stats.key.component, stats.key.endpoint]
        live.add_metric(labels, stats.live_workers)
        if stats.load_avg is not None and stats.load_std is not None:  # both or neither
            avg.add_metric(labels, stats.load_avg)
            std.add_metric(labels, stats.load_std)
        if stats.hit_rate_percent is not None:
            fleet_rate.add_metric(labels, stats.hit_rate_percent)
        fleet_isl.add_metric(labels, stats.totals.isl_blocks)
        fleet_overlap.add_metric(labels, stats.totals.overlap_blocks)
        expired.add_metric(labels, stats.totals.expired)
        deregistered.add_metric(labels, stats.totals.deregistered)
    yield from (live, avg, std, fleet_rate, fleet_isl, fleet_overlap, expired, deregistered)


@cache
def _described(groups: bool) -> tuple[Metric, ...]:
    # The families of an empty fleet: every name this collector yields, without samples.
    return tuple(FleetCollector(Fleet(stale_after=1.0), groups=groups).collect())


@cache
def _described_groups() -> tuple[Metric, ...]:
    return tuple(group_families(Fleet(stale_after=1.0)))


def _v1_values(rows: list[tuple[RenderedLabels, WorkerState]]) -> dict[str, list[tuple[RenderedLabels, float]]]:
    """The shared gauges' values of workers without legacy load, from their Dynamo 1.x sources."""
    out: dict[str, list[tuple[RenderedLabels, float]]] = {}
    if not rows:
        return out
    out["llm_kv_blocks_active"] = [(labels, load.kv_used_blocks) for labels, state in rows
                                   if (load := state.active_load) is not None and load.kv_used_blocks is not None]
    passes = [(labels, state.forward_passes) for labels, state in rows
              if state.forward_passes is not None and state.forward_passes.latest is not None]
    out["llm_requests_active_slots"] = [(labels, fp.running) for labels, fp in passes]
    out["llm_requests_waiting"] = [(labels, fp.waiting) for labels, fp in passes]
    capacities = [(labels, state.capacity) for labels, state in rows if state.capacity is not None]
    out["llm_kv_blocks_total"] = [(labels, c.total_kv_blocks) for labels, c in capacities
                                  if c.total_kv_blocks is not None]
    out["llm_requests_total_slots"] = [(labels, c.max_num_seqs) for labels, c in capacities
                                       if c.max_num_seqs is not None]
    return out


def _chunked(name: str, doc: str, typ: str, sample_name: str, rows: list[tuple[RenderedLabels, float]]) -> Metric:
    family = ChunkedMetric(name, doc, typ)
    family.add_chunk(lambda: [Sample(sample_name, labels, value) for labels, value in rows],
                     rows_chunk(sample_name, rows))
    return family
