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

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, Sample
from prometheus_client.registry import Collector

from .aggregate import hit_rate_percent
from .fleet import Fleet
from .gpu_families import gpu_families

WORKER_LABELS = ["component", "endpoint", "worker_id", "dp_rank"]
GROUP_LABELS = ["component", "endpoint"]

# (name, help, getter over ForwardPassMetrics); None values are omitted, never exported as 0.
_LOAD_GAUGES: list[tuple[str, str, Callable]] = [
    ("llm_kv_blocks_active", "Active KV cache blocks", lambda m: m.kv_stats.kv_active_blocks),
    ("llm_kv_blocks_total", "Total KV cache blocks", lambda m: m.kv_stats.kv_total_blocks),
    ("llm_requests_active_slots", "Active request slots", lambda m: m.worker_stats.request_active_slots),
    ("llm_requests_total_slots", "Total request slots", lambda m: m.worker_stats.request_total_slots),
    ("llm_requests_waiting", "Requests waiting for a slot, as the worker reports",
     lambda m: m.worker_stats.num_requests_waiting),
    ("llm_gpu_cache_usage_ratio", "KV cache usage (0..1), as the worker reports (gpu_cache_usage_perc)",
     lambda m: m.kv_stats.gpu_cache_usage_perc),
    ("llm_gpu_prefix_cache_hit_ratio", "Prefix cache hit rate (0..1), as the worker reports "
     "(gpu_prefix_cache_hit_rate)", lambda m: m.kv_stats.gpu_prefix_cache_hit_rate),
]


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet, *, wall_clock=time.time, monotonic_clock=time.monotonic,
                 gpu_hostname_label: str = "Hostname") -> None:
        self.fleet = fleet
        self.gpu_hostname_label = gpu_hostname_label
        self._wall = wall_clock
        self._monotonic = monotonic_clock

    def collect(self) -> Iterator[Metric]:
        yield from self._worker_families()
        yield from self._group_families()
        yield from self._gpu_families()

    def _gpu_families(self) -> Iterator[Metric]:
        yield from gpu_families(self.fleet, self._monotonic(), self.gpu_hostname_label)

    def _worker_families(self) -> Iterator[Metric]:
        gauges = [(GaugeMetricFamily(name, doc, labels=WORKER_LABELS), get) for name, doc, get in _LOAD_GAUGES]
        hit_rate = GaugeMetricFamily(
            "llm_kv_hit_rate_percent",
            "Cumulative KV hit rate per worker, 100 * sum(overlap_blocks) / sum(isl_blocks) of its hit-rate events",
            labels=WORKER_LABELS,
        )
        isl = CounterMetricFamily(
            "llm_kv_hit_rate_isl_blocks", "Cumulative count of ISL blocks in KV hit rate events", labels=WORKER_LABELS
        )
        overlap = CounterMetricFamily(
            "llm_kv_hit_rate_overlap_blocks",
            "Cumulative count of overlapping blocks in KV hit rate events",
            labels=WORKER_LABELS,
        )
        last_seen = GaugeMetricFamily(
            "llm_worker_last_seen_timestamp_seconds",
            "Unix time of the last message from the worker",
            labels=WORKER_LABELS,
        )
        # Last-seen is kept on the monotonic clock (immune to wall-clock steps); convert once.
        offset = self._wall() - self._monotonic()
        names = tuple(WORKER_LABELS)
        # Samples are appended directly with the worker's pre-rendered label set (see exposition.py):
        # add_metric would build a new label dict per sample per scrape.
        for key, state in list(self.fleet.workers.items()):
            labels = state.labels(names, (key.component, key.endpoint, str(key.worker_id), str(key.dp_rank)))
            metrics = state.load
            if metrics is not None:
                for family, get in gauges:
                    value = get(metrics)
                    if value is not None:
                        family.samples.append(Sample(family.name, labels, value))
            if state.isl_blocks or state.overlap_blocks:
                isl.samples.append(Sample(isl.name + "_total", labels, state.isl_blocks))
                overlap.samples.append(Sample(overlap.name + "_total", labels, state.overlap_blocks))
                rate = hit_rate_percent(state.overlap_blocks, state.isl_blocks)
                if rate is not None:
                    hit_rate.samples.append(Sample(hit_rate.name, labels, rate))
            last_seen.samples.append(Sample(last_seen.name, labels, state.last_seen + offset))
        for family, _ in gauges:
            yield family
        yield from (hit_rate, isl, overlap, last_seen)

    def _group_families(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("llm_workers", "Live workers (seen within --stale-after)", labels=GROUP_LABELS)
        avg = GaugeMetricFamily(
            "llm_load_avg", "Average load (kv_active_blocks) across live workers", labels=GROUP_LABELS
        )
        std = GaugeMetricFamily(
            "llm_load_std",
            "Population standard deviation of load (kv_active_blocks) across live workers",
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
        for stats in self.fleet.group_stats():
            labels = [stats.key.component, stats.key.endpoint]
            live.add_metric(labels, stats.live_workers)
            if stats.load_avg is not None:
                avg.add_metric(labels, stats.load_avg)
                std.add_metric(labels, stats.load_std)
            if stats.hit_rate_percent is not None:
                fleet_rate.add_metric(labels, stats.hit_rate_percent)
            fleet_isl.add_metric(labels, stats.totals.isl_blocks)
            fleet_overlap.add_metric(labels, stats.totals.overlap_blocks)
            expired.add_metric(labels, stats.totals.expired)
        yield from (live, avg, std, fleet_rate, fleet_isl, fleet_overlap, expired)

    def describe(self) -> Iterator[Metric]:
        # The families of an empty fleet: every name this collector yields, without reading the
        # live state, so registration catches name clashes and `/metrics?name[]=` can select them.
        return FleetCollector(Fleet(stale_after=1.0)).collect()
