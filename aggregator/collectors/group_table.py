"""The component/endpoint group table's own metrics: how full it is and what it evicted."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.state.fleet import Fleet


class GroupTableCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "llm_aggregator_groups",
            "Component/endpoint groups held (their totals outlive their workers), at most --max-groups",
            value=len(self.fleet.groups))
        yield CounterMetricFamily(
            "llm_aggregator_groups_evicted",
            "Groups without a live worker dropped, longest idle first, to admit a new group past --max-groups; "
            "their totals restart from zero if they come back",
            value=self.fleet.groups_evicted)

    def describe(self) -> Iterator[Metric]:
        return GroupTableCollector(Fleet(stale_after=1.0)).collect()
