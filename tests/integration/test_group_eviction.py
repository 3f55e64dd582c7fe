"""The group table forgets: past --max-groups, the group idle longest (no live worker) makes room.

Component/endpoint totals outlive their workers, so before eviction 10,000 junk component
names (under a second of traffic) refused every new component until a restart, even once all
the junk workers had expired.
"""

from __future__ import annotations

import json

import pytest

from aggregator.state.fleet import (
    Fleet,
    GroupKey,
    GroupTotals,
    LimitExceeded,
    WorkerKey,
)
from fleet_protocol import (
    ForwardPassMetrics,
    KvHitRateEvent,
    KvStats,
    LoadEvent,
    WorkerStats,
)

from ..support import publish, samples, scrape, wait_until


def load(worker_id: int) -> LoadEvent:
    return LoadEvent(worker_id, ForwardPassMetrics(WorkerStats(1, 10), KvStats(1, 100)))


def worker(component: str, worker_id: int) -> WorkerKey:
    return WorkerKey(component, "generate", worker_id, 0)


def group(component: str) -> GroupKey:
    return GroupKey(component, "generate")


def test_the_group_idle_longest_is_evicted_only_when_the_table_is_full():
    fleet = Fleet(stale_after=5, max_groups=3)
    fleet.observe_load("a", load(1), now=0)
    fleet.observe_load("b", load(2), now=1)
    fleet.observe_load("c", load(3), now=2)
    fleet.observe_hit_rate("a", KvHitRateEvent(1, 10, 4), now=2)
    with pytest.raises(LimitExceeded) as refused:
        fleet.observe_load("d", load(4), now=3)  # every group has a live worker: the limit holds
    assert refused.value.reason == "group_limit"
    assert fleet.groups_evicted == 0

    assert fleet.expire(now=6.5) == [worker("b", 2)]
    fleet.observe_load("d", load(4), now=6.5)  # b is idle: evicted to make room
    assert set(fleet.groups) == {group("a"), group("c"), group("d")}
    assert fleet.groups_evicted == 1

    assert fleet.expire(now=7.5) == [worker("c", 3), worker("a", 1)]  # c idle first, then a
    assert fleet.groups[group("a")] == GroupTotals(10, 4, 1)  # idle groups keep their totals while there is room
    fleet.observe_load("c", load(5), now=8)  # c comes back before its eviction: its totals continue
    fleet.observe_load("e", load(6), now=8)  # so a, idle longest now, makes room
    assert set(fleet.groups) == {group("c"), group("d"), group("e")}
    assert fleet.groups[group("c")].expired == 1

    assert fleet.expire(now=12) == [worker("d", 4)]
    fleet.observe_load("a", load(1), now=12)  # a comes back after its eviction: its totals restart
    assert set(fleet.groups) == {group("a"), group("c"), group("e")}
    assert fleet.groups[group("a")] == GroupTotals()
    assert fleet.groups_evicted == 3


def test_groups_restored_from_a_snapshot_are_evictable_until_a_worker_comes_back():
    fleet = Fleet(stale_after=5, max_groups=2)
    fleet.restore_group(GroupKey("old", "generate"), 100, 50, 3)
    fleet.restore_group(GroupKey("kept", "generate"), 8, 4, 1)
    fleet.observe_load("kept", load(1), now=0)  # a live worker: no longer idle
    fleet.observe_load("new", load(2), now=0)
    assert set(fleet.groups) == {GroupKey("kept", "generate"), GroupKey("new", "generate")}
    assert fleet.groups[GroupKey("kept", "generate")] == GroupTotals(8, 4, 1)


def test_ten_thousand_expired_junk_components_do_not_keep_a_new_component_out(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "1")
    event = json.dumps({"worker_id": 1, "data": {"worker_stats": {"request_active_slots": 1,
                                                                  "request_total_slots": 8},
                                                 "kv_stats": {"kv_active_blocks": 1, "kv_total_blocks": 100}}})
    subject = "namespace.dynamo.component.{}.kv_metrics".format
    publish(nats_server.url, [(subject(f"junk{i}"), event.encode()) for i in range(10_000)])

    def junk_expired():
        workers = samples(scrape(aggregator.url), "llm_workers")
        return len(workers) == 10_000 and sum(workers.values()) == 0  # the table is full of idle groups

    wait_until(junk_expired, 30, interval=0.5, what="10,000 junk groups, their workers expired")
    publish(nats_server.url, [(subject("fresh"), event.encode())])
    wait_until(lambda: samples(scrape(aggregator.url), "llm_workers").get(
        (("component", "fresh"), ("endpoint", "generate"))) == 1, 10, what="the new component admitted")
    families = scrape(aggregator.url)
    rejected = samples(families, "llm_aggregator_messages_rejected", "llm_aggregator_messages_rejected_total")
    assert rejected[(("kind", "kv_metrics"), ("reason", "group_limit"))] == 0
    assert samples(families, "llm_aggregator_groups_evicted", "llm_aggregator_groups_evicted_total")[()] == 1
    assert samples(families, "llm_aggregator_groups")[()] == 10_000
    assert (("component", "junk0"), ("endpoint", "generate")) not in samples(families, "llm_workers")  # oldest
    assert (("component", "junk1"), ("endpoint", "generate")) in samples(families, "llm_workers")
