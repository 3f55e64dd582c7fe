"""The mergeable partials add up the same load as llm_load_avg/std, from either wire generation."""

from __future__ import annotations

import fleet_protocol as protocol
from aggregator.collectors.fleet_partials import FleetPartialsCollector
from aggregator.state.fleet import Fleet


def partials(fleet: Fleet) -> dict[str, dict[tuple[str, str], float]]:
    out: dict[str, dict[tuple[str, str], float]] = {}
    for family in FleetPartialsCollector(fleet).collect():
        for sample in family.samples:
            out.setdefault(family.name, {})[(sample.labels["component"], sample.labels["endpoint"])] = sample.value
    return out


def test_dynamo_1_workers_are_in_the_partials_and_idle_groups_are_not():
    fleet = Fleet(stale_after=10)
    for worker_id, used in ((1, 30), (2, 50)):
        fleet.observe_active_load("backend", "generate", 7, protocol.ActiveLoad(
            worker_id=worker_id, dp_rank=0, active_decode_blocks=None, active_prefill_tokens=None,
            kv_used_blocks=used), now=0.0)
    fleet.observe_active_load("idle", "generate", 8, protocol.ActiveLoad(
        worker_id=3, dp_rank=0, active_decode_blocks=None, active_prefill_tokens=None, kv_used_blocks=None), now=0.0)
    found = partials(fleet)
    assert found["llm_load_workers"] == {("backend", "generate"): 2}
    assert found["llm_load_sum"] == {("backend", "generate"): 80}
    assert found["llm_load_sum_squares"] == {("backend", "generate"): 30 * 30 + 50 * 50}
    (stats,) = [s for s in fleet.group_stats() if s.key.component == "backend"]
    assert stats.load_avg == found["llm_load_sum"][("backend", "generate")] / 2
