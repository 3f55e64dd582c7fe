"""What a Dynamo 1.x worker publishes on each event-plane topic, with Dynamo 1.6.1's rules.

    load = ActiveLoadPublisher(EventPublisher(KV_METRICS_TOPIC, transport), worker_id)
    await load.publish(dp_rank=0, active_decode_blocks=12, kv_used_blocks=40)  # sent: it changed
    await load.publish(dp_rank=0, active_decode_blocks=12, kv_used_blocks=40)  # not sent

- `kv_metrics` (ActiveLoadPublisher, Dynamo's `WorkerMetricsPublisher`): per dp_rank, only
  when a value changed; no heartbeat. Dynamo also debounces: of changes less than 1 ms
  apart only the last goes out. Here every change goes out, as Dynamo's do when further apart.
- `forward-pass-metrics` (ForwardPassPublisher, Dynamo's `FpmDirectPublisher`): one message
  per forward pass; a rank that is idle gets a zeroed heartbeat once nothing went out for it
  for a second, then every second. `counter_id` counts both, per rank, from 1.
- `kv-events` (KvEventPublisher, Dynamo's `KvEventPublisher`, one per dp_rank): stored,
  removed, cleared, `event_id` from 1; a message holds one event, or an engine's batch. Block
  hashes may be given as i64 (negative ones travel as their two's complement, as Dynamo's
  Python API sends them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Literal

from fleet_protocol import (
    FORWARD_PASS_METRICS_VERSION,
    ActiveLoad,
    ForwardPassMetricsV1,
    KvCacheEvent,
    KvEventData,
    KvRemoved,
    KvStored,
    QueuedRequests,
    RouterEvent,
    ScheduledRequests,
    StoredBlock,
    encode_active_load,
    encode_forward_pass_v1,
    encode_kv_events,
)
from fleet_protocol.kv_events import DEVICE_TIER

from .event_publisher import EventPublisher

HEARTBEAT_AFTER_S: Final = 1.0
_U64: Final = 2**64


def block_hash_u64(value: int) -> int:
    """A block hash as the u64 on the wire: an i64 below 0 becomes its two's complement."""
    if not -(2**63) <= value < _U64:
        raise ValueError(f"block hash {value} fits neither i64 nor u64")
    return value % _U64


class ActiveLoadPublisher:
    """A worker's load per dp_rank, sent only when it changes (Dynamo 1.6.1 sends no heartbeat)."""

    def __init__(self, events: EventPublisher, worker_id: int) -> None:
        self.events = events
        self.worker_id = worker_id
        self.latest: dict[int, tuple[int | None, int | None]] = {}

    async def publish(self, dp_rank: int = 0, active_decode_blocks: int | None = None,
                      kv_used_blocks: int | None = None) -> bool:
        """Send the load of `dp_rank` if it differs from the last one sent; whether it was sent."""
        if active_decode_blocks is None and kv_used_blocks is None:
            raise ValueError("a load needs active_decode_blocks or kv_used_blocks")
        values = (active_decode_blocks, kv_used_blocks)
        if self.latest.get(dp_rank) == values:
            return False
        self.latest[dp_rank] = values
        load = ActiveLoad(self.worker_id, dp_rank, active_decode_blocks, None, kv_used_blocks)
        await self.events.publish(encode_active_load(load))
        return True


