"""A real aggregator process and real Dynamo 1.6.1 workers (ai-dynamo-runtime, the `dynamo` test extra).

Workers (tests/dynamo_worker.py) publish through Dynamo's own `WorkerMetricsPublisher`,
`KvEventPublisher` (its Python API and its engine relay) and `FpmDirectPublisher` on the
NATS event plane, and register their model in the file discovery backend, on a loopback
nats-server; every Dynamo process is loopback-pinned by the harness. The aggregator's
/metrics, parsed with prometheus_client, must show the exact values published, the capacity
of the model card, keep an idle registered worker, and drop it when it stops; without
discovery, `--stale-after` decides. With the `nats` request plane, `$SRV.STATS` gives each
worker's request counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from ..support import http_get, in_thread, samples, scrape, wait_until

pytest.importorskip("dynamo.llm", reason="the `dynamo` test extra (ai-dynamo-runtime) is not installed")
pytest.importorskip("zmq", reason="the `dynamo` test extra (pyzmq) is not installed")

WAIT_S = 30.0
# FpmDirectPublisher.publish takes every field; one iteration: 1 prefill (100 computed, 50 from cache), 2 decodes.
IDLE_FPM = {"scheduled_num_prefill_requests": 0, "scheduled_sum_prefill_tokens": 0,
            "scheduled_sum_prefill_kv_tokens": 0, "scheduled_num_decode_requests": 0,
            "scheduled_sum_decode_kv_tokens": 0, "queued_num_prefill_requests": 0, "queued_sum_prefill_tokens": 0,
            "queued_num_decode_requests": 0, "queued_sum_decode_kv_tokens": 0, "wall_time_secs": 0.0}
RUNTIME_CONFIG = {"total_kv_blocks": 4096, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                  "data_parallel_start_rank": 0, "data_parallel_size": 2}


def by_rank(families: dict, name: str, sample: str | None = None, **labels: str) -> dict[int, float]:
    """{dp_rank: value} of one family's samples (with `labels`)."""
    found = {}
    for key, value in samples(families, name, sample).items():
        key_labels = dict(key)
        if labels.items() <= key_labels.items():
            found[int(key_labels["dp_rank"])] = value
    return found


async def until(aggregator, check: Callable[[dict], bool], what: str, timeout: float = WAIT_S) -> dict:
    def attempt():
        families = scrape(aggregator.url)
        return families if check(families) else None
    try:
        return await in_thread(wait_until, attempt, timeout, 0.2, what)
    except AssertionError:
        raise AssertionError(f"{what}:\n{http_get(aggregator.url + '/metrics')[2].decode()[-6000:]}\n"
                             f"{aggregator.output()[-3000:]}") from None


async def test_a_real_worker_shows_its_exact_values_and_capacity_survives_idle_and_goes_when_stopped(
        nats_server, processes, dynamo_workers, tmp_path):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "2", "--discovery-backend", "file",
                                      "--discovery-file-kv", str(tmp_path), "--discovery-file-scan-interval", "0.2")
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path))
    command = worker.command
    await in_thread(command, "register", **RUNTIME_CONFIG)
    await in_thread(command, "load", dp_rank=0, active_decode_blocks=5, kv_used_blocks=7)
    await in_thread(command, "load", dp_rank=1, active_decode_blocks=None, kv_used_blocks=3)
    # Rank 0 through the Python API: two blocks stored, one removed.
    await in_thread(command, "kv_stored", dp_rank=0, token_ids=list(range(32)), num_block_tokens=[16, 16],
                    block_hashes=[11, 12])
    await in_thread(command, "kv_removed", dp_rank=0, block_hashes=[11])
    # Rank 1 as an engine publishes, through the runtime's relay: stored, cleared, stored again.
    await in_thread(command, "engine_kv", dp_rank=1, seq=0,
                    events=[["BlockStored", [10, 11], None, list(range(32)), 16, None, "GPU"]])
    await in_thread(command, "engine_kv", dp_rank=1, seq=1, events=[["AllBlocksCleared"]])
    await in_thread(command, "engine_kv", dp_rank=1, seq=2,
                    events=[["BlockStored", [5], None, list(range(16)), 16, None, "GPU"]])
    await in_thread(command, "fpm", worker_id=str(worker.worker_id), dp_rank=0, **{
        **IDLE_FPM, "scheduled_num_prefill_requests": 1, "scheduled_sum_prefill_tokens": 100,
        "scheduled_sum_prefill_kv_tokens": 50, "scheduled_num_decode_requests": 2, "queued_num_prefill_requests": 3,
        "queued_num_decode_requests": 4, "wall_time_secs": 0.25})
    mine = {"worker_id": str(worker.worker_id), "component": "backend", "endpoint": "generate"}

    def complete(families: dict) -> bool:
        return (by_rank(families, "llm_kv_cached_blocks", **mine) == {0: 1, 1: 1}
                and by_rank(families, "llm_prefill_tokens_computed", "llm_prefill_tokens_computed_total") == {0: 100}
                and len(by_rank(families, "llm_kv_blocks_total", **mine)) == 2)

    families = await until(aggregator, complete, "every value the worker published")
    assert by_rank(families, "llm_kv_blocks_active", **mine) == {0: 7, 1: 3}
    assert by_rank(families, "llm_kv_active_decode_blocks", **mine) == {0: 5}
    assert by_rank(families, "llm_kv_blocks_total", **mine) == {0: 4096, 1: 4096}
    assert by_rank(families, "llm_requests_total_slots", **mine) == {0: 256, 1: 256}
    assert by_rank(families, "llm_kv_cached_blocks", storage_tier="device", **mine) == {0: 1, 1: 1}
    assert by_rank(families, "llm_kv_cached_blocks_reliable", **mine) == {0: 1, 1: 1}
    assert by_rank(families, "llm_prefill_tokens_from_cache", "llm_prefill_tokens_from_cache_total") == {0: 50}
    assert by_rank(families, "llm_forward_pass_duration_seconds", "llm_forward_pass_duration_seconds_count") == {0: 1}
    assert by_rank(families, "llm_forward_pass_duration_seconds", "llm_forward_pass_duration_seconds_sum") == {0: 0.25}
    assert samples(families, "llm_load_avg") == {(("component", "backend"), ("endpoint", "generate")): 5.0}
    # The iteration (3 running, 7 waiting) is followed by the idle heartbeat: none of either.
    await until(aggregator, lambda f: by_rank(f, "llm_requests_waiting") == {0: 0}
                and by_rank(f, "llm_requests_active_slots") == {0: 0}, "the idle heartbeat's zeros")
    rejected = samples(families, "llm_aggregator_messages_rejected", "llm_aggregator_messages_rejected_total")
    assert {labels: value for labels, value in rejected.items() if value} == {}
    lost = samples(families, "llm_aggregator_event_plane_lost_events", "llm_aggregator_event_plane_lost_events_total")
    assert set(lost.values()) == {0}

    # Idle for three times --stale-after: rank 1 sends nothing at all (1.6.1 has no kv_metrics heartbeat),
    # and its instance entry keeps it.
    await asyncio.sleep(6)
    families = scrape(aggregator.url)
    assert by_rank(families, "llm_kv_blocks_active", **mine) == {0: 7, 1: 3}
    group = (("component", "backend"), ("endpoint", "generate"))
    assert samples(families, "llm_workers_expired", "llm_workers_expired_total") == {group: 0}

    # A clean stop deletes the worker's entries: both ranks go at once, not --stale-after later.
    assert await in_thread(worker.exit) == 0
    families = await until(aggregator, lambda f: samples(f, "llm_workers") == {group: 0}, "the stopped worker gone")
    assert samples(families, "llm_workers_deregistered", "llm_workers_deregistered_total") == {group: 2}
    assert samples(families, "llm_kv_blocks_active") == {}
    health = http_get(aggregator.url + "/health")[2].decode()
    assert '"discovery"' in health and '"connected": true' in health.replace('":true', '": true')


