"""The simulated engine behaves like an engine: bounded, queueing, reusing prefixes, reproducible."""

from __future__ import annotations

import random

import pytest

from mock_worker.engine import EngineConfig, SimulatedEngine
from mock_worker.fleet import worker_ids


def run(seed: int, steps: int = 600, dt: float = 0.5, config: EngineConfig | None = None):
    engine = SimulatedEngine(config or EngineConfig(), random.Random(seed))
    history = []
    for _ in range(steps):
        samples, done = engine.step(dt)
        history.append((engine.metrics(), samples, done))
    return history


def test_a_seed_reproduces_the_run_exactly():
    assert run(3, 100) == run(3, 100)
    assert run(3, 100) != run(4, 100)


def test_usage_never_exceeds_capacity():
    for metrics, samples, _ in run(1):
        assert 0 <= metrics.worker_stats.request_active_slots <= metrics.worker_stats.request_total_slots
        assert 0 <= metrics.kv_stats.kv_active_blocks <= metrics.kv_stats.kv_total_blocks
        assert 0 <= metrics.kv_stats.gpu_cache_usage_perc <= 1
        for sample in samples:
            assert 0 <= sample.overlap_blocks <= sample.isl_blocks


def test_load_varies_and_prefixes_get_reused():
    history = run(2)
    actives = [m.kv_stats.kv_active_blocks for m, _, _ in history]
    assert max(actives) > 2 * (min(actives) + 1)  # a load wave, not a constant
    isl = sum(s.isl_blocks for _, samples, _ in history for s in samples)
    overlap = sum(s.overlap_blocks for _, samples, _ in history for s in samples)
    assert 0.05 < overlap / isl < 0.95
    assert history[-1][0].kv_stats.gpu_prefix_cache_hit_rate > 0


def test_an_overloaded_engine_queues_requests():
    busy = EngineConfig(total_slots=4, mean_arrival_rate=20, load_wave_depth=0)
    history = run(5, 100, config=busy)
    assert max(m.worker_stats.num_requests_waiting for m, _, _ in history) > 10
    assert max(m.worker_stats.request_active_slots for m, _, _ in history) == 4


def test_requests_finish_and_some_fail():
    done = [c for _, _, completions in run(6, 1200) for c in completions]
    assert len(done) > 1000
    errors = [c for c in done if c.error]
    assert 0 < len(errors) < len(done) * 0.05
    assert all(c.latency > 0 and c.output_tokens >= 0 for c in done)


def test_worker_ids_are_lease_like_and_distinct():
    ids = worker_ids(1000, random.Random(1))
    assert len(set(ids)) == 1000
    assert all(2**62 <= i < 2**63 for i in ids)


@pytest.mark.parametrize("protocol", ["dynamo-1", "legacy"])
async def test_the_mock_workers_in_flight_gauge_is_the_engines_running_requests(nats_server, protocol):
    import nats
    from prometheus_client.parser import text_string_to_metric_families

    from mock_worker.fleet import MockFleet

    nc = await nats.connect(nats_server.url)
    try:
        fleet = MockFleet(nc, workers=3, seed=5, dp_ranks=2, protocol=protocol)
        await fleet.start()
        seen = set()
        for _ in range(12):
            await fleet.tick(0.5)
            for worker in fleet.workers:
                families = text_string_to_metric_families(worker.runtime.render()[0].decode())
                (inflight,) = [s.value for f in families for s in f.samples
                               if s.name == "dynamo_component_inflight_requests"]
                assert inflight == sum(len(engine.running) for engine in worker.engines)
                seen.add(inflight)
        assert max(seen) > 0 and len(seen) > 3  # it follows the load, not a constant 0
        fleet.close()
    finally:
        await nc.close()
