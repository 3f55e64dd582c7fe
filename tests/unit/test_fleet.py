"""Fleet state and expiry on plain values (no clock, no I/O)."""

from __future__ import annotations

import pytest

from aggregator.state.fleet import Fleet, GroupKey, LimitExceeded, WorkerKey
from fleet_protocol import (
    ForwardPassMetrics,
    KvHitRateEvent,
    KvStats,
    LoadEvent,
    WorkerStats,
)


def load(worker_id: int, active: int, *, total: int = 100, rank: int | None = None, endpoint: str = "generate"):
    return LoadEvent(worker_id, ForwardPassMetrics(WorkerStats(1, 10, 0, rank), KvStats(active, total)), endpoint)


def test_load_is_kept_per_worker_and_averaged_per_group():
    fleet = Fleet(stale_after=10)
    fleet.observe_load("backend", load(1, 10), now=0)
    fleet.observe_load("backend", load(2, 30), now=0)
    fleet.observe_load("prefill", load(3, 99), now=0)
    stats = {s.key: s for s in fleet.group_stats()}
    assert stats[GroupKey("backend", "generate")].live_workers == 2
    assert stats[GroupKey("backend", "generate")].load_avg == 20.0
    assert stats[GroupKey("backend", "generate")].load_std == 10.0
    assert stats[GroupKey("prefill", "generate")].load_avg == 99.0


def test_a_newer_message_replaces_the_older_one():
    fleet = Fleet(stale_after=10)
    fleet.observe_load("backend", load(1, 10), now=0)
    fleet.observe_load("backend", load(1, 50), now=1)
    (state,) = fleet.workers.values()
    assert state.load.kv_stats.kv_active_blocks == 50


def test_data_parallel_ranks_are_separate_workers():
    fleet = Fleet(stale_after=10)
    fleet.observe_load("backend", load(1, 10, rank=0), now=0)
    fleet.observe_load("backend", load(1, 30, rank=1), now=0)
    assert set(fleet.workers) == {WorkerKey("backend", "generate", 1, 0), WorkerKey("backend", "generate", 1, 1)}


def test_expiry_is_exact_and_removes_the_worker_from_the_statistics():
    fleet = Fleet(stale_after=5)
    fleet.observe_load("backend", load(1, 10), now=0)
    fleet.observe_load("backend", load(2, 30), now=3)
    assert fleet.expire(now=4.999) == []
    assert fleet.expire(now=5.0) == [WorkerKey("backend", "generate", 1, 0)]
    (stats,) = fleet.group_stats()
    assert (stats.live_workers, stats.load_avg, stats.load_std) == (1, 30.0, 0.0)
    assert stats.totals.expired == 1


def test_a_refresh_postpones_expiry():
    fleet = Fleet(stale_after=5)
    fleet.observe_load("backend", load(1, 10), now=0)
    fleet.observe_load("backend", load(2, 10), now=1)
    fleet.observe_load("backend", load(1, 10), now=4)
    assert fleet.expire(now=6.5) == [WorkerKey("backend", "generate", 2, 0)]
    assert fleet.expire(now=8.9) == []
    assert fleet.expire(now=9.0) == [WorkerKey("backend", "generate", 1, 0)]


def test_zero_live_workers_keep_the_group_with_count_zero_and_no_load():
    fleet = Fleet(stale_after=1)
    fleet.observe_load("backend", load(1, 10), now=0)
    fleet.expire(now=2)
    (stats,) = fleet.group_stats()
    assert (stats.live_workers, stats.load_avg, stats.load_std) == (0, None, None)


def test_hit_rate_events_accumulate_per_worker_and_per_group():
    fleet = Fleet(stale_after=10)
    fleet.observe_hit_rate("backend", KvHitRateEvent(1, 10, 5), now=0)
    fleet.observe_hit_rate("backend", KvHitRateEvent(1, 10, 0), now=0)
    fleet.observe_hit_rate("backend", KvHitRateEvent(2, 20, 20), now=0)
    w1 = fleet.workers[WorkerKey("backend", "generate", 1, 0)]
    assert (w1.isl_blocks, w1.overlap_blocks) == (20, 5)
    (stats,) = fleet.group_stats()
    assert stats.hit_rate_percent == 100 * 25 / 40


def test_group_hit_rate_keeps_the_history_of_expired_workers():
    fleet = Fleet(stale_after=1)
    fleet.observe_hit_rate("backend", KvHitRateEvent(1, 10, 5), now=0)
    fleet.expire(now=5)
    (stats,) = fleet.group_stats()
    assert (stats.totals.isl_blocks, stats.totals.overlap_blocks, stats.live_workers) == (10, 5, 0)


def test_hit_rate_events_follow_the_endpoint_the_worker_reports_load_on():
    fleet = Fleet(stale_after=10)
    fleet.observe_load("backend", load(1, 10, endpoint="chat"), now=0)
    fleet.observe_hit_rate("backend", KvHitRateEvent(1, 10, 5), now=0)
    assert list(fleet.workers) == [WorkerKey("backend", "chat", 1, 0)]
    assert fleet.workers[WorkerKey("backend", "chat", 1, 0)].isl_blocks == 10


def test_hit_rate_events_without_load_use_the_default_endpoint():
    fleet = Fleet(stale_after=10, default_endpoint="my_endpoint")
    fleet.observe_hit_rate("backend", KvHitRateEvent(1, 10, 5), now=0)
    assert list(fleet.workers) == [WorkerKey("backend", "my_endpoint", 1, 0)]


def test_worker_limit_refuses_new_workers_and_keeps_existing_ones():
    fleet = Fleet(stale_after=10, max_workers=2)
    fleet.observe_load("backend", load(1, 10), now=0)
    fleet.observe_load("backend", load(2, 10), now=0)
    with pytest.raises(LimitExceeded) as caught:
        fleet.observe_load("backend", load(3, 10), now=0)
    assert caught.value.reason == "worker_limit"
    fleet.observe_load("backend", load(1, 20), now=1)  # existing workers still update
    assert len(fleet) == 2
    assert fleet.workers[WorkerKey("backend", "generate", 1, 0)].load.kv_stats.kv_active_blocks == 20


def test_group_limit():
    fleet = Fleet(stale_after=10, max_groups=1)
    fleet.observe_load("a", load(1, 10), now=0)
    with pytest.raises(LimitExceeded) as caught:
        fleet.observe_load("b", load(2, 10), now=0)
    assert caught.value.reason == "group_limit"


def test_churn_of_many_workers_leaves_only_the_live_set():
    fleet = Fleet(stale_after=1)
    for i in range(10_000):
        fleet.observe_load("backend", load(i, 1), now=i / 1000)
        fleet.expire(now=i / 1000)
    assert len(fleet) <= 1001
    assert len(fleet._endpoint_of) == len(fleet)