class ForwardPassPublisher:
    """ForwardPassMetrics v1 per pass and per dp_rank, with Dynamo's idle heartbeat.

    Whoever runs the passes says when a rank has none to run (`idle`); a rank is idle from
    the start. `send_due_heartbeats` sends what is due; call it often (every 0.1 s).
    """

    def __init__(self, events: EventPublisher, worker_id: int, dp_ranks: Iterable[int] = (0,),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.worker_id = str(worker_id)
        self.clock = clock
        now = clock()
        self.counters = dict.fromkeys(dp_ranks, 0)
        self.last_sent = dict.fromkeys(self.counters, now)
        self.idle_ranks = set(self.counters)

    async def _send(self, metrics: ForwardPassMetricsV1) -> None:
        await self.events.publish(encode_forward_pass_v1(metrics))
        self.last_sent[metrics.dp_rank] = self.clock()

    def _next_counter(self, dp_rank: int) -> int:
        self.counters[dp_rank] = self.counters.get(dp_rank, 0) + 1
        return self.counters[dp_rank]

    async def publish(self, dp_rank: int, wall_time: float, scheduled: ScheduledRequests,
                      queued: QueuedRequests) -> None:
        """One forward pass of `dp_rank`."""
        self.idle_ranks.discard(dp_rank)
        await self._send(ForwardPassMetricsV1(FORWARD_PASS_METRICS_VERSION, self.worker_id, dp_rank,
                                              self._next_counter(dp_rank), wall_time, scheduled, queued))

    def idle(self, dp_rank: int) -> None:
        """`dp_rank` ran no pass: from a second after its last message, heartbeats are due."""
        self.idle_ranks.add(dp_rank)
        self.last_sent.setdefault(dp_rank, self.clock())

    def due(self) -> list[int]:
        now = self.clock()
        return sorted(rank for rank in self.idle_ranks if now - self.last_sent[rank] >= HEARTBEAT_AFTER_S)

    async def send_due_heartbeats(self) -> int:
        """A zeroed message for every idle rank whose last one is a second old; how many were sent."""
        due = self.due()
        for rank in due:
            await self._send(ForwardPassMetricsV1(FORWARD_PASS_METRICS_VERSION, self.worker_id, rank,
                                                  self._next_counter(rank)))
        return len(due)


def stored_data(blocks: Sequence[tuple[int, int]], parent_hash: int | None = None) -> KvEventData:
    """Blocks stored, each (block_hash, tokens_hash), after `parent_hash` (None: the first of a sequence)."""
    return KvEventData(stored=KvStored(None if parent_hash is None else block_hash_u64(parent_hash), None,
                                       [StoredBlock(block_hash_u64(block), block_hash_u64(tokens))
                                        for block, tokens in blocks]))


def removed_data(block_hashes: Sequence[int]) -> KvEventData:
    return KvEventData(removed=KvRemoved([block_hash_u64(block) for block in block_hashes]))


class KvEventPublisher:
    """The KV cache events of one (worker, dp_rank) source; `event_id` counts them from 1.

    `stored`, `removed` and `cleared` send one event each, as Dynamo's Python API does;
    `publish` sends several in one message, as Dynamo's relay sends an engine's batch.
    """

    def __init__(self, events: EventPublisher, worker_id: int, dp_rank: int = 0,
                 storage_tier: str = DEVICE_TIER) -> None:
        self.events = events
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.storage_tier = storage_tier
        self.next_event_id = 1

    async def publish(self, *batch: KvEventData | Literal["cleared"]) -> list[int]:
        """The events of `batch`, in order, in one message; their ids."""
        if not batch:
            return []
        first = self.next_event_id
        self.next_event_id += len(batch)
        events = [RouterEvent(worker_id=self.worker_id, storage_tier=self.storage_tier,
                              event=KvCacheEvent(first + offset, data, self.dp_rank))
                  for offset, data in enumerate(batch)]
        await self.events.publish(encode_kv_events(events))
        return list(range(first, self.next_event_id))

    async def stored(self, blocks: Sequence[tuple[int, int]], parent_hash: int | None = None) -> int:
        """Blocks stored, each (block_hash, tokens_hash), after `parent_hash`; the event's id."""
        (event_id,) = await self.publish(stored_data(blocks, parent_hash))
        return event_id

    async def removed(self, block_hashes: Sequence[int]) -> int:
        (event_id,) = await self.publish(removed_data(block_hashes))
        return event_id

    async def cleared(self) -> int:
        """Every block of this source dropped."""
        (event_id,) = await self.publish("cleared")
        return event_id
