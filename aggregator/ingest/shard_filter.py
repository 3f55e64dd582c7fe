"""A shard's share of the fleet, decided by subject before anything is decoded (ShardConfig).

Each subject belongs to exactly one of `count` shards (fleet_protocol.partitions, nats-server's
own partition function over the component token), so the shards of a fleet never see a worker
twice and never miss one. A shard that receives every subject drops the others' messages here,
at the cost of a dictionary lookup; one that nats-server feeds its partition only
(`subject_prefix`) receives none to drop.

What is not a NATS message is split the same way: a discovery entry and a ZMQ channel by their
component's event-plane subject token, so a 1.x worker lands in the shard its subjects do,
whichever plane and store it is read from.
"""

from __future__ import annotations

from aggregator.config import ShardConfig
from aggregator.ingest.pipeline import cacheable_subject
from fleet_protocol import encode_event_segment
from fleet_protocol.partitions import partition, partition_key


class ShardFilter:
    def __init__(self, shard: ShardConfig, default_component: str) -> None:
        self.shard = shard
        self.default_component = default_component
        self.skipped = 0  # messages of other shards dropped (llm_aggregator_shard_skipped_messages_total)
        self._kept: dict[str, bool] = {}

    def keeps(self, subject: str) -> bool:
        """Whether a message on `subject` is this shard's; one that is not is counted as skipped."""
        kept = self._kept.get(subject)
        if kept is None:
            kept = partition(partition_key(subject, self.default_component), self.shard.count) == self.shard.index
            if cacheable_subject(self._kept, subject):  # bounded as the pipeline's own caches
                self._kept[subject] = kept
        if not kept:
            self.skipped += 1
        return kept

    def keeps_component(self, component: str) -> bool:
        """Whether the workers of `component` (a name, as discovery entries hold it) are this shard's; one
        that is not is counted as skipped."""
        kept = self.shard.owns(encode_event_segment(component))
        if not kept:
            self.skipped += 1
        return kept

    def split_by_server(self, pattern: str) -> str | None:
        """The subject nats-server delivers `pattern`'s messages of this shard on, when it splits them
        (`subject_prefix` set and a pattern with a component token); else None."""
        prefix = self.shard.subject_prefix
        parts = pattern.split(".", 4)
        if prefix is None or len(parts) < 5 or parts[0] != "namespace" or parts[2] != "component":
            return None
        return f"{prefix}.{self.shard.index}.{pattern}"
