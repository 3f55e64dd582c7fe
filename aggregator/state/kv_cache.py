"""The KV blocks a worker holds, counted from its Dynamo 1.x kv-events. No I/O.

One `CachedBlocks` per (worker, dp_rank) keeps a set of block hashes per storage tier:
`stored` adds, `removed` takes away, `cleared` empties every tier. The count is exact only
if every event since the worker started, or since its last `cleared`, was seen. It is
marked unreliable when that cannot be known: the first event seen is not event 1 (the
aggregator started later, or the worker expired and came back), an `event_id` was skipped
(lost events, counted), or a block could not be tracked under a memory limit; the next
`cleared` makes it exact again. A batch's events are applied in order; an event at or
below the last id of the same publisher is a repeat and changes nothing.

Memory is bounded by `KvBlockBudget`: blocks per (worker, dp_rank) and blocks in all; a
block past either is not tracked, counted, and its worker's count marked unreliable.
"""

from __future__ import annotations

from typing import Final

from aggregator.rejects import OUT_OF_RANGE
from fleet_protocol import KvCacheEvent, MessageRejected

# Dynamo 1.6.1 knows device, host_pinned, disk and external; room for one more, not for junk.
MAX_TIERS: Final = 5
PER_WORKER: Final = "worker"  # the `limit` a block was not tracked under
IN_TOTAL: Final = "total"


class KvBlockBudget:
    """The limits on tracked blocks, what is tracked, and what was not."""

    def __init__(self, max_per_worker: int = 1_000_000, max_total: int = 10_000_000) -> None:
        self.max_per_worker = max_per_worker
        self.max_total = max_total
        self.tracked = 0
        self.untracked = {PER_WORKER: 0, IN_TOTAL: 0}  # blocks stored but not tracked, by the limit hit


class CachedBlocks:
    """One (worker, dp_rank)'s cached blocks per storage tier, from its kv-events."""

    __slots__ = ("last_event_id", "lost_events", "publisher_id", "reliable", "tiers", "tracked")

    def __init__(self) -> None:
        self.tiers: dict[str, set[int]] = {}
        self.tracked = 0  # blocks over all tiers
        self.last_event_id: int | None = None
        self.publisher_id: int | None = None
        self.reliable = False
        self.lost_events = 0  # event ids skipped

    def check_tier(self, tier: str) -> None:
        """Raises MessageRejected (out_of_range) for a tier past MAX_TIERS; before anything is applied."""
        if tier not in self.tiers and len(self.tiers) >= MAX_TIERS:
            raise MessageRejected(OUT_OF_RANGE, f"storage tier {tier[:64]!r} past {MAX_TIERS} tiers per worker")

    def apply(self, budget: KvBlockBudget, publisher_id: int, tier: str, event: KvCacheEvent) -> bool:
        """Apply one event of `tier` from `publisher_id`; False if it was a repeat and changed nothing."""
        event_id = event.event_id
        last = self.last_event_id
        if last is None:
            self.reliable = event_id == 1  # seen from the worker's first event on
        elif publisher_id == self.publisher_id:
            if event_id <= last:
                return False
            if event_id > last + 1:
                self.lost_events += event_id - last - 1
                self.reliable = False
        elif event_id != 1:  # another publisher for this source, not from its start: events may be missed
            self.reliable = False
        self.last_event_id = event_id
        self.publisher_id = publisher_id
        data = event.data
        if isinstance(data, str):  # "cleared"
            self.release(budget)
            self.reliable = True
        elif data.stored is not None:
            blocks = self.tiers.get(tier)
            if blocks is None:
                blocks = self.tiers[tier] = set()
            for block in data.stored.blocks:
                block_hash = block.block_hash
                if block_hash in blocks:
                    continue
                if self.tracked >= budget.max_per_worker:
                    budget.untracked[PER_WORKER] += 1
                    self.reliable = False
                elif budget.tracked >= budget.max_total:
                    budget.untracked[IN_TOTAL] += 1
                    self.reliable = False
                else:
                    blocks.add(block_hash)
                    self.tracked += 1
                    budget.tracked += 1
        elif data.removed is not None:
            blocks = self.tiers.get(tier)
            if blocks:
                before = len(blocks)
                blocks.difference_update(data.removed.block_hashes)
                gone = before - len(blocks)
                self.tracked -= gone
                budget.tracked -= gone
        return True

    def release(self, budget: KvBlockBudget) -> None:
        """Forget every block (a `cleared`, or the worker gone), giving their room back to `budget`."""
        budget.tracked -= self.tracked
        self.tracked = 0
        for blocks in self.tiers.values():
            blocks.clear()

