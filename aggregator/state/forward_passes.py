"""One worker rank's Dynamo 1.x ForwardPassMetrics: the latest iteration, prefill token counters, a histogram.

The gauges come from the latest message: running requests (scheduled prefill + decode) and
waiting ones (queued prefill + preempted decode); an idle heartbeat (wall_time 0, all zero)
says there are none. The counters add up every iteration's prefill tokens, computed and
read from the KV cache, so that rate(read) / rate(read + computed) is the engine's
prefix-cache hit rate. `counter_id` counts a publisher's messages from 1: one at or below
the last of the same publisher is a repeat and adds nothing. Iterations (wall_time > 0)
go into a histogram of their wall time. No I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

from fleet_protocol import ForwardPassMetricsV1

# Upper bounds (seconds) of the iteration wall-time histogram: a decode step of a small model
# takes a few ms, a long prefill chunk on a large one seconds.
ITERATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ForwardPasses:
    __slots__ = ("buckets", "counter_id", "iterations", "latest", "prefill_computed", "prefill_from_cache",
                 "publisher_id", "seconds")

    def __init__(self) -> None:
        self.latest: ForwardPassMetricsV1 | None = None
        self.publisher_id: int | None = None
        self.counter_id = 0
        self.prefill_computed = 0  # Σ scheduled sum_prefill_tokens
        self.prefill_from_cache = 0  # Σ scheduled sum_prefill_kv_tokens
        self.buckets: list[int] | None = None  # per bucket (not cumulative), +Inf last; made at the first iteration
        self.iterations = 0
        self.seconds = 0.0

    def observe(self, publisher_id: int, metrics: ForwardPassMetricsV1) -> bool:
        """Take one message; False if it repeats one already taken (then nothing changes)."""
        counter_id = metrics.counter_id
        if publisher_id == self.publisher_id and 0 < counter_id <= self.counter_id:
            return False
        self.publisher_id = publisher_id
        self.counter_id = counter_id
        self.latest = metrics
        scheduled = metrics.scheduled_requests
        self.prefill_computed += scheduled.sum_prefill_tokens
        self.prefill_from_cache += scheduled.sum_prefill_kv_tokens
        wall_time = metrics.wall_time
        if wall_time > 0:
            if self.buckets is None:
                self.buckets = [0] * (len(ITERATION_BUCKETS) + 1)
            self.buckets[bisect_left(ITERATION_BUCKETS, wall_time)] += 1
            self.iterations += 1
            self.seconds += wall_time
        return True

    @property
    def running(self) -> int:
        if self.latest is None:
            return 0
        scheduled = self.latest.scheduled_requests
        return scheduled.num_prefill_requests + scheduled.num_decode_requests

    @property
    def waiting(self) -> int:
        if self.latest is None:
            return 0
        queued = self.latest.queued_requests
        return queued.num_prefill_requests + queued.num_decode_requests

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """(upper bound, iterations at or below it) per bucket, as a Prometheus histogram counts; +Inf last."""
        counts = self.buckets or [0] * (len(ITERATION_BUCKETS) + 1)
        out = []
        total = 0
        for bound, count in zip((*ITERATION_BUCKETS, float("inf")), counts, strict=True):
            total += count
            out.append((bound, total))
        return out
