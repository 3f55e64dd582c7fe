"""Mergeable partials of the fleet statistics: what a global Prometheus sums across shards.

`llm_load_avg` and `llm_load_std` of a component endpoint cannot be merged across aggregators
(an average of averages is not the average). Their sums can: with n, S1 = sum(x) and S2 =
sum(x^2) over the live workers that reported load (x = kv_active_blocks), every shard's partials
add up to the fleet's, and

    avg = S1 / n        std = sqrt(max(S2 / n - avg^2, 0))   (population std, as llm_load_std)

which deploy/prometheus/rules/fleet.rules.yml records. The hit rate merges the same way from the
counters FleetCollector already exports (llm_fleet_kv_hit_rate_{isl,overlap}_blocks_total), and
llm_workers adds up as it is.

Exactness: the sums are kept as Python integers (exact); each is exported as the float64
nearest to it, a relative error of at most 2^-53 per value. The std formula then loses
precision to cancellation when the spread is small against the mean: summed over M shards in
float64, its relative error stays within (3M + 2) * 2^-53 * (1 + (avg/std)^2) (docs/sharding.md),
e.g. 9e-10 for M = 2 at avg/std = 1,000.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.state.fleet import Fleet

GROUP_LABELS = ["component", "endpoint"]


class FleetPartialsCollector(Collector):
    """Per component endpoint: n, sum and sum of squares of load, and the sum of KV capacity."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "llm_load_workers",
            "Live workers that reported load: the n of llm_load_avg and llm_load_std (llm_workers also counts "
            "workers seen only through hit-rate, GPU or metric messages)", labels=GROUP_LABELS)
        load_sum = GaugeMetricFamily(
            "llm_load_sum", "Sum of load (kv_active_blocks) over the llm_load_workers; llm_load_avg = "
            "llm_load_sum / llm_load_workers, also summed across shards", labels=GROUP_LABELS)
        load_squares = GaugeMetricFamily(
            "llm_load_sum_squares", "Sum of the squares of load (kv_active_blocks) over the llm_load_workers; "
            "llm_load_std = sqrt(llm_load_sum_squares / n - llm_load_avg^2)", labels=GROUP_LABELS)
        capacity = GaugeMetricFamily(
            "llm_kv_blocks_total_sum", "Sum of KV cache capacity (kv_total_blocks) over the llm_load_workers: "
            "fleet KV usage = llm_load_sum / llm_kv_blocks_total_sum", labels=GROUP_LABELS)
        # Snapshots: /metrics renders in a thread while the event loop keeps adding workers and groups.
        sums: dict[tuple[str, str], list[int]] = {group: [0, 0, 0, 0] for group in list(self.fleet.groups)}
        for (component, endpoint, _, _), state in list(self.fleet.workers.items()):
            # The same load as llm_load_avg/std (Fleet.group_stats): legacy kv_active_blocks, else
            # Dynamo 1.x kv_used_blocks with its capacity from discovery.
            legacy, active_load = state.load, state.active_load
            if legacy is not None:
                active, blocks = legacy.kv_stats.kv_active_blocks, legacy.kv_stats.kv_total_blocks
            elif active_load is not None and active_load.kv_used_blocks is not None:
                active = active_load.kv_used_blocks
                blocks = (state.capacity.total_kv_blocks or 0) if state.capacity is not None else 0
            else:
                continue
            group = sums.get((component, endpoint))
            if group is None:  # a group born after the snapshot: next scrape
                continue
            group[0] += 1
            group[1] += active
            group[2] += active * active  # Python integers: exact, however large
            group[3] += blocks
        for (component, endpoint), (n, total, squares, blocks) in sums.items():
            if not n:  # no worker with load: nothing to add up (llm_load_avg has no value either)
                continue
            labels = [component, endpoint]
            workers.add_metric(labels, n)
            load_sum.add_metric(labels, total)
            load_squares.add_metric(labels, squares)
            capacity.add_metric(labels, blocks)
        yield from (workers, load_sum, load_squares, capacity)

    def describe(self) -> Iterator[Metric]:
        return iter(_described())


@cache
def _described() -> tuple[Metric, ...]:
    # The families of an empty fleet: every name this collector yields, without samples.
    return tuple(FleetPartialsCollector(Fleet(stale_after=1.0)).collect())
