"""Which of n shards a subject belongs to: nats-server's own `{{partition(n, ...)}}` function.

nats-server's subject-mapping transform `{{partition(n, i)}}` puts a message in partition
FNV-1a-32(token i) mod n. Splitting a fleet by the component token with this very function
means the split is the same whether nats-server makes it (a mapping in front of the
aggregators, docs/sharding.md) or each aggregator keeps its own share of everything it
receives: every subject is in exactly one partition, so n shards have no overlap and no gap.

A worker sends all its messages on subjects of its component (load, hit rate, GPU readings,
metric snapshots; Dynamo 0.x `namespace.{ns}.component.{c}.{event}` and Dynamo 1.x
`namespace.{ns}.component.{c}.endpoint.{e}.{topic}` alike), so all of a worker lands in one
shard. A namespace-level subject (`namespace.{ns}.{event}`) has no component token: its
messages are labelled with the aggregator's default component, and belong to that
component's shard.
"""

from __future__ import annotations

from typing import Final

_FNV32_OFFSET: Final = 0x811C9DC5
_FNV32_PRIME: Final = 0x01000193


def partition(token: str, count: int) -> int:
    """nats-server's `{{partition(count, ...)}}` of one subject token: FNV-1a 32-bit of its bytes, mod count."""
    value = _FNV32_OFFSET
    for byte in token.encode():
        value = ((value ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return value % count


def partition_key(subject: str, default_component: str) -> str:
    """The token `subject` is partitioned by: its component token, or `default_component` for a
    namespace-level subject."""
    parts = subject.split(".", 4)
    if len(parts) == 5 and parts[0] == "namespace" and parts[2] == "component":
        return parts[3]
    return default_component
