"""Pull mode end to end: nats-server, the aggregator process scraping `$SRV.STATS`, NATS micro services."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import nats
import pytest

from fleet_protocol.service_stats import endpoint_name, service_name
from fleet_runtime.nats_settle import settle
from mock_worker.fleet import build_engines

from ..support import mock_worker, samples, scrape, wait_until

SEED, WORKERS, STEPS, INTERVAL = 11, 3, 20, 0.1
# Series that legitimately differ between two runs: wall-clock times.
TIME_FAMILIES = {"llm_worker_last_seen_timestamp_seconds"}


def simulated_truth() -> dict[str, tuple[int, int, int]]:
    """worker_id -> (kv_active_blocks, isl_blocks, overlap_blocks) once the mock fleet has frozen."""
    truth = {}
    for worker_id, (engine,) in build_engines(WORKERS, SEED):
        isl = overlap = 0
        for _ in range(STEPS):
            hit_rate_samples, _ = engine.step(INTERVAL)
            isl += sum(s.isl_blocks for s in hit_rate_samples)
            overlap += sum(s.overlap_blocks for s in hit_rate_samples)
        truth[str(worker_id)] = (engine.metrics().kv_stats.kv_active_blocks, isl, overlap)
    return truth


def fleet_series(families: dict, component: str) -> dict[tuple, float]:
    """Every fleet `llm_*` sample of one component, keyed by (sample name, labels without the component)."""
    series = {}
    for name, family in families.items():
        if not name.startswith("llm_") or name.startswith("llm_aggregator_") or name in TIME_FAMILIES:
            continue
        for sample in family.samples:
            if sample.labels.get("component") == component:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "component"))
                series[(sample.name, labels)] = sample.value
    return series


def observed(series: dict[tuple, float]) -> dict[str, tuple[float, float, float]]:
    per_worker: dict[str, list[float]] = {}
    for (name, labels), value in series.items():
        worker = dict(labels).get("worker_id")
        slot = {"llm_kv_blocks_active": 0, "llm_kv_hit_rate_isl_blocks_total": 1,
                "llm_kv_hit_rate_overlap_blocks_total": 2}.get(name)
        if worker is not None and slot is not None:
            per_worker.setdefault(worker, [0.0, 0.0, 0.0])[slot] = value
    return {worker: tuple(values) for worker, values in per_worker.items()}


def test_the_same_fleet_pushed_and_pulled_gives_the_same_series(nats_server, processes):
    # One aggregator doing both at once: component `pushed` arrives on kv_metrics,
    # component `pulled` is scraped from its workers' NATS micro services.
    aggregator = processes.aggregator(nats_server.url, "--scrape", "pulled/generate", "--poll-interval", "0.3")
    # Dynamo 0.x's two ways of reporting load: the legacy protocol's.
    common = ["--protocol", "legacy", "--workers", str(WORKERS), "--seed", str(SEED), "--interval", str(INTERVAL),
              "--freeze-after", str(STEPS)]
    processes.add(mock_worker(nats_server.url, "--component", "pushed", *common))
    processes.add(mock_worker(nats_server.url, "--component", "pulled", "--mode", "pull", *common))

    truth = simulated_truth()
    assert all(isl > 0 for _, isl, _ in truth.values())  # the seed exercises the hit-rate series too

    def both_frozen():
        families = scrape(aggregator.url)
        return all(observed(fleet_series(families, c)) == truth for c in ("pushed", "pulled")) and families

    families = wait_until(both_frozen, 30, interval=0.2, what="both fleets at the simulated state")
    pushed, pulled = fleet_series(families, "pushed"), fleet_series(families, "pulled")
    assert pushed == pulled
    names = {name for name, _ in pushed}
    assert {"llm_kv_blocks_active", "llm_kv_blocks_total", "llm_requests_active_slots", "llm_requests_waiting",
            "llm_gpu_cache_usage_ratio", "llm_kv_hit_rate_percent", "llm_workers", "llm_load_avg",
            "llm_load_std", "llm_fleet_kv_hit_rate_percent"} <= names
    assert pushed[("llm_workers", (("endpoint", "generate"),))] == WORKERS
    service = {"service": "dynamo_pulled"}
    accepted = samples(families, "llm_aggregator_stats_scrape_endpoints", "llm_aggregator_stats_scrape_endpoints_total")
    assert accepted[tuple(sorted({**service, "outcome": "accepted"}.items()))] >= WORKERS
    errors = samples(families, "llm_aggregator_stats_scrape_errors", "llm_aggregator_stats_scrape_errors_total")
    assert {dict(k)["reason"] for k, v in errors.items() if v} <= {"not_connected"}


def kv(active: int) -> dict:
    return {"worker_stats": {"request_active_slots": 1, "request_total_slots": 8, "num_requests_waiting": 0,
                             "data_parallel_rank": None},
            "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": 100, "gpu_cache_usage_perc": None,
                         "gpu_prefix_cache_hit_rate": None}, "spec_decode_stats": None}


async def test_exact_subjects_and_one_bad_endpoint_spoil_nothing_else(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--scrape", "backend/generate", "--poll-interval", "0.3")
    service = service_name("dynamo", "backend")
    # Endpoint name -> what its stats handler returns. Dynamo's prefix match would have read
    # `generate2-a` as worker 0xa and `generate2-b` as worker 0xb of `generate`.
    stats = {
        endpoint_name("generate", 0xA): kv(10),
        endpoint_name("generate2", 0xA): kv(77),
        endpoint_name("generate2", 0xB): kv(78),
        endpoint_name("generate", 0xC): {"kv_stats": "garbage"},
        endpoint_name("generate", 0xD): kv(40),
        "generate": kv(99),  # static endpoint: names no worker
        endpoint_name("generate", 0xE): None,  # no stats handler
    }
    nc = await nats.connect(nats_server.url)
    try:
        from nats.micro import add_service

        async def answer(request) -> None:
            await request.respond(b"{}")

        instance = await add_service(nc, name=service, version="0.0.1",
                                     stats_handler=lambda endpoint: stats[endpoint.name])
        group = instance.add_group(name=service)
        for name in stats:
            await group.add_endpoint(name=name, handler=answer)

        # Two more instances answering by hand: one with malformed entries before a good one, one not JSON.
        entries = [5, {"subject": 7, "data": kv(98)},
                   {"name": "generate-f", "subject": f"{service}.generate-f", "data": kv(60)}]

        async def broken_entries(msg) -> None:
            await msg.respond(json.dumps({"type": "io.nats.micro.v1.stats_response", "name": service,
                                          "endpoints": entries}).encode())

        async def not_json(msg) -> None:
            await msg.respond(b"{not json")

        await nc.subscribe(f"$SRV.STATS.{service}", cb=broken_entries)
        await nc.subscribe(f"$SRV.STATS.{service}", cb=not_json)
        await settle(nc)

        def error_counts():
            families = scrape(aggregator.url)
            errors = samples(families, "llm_aggregator_stats_scrape_errors",
                             "llm_aggregator_stats_scrape_errors_total")
            counts = {dict(k)["reason"]: v for k, v in errors.items() if v and dict(k)["reason"] != "not_connected"}
            wanted = {"wrong_type", "no_worker_id", "no_data", "not_json"}
            return (families, counts) if set(counts) == wanted else None

        families, counts = await asyncio.to_thread(wait_until, error_counts, 15, what="every kind of bad entry")
        active = {dict(k)["worker_id"]: (dict(k)["endpoint"], v)
                  for k, v in samples(scrape(aggregator.url), "llm_kv_blocks_active").items()}
        assert active == {"10": ("generate", 10.0), "13": ("generate", 40.0), "15": ("generate", 60.0)}
        # Per scrape: `garbage` data + two malformed entries are wrong_type, one of each other reason.
        assert counts["wrong_type"] == 3 * counts["no_worker_id"]
        assert counts["no_worker_id"] == counts["no_data"] == counts["not_json"]
        ignored = samples(families, "llm_aggregator_stats_scrape_endpoints",
                          "llm_aggregator_stats_scrape_endpoints_total")
        assert ignored[(("outcome", "ignored"), ("service", service))] == 2 * counts["no_data"]
        assert aggregator.health() == 200 and aggregator.popen.poll() is None
    finally:
        await nc.close()


def test_a_killed_pull_worker_expires_and_a_silent_service_is_survived(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--scrape", "backend/generate", "--poll-interval", "0.3",
                                      "--stale-after", "1.5")
    first = processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--mode", "pull", "--workers", "2",
                                      "--seed", "1", "--interval", "0.2"))
    second = processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--mode", "pull", "--workers", "2",
                                       "--seed", "2", "--interval", "0.2"))
    ids = {seed: {str(worker_id) for worker_id, _ in build_engines(2, seed)} for seed in (1, 2)}

    def workers():
        return {dict(k)["worker_id"] for k in samples(scrape(aggregator.url), "llm_kv_blocks_active")}

    wait_until(lambda: workers() == ids[1] | ids[2], 20, what="4 pulled workers")
    first.signal(signal.SIGKILL)  # no drain, no goodbye: its services just vanish
    first.popen.wait(10)
    wait_until(lambda: workers() == ids[2], 10, what="the killed process's workers to expire")
    families = scrape(aggregator.url)
    assert samples(families, "llm_workers_expired", "llm_workers_expired_total") == {
        (("component", "backend"), ("endpoint", "generate")): 2.0}

    def timeouts():
        return samples(scrape(aggregator.url), "llm_aggregator_stats_scrape_timeouts",
                       "llm_aggregator_stats_scrape_timeouts_total")[(("service", "dynamo_backend"),)]

    before = timeouts()
    second.signal(signal.SIGKILL)
    second.popen.wait(10)
    wait_until(lambda: not workers() and timeouts() >= before + 2, 10, what="no workers, scrapes timing out")
    assert aggregator.health() == 200 and aggregator.popen.poll() is None


@pytest.mark.parametrize("args,env,expected", [
    (["--scrape", "backend"], {}, "--scrape: 'backend' is not COMPONENT/ENDPOINT"),
    (["--scrape", "back.end/generate"], {}, "--scrape: 'back.end' must be"),
    ([], {"AGGREGATOR_SCRAPE": "backend/generate,x"}, "(env AGGREGATOR_SCRAPE)"),
    (["--scrape", "a/b", "--scrape", "A/b"], {}, "both NATS service 'dynamo_a'"),
    (["--poll-interval", "0.01"], {}, "--poll-interval: 0.01 is outside"),
    (["--poll-interval", "1", "--scrape-timeout", "1.5"], {}, "--scrape-timeout: 1.5 must be below --poll-interval"),
    (["--scrape", "a/b", "--poll-interval", "10", "--stale-after", "5"], {}, "must be below --stale-after"),
])
def test_bad_pull_configuration_fails_at_start_with_one_line(args, env, expected):
    result = subprocess.run([sys.executable, "-m", "aggregator", *args], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_mock_worker_refuses_pull_mode_with_several_dp_ranks():
    result = subprocess.run([sys.executable, "-m", "mock_worker", "--protocol", "legacy", "--mode", "pull",
                             "--dp-ranks", "2"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--dp-ranks" in result.stderr
