"""Dynamo 1.x event-plane publishers as their envelopes show them: lost events and publisher starts.

Every envelope carries its publisher's random `publisher_id` and a `sequence` that counts
that publisher's messages from 0. For each publisher the last sequence is kept; a jump is
that many events lost (NATS core drops on a slow consumer or a reconnect), a sequence 0
from an id not seen before is a publisher that started (a worker process, or a publisher
re-created in one). A publisher first seen in mid-stream (the aggregator started after it)
only starts its own count, unless its feed counts what it missed (`count_unseen`: ZMQ, whose
PUB/SUB drops what a publisher sent before the subscriber connected): then its first
sequence is that many events unseen. An envelope at or behind its publisher's last sequence
is a duplicate (the same publisher through two brokers, or through two planes at once):
`observe` says so, and the caller drops it, so that every event is applied once.

Bounded twice: the publisher table (first in, first out past `max_publishers`; an evicted
publisher seen again starts over, uncounted) and the labelled counts per (component,
endpoint, topic) (past `max_streams`, new label sets are not counted). No I/O; no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, NamedTuple

# A jump this large is no loss that happened, but a publisher id reused by another publisher.
MAX_GAP: Final = 2**32


class StreamKey(NamedTuple):
    component: str
    endpoint: str
    topic: str


class StreamCounts:
    """What the publishers of one (component, endpoint, topic) did, summed over them."""

    __slots__ = ("lost", "starts", "unseen")

    def __init__(self) -> None:
        self.lost = 0  # events missing from a publisher's sequence
        self.starts = 0  # publishers whose sequence 0 was seen
        self.unseen = 0  # events sent before a publisher was first received from (feeds that count them)


class EventPublishers:
    def __init__(self, max_publishers: int = 100_000, max_streams: int = 30_000) -> None:
        self.max_publishers = max_publishers
        self.max_streams = max_streams
        # publisher_id -> [last sequence, the counts of its stream]. An OrderedDict for its O(1) popitem:
        # a plain dict's oldest entry is found by skipping the holes earlier evictions left.
        self._last: OrderedDict[int, list] = OrderedDict()
        self.streams: dict[StreamKey, StreamCounts] = {}
        self.evicted = 0  # publishers dropped from the table to stay under max_publishers

    def __len__(self) -> int:
        return len(self._last)

    def counts(self, key: StreamKey) -> StreamCounts | None:
        """The counts of `key`'s stream, made on first use; None past `max_streams`."""
        counts = self.streams.get(key)
        if counts is None and len(self.streams) < self.max_streams:
            counts = self.streams[key] = StreamCounts()
        return counts

    def observe(self, counts: StreamCounts | None, publisher_id: int, sequence: int,
                count_unseen: bool = False) -> bool:
        """One envelope of `publisher_id` on the stream whose counts are `counts`; False for a duplicate."""
        entry = self._last.get(publisher_id)
        if entry is None or entry[1] is not counts:  # new, or an id that moved to another stream
            if entry is None and len(self._last) >= self.max_publishers:
                self._last.popitem(last=False)
                self.evicted += 1
            self._last[publisher_id] = [sequence, counts]
            if counts is not None:
                if sequence == 0:
                    counts.starts += 1
                elif count_unseen and sequence < MAX_GAP:
                    counts.unseen += sequence
            return True
        last = entry[0]
        if sequence > last:
            entry[0] = sequence
            gap = sequence - last - 1
            if gap and gap < MAX_GAP and counts is not None:
                counts.lost += gap
            return True
        return False  # at or below the last one: a duplicate, or out of order