async def test_without_discovery_stale_after_decides_and_forward_pass_heartbeats_keep_a_worker(
        nats_server, processes, dynamo_workers, tmp_path):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "2")
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path))
    await in_thread(worker.command, "load", dp_rank=1, kv_used_blocks=3)  # and then nothing: change-only
    await in_thread(worker.command, "fpm", worker_id=str(worker.worker_id), dp_rank=0, **{
        **IDLE_FPM, "scheduled_num_decode_requests": 1, "wall_time_secs": 0.01})  # then an idle heartbeat every second
    await until(aggregator, lambda f: by_rank(f, "llm_kv_blocks_active") == {1: 3}, "rank 1's load")
    group = (("component", "backend"), ("endpoint", "generate"))
    families = await until(aggregator, lambda f: samples(f, "llm_workers_expired", "llm_workers_expired_total")
                           == {group: 1}, "the idle rank expired")
    assert by_rank(families, "llm_kv_blocks_active") == {}
    await asyncio.sleep(4)  # twice --stale-after: the heartbeats keep rank 0
    families = scrape(aggregator.url)
    assert samples(families, "llm_workers") == {group: 1}
    assert by_rank(families, "llm_requests_active_slots") == {0: 0}
    assert samples(families, "llm_workers_expired", "llm_workers_expired_total") == {group: 1}


async def test_srv_stats_of_a_real_worker_on_the_nats_request_plane_give_its_request_counters(
        nats_server, processes, dynamo_workers, tmp_path):
    aggregator = processes.aggregator(nats_server.url, "--scrape", "backend/generate", "--poll-interval", "0.5",
                                      "--stale-after", "5")
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path), request_plane="nats")
    for request in range(3):
        answer = await in_thread(worker.command, "call", request={"n": request})
        assert answer["responses"]
    mine = {"worker_id": str(worker.worker_id)}
    families = await until(aggregator, lambda f: by_rank(f, "llm_worker_requests", "llm_worker_requests_total",
                                                         **mine) == {0: 3}, "the worker's three requests")
    assert by_rank(families, "llm_worker_request_errors", "llm_worker_request_errors_total", **mine) == {0: 0}
    (seconds,) = by_rank(families, "llm_worker_processing_seconds", "llm_worker_processing_seconds_total",
                         **mine).values()
    assert 0 < seconds < 60  # nanoseconds on the wire, seconds here
    errors = samples(families, "llm_aggregator_stats_scrape_errors", "llm_aggregator_stats_scrape_errors_total")
    assert {dict(labels)["reason"] for labels, value in errors.items() if value} <= {"not_connected"}  # at start
    accepted = samples(families, "llm_aggregator_stats_scrape_endpoints", "llm_aggregator_stats_scrape_endpoints_total")
    assert accepted[(("outcome", "accepted"), ("service", "dynamo_backend"))] >= 1
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # polled again and again: still the same worker, still alive
        await asyncio.sleep(0.5)
    assert by_rank(scrape(aggregator.url), "llm_worker_requests", "llm_worker_requests_total", **mine) == {0: 3}
