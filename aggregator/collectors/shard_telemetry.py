"""Which shard an aggregator is, and what it dropped as another shard's (`--shards`, docs/sharding.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.config import ShardConfig


class ShardCollector(Collector):
    """`skipped`: messages of other shards dropped so far (ShardFilter.skipped)."""

    def __init__(self, shard: ShardConfig, skipped: Callable[[], int] = lambda: 0) -> None:
        self.shard = shard
        self.skipped = skipped

    def collect(self) -> Iterator[Metric]:
        # The recording rules group replicas by these labels (deploy/prometheus/rules/fleet.rules.yml).
        info = GaugeMetricFamily(
            "llm_aggregator_shard_info",
            "1, labelled with this aggregator's --shard and --shards (shard 0 of 1: the whole fleet)",
            labels=["shard", "shards"])
        info.add_metric([str(self.shard.index), str(self.shard.count)], 1)
        yield info
        yield CounterMetricFamily(
            "llm_aggregator_shard_skipped_messages",
            "Messages received that belong to another shard, dropped before decoding",
            value=self.skipped())

    def describe(self) -> Iterator[Metric]:
        return ShardCollector(self.shard).collect()
