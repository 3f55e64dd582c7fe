"""The real thing: nats-server, the aggregator process, mock workers, scraped over HTTP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_demo.nats_server import NatsServer, free_port
from mock_worker.dynamo_events import used_blocks
from mock_worker.engine import EngineConfig
from mock_worker.fleet import build_engines

from ..support import http_get, mock_worker, publish, samples, scrape, wait_until

NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8, "num_requests_waiting": 0},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100}}


def live_workers(url: str) -> float:
    return sum(samples(scrape(url), "llm_workers").values())


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_mock_workers_appear_then_expire_when_they_stop(nats_server, processes, openmetrics):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "1.5")
    # Dynamo 0.x's JSON: capacity in every LoadEvent, hit-rate events beside it.
    workers = processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--workers", "3", "--interval",
                                        "0.2", "--seed", "7"))
    wait_until(lambda: live_workers(aggregator.url) == 3, 15, what="3 live workers")
    wait_until(lambda: samples(scrape(aggregator.url), "llm_kv_hit_rate_percent"), 10, what="hit rates")

    families = scrape(aggregator.url, openmetrics=openmetrics)
    active = samples(families, "llm_kv_blocks_active")
    assert len(active) == 3
    assert {dict(k)["worker_id"] for k in active} == {dict(k)["worker_id"] for k in samples(families, "llm_kv_blocks_total")}
    for key, value in active.items():
        assert 0 <= value <= samples(families, "llm_kv_blocks_total")[key]
        assert dict(key)["component"] == "backend" and dict(key)["endpoint"] == "generate"
    # The fleet statistics are the population mean/std of exactly the exported per-worker values.
    loads = list(active.values())
    mean = sum(loads) / 3
    (avg,) = samples(families, "llm_load_avg").values()
    (std,) = samples(families, "llm_load_std").values()
    assert avg == pytest.approx(mean)
    assert std == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in loads) / 3))
    for rate in samples(families, "llm_kv_hit_rate_percent").values():
        assert 0 <= rate <= 100

    workers.stop()
    wait_until(lambda: live_workers(aggregator.url) == 0, 10, what="workers to expire")
    families = scrape(aggregator.url, openmetrics=openmetrics)
    for name in ("llm_kv_blocks_active", "llm_kv_hit_rate_percent", "llm_load_avg", "llm_load_std",
                 "llm_worker_last_seen_timestamp_seconds"):
        assert samples(families, name) == {}, name
    expired = samples(families, "llm_workers_expired", "llm_workers_expired_total")
    assert list(expired.values()) == [3]


SEED, STEPS, INTERVAL = 21, 15, 0.1


def frozen_blocks_in_use(workers: int, seed: int) -> dict[str, int]:
    """worker_id -> KV blocks in use once a mock fleet of this seed has taken STEPS steps and frozen."""
    truth = {}
    for worker_id, (engine,) in build_engines(workers, seed):
        for _ in range(STEPS):
            engine.step(INTERVAL)
        truth[str(worker_id)] = used_blocks(engine)
    return truth


def by_worker(families: dict, name: str) -> dict[tuple[str, str], float]:
    return {(dict(k)["component"], dict(k)["worker_id"]): v for k, v in samples(families, name).items()}


def test_mock_workers_speak_dynamo_1_by_default_and_their_capacity_comes_from_discovery(
        nats_server, processes, tmp_path):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "2", "--discovery-backend", "file",
                                      "--discovery-file-kv", str(tmp_path))
    common = ("--workers", "2", "--interval", str(INTERVAL), "--freeze-after", str(STEPS), "--gpu", "none")
    # No --protocol: the default. One process registers in the aggregator's discovery directory, one does not.
    listed = processes.add(mock_worker(nats_server.url, "--component", "listed", "--seed", str(SEED),
                                       "--discovery-file-kv", str(tmp_path), *common))
    unlisted = processes.add(mock_worker(nats_server.url, "--component", "unlisted", "--seed", str(SEED + 1),
                                         *common))
    truth = {("listed", worker): blocks for worker, blocks in frozen_blocks_in_use(2, SEED).items()}
    truth |= {("unlisted", worker): blocks for worker, blocks in frozen_blocks_in_use(2, SEED + 1).items()}
    assert any(truth.values())  # the seed leaves blocks in use

    def frozen() -> dict | None:
        families = scrape(aggregator.url)
        return families if by_worker(families, "llm_kv_blocks_active") == truth else None

    families = wait_until(frozen, 30, interval=0.2,
                          what=f"the frozen fleets' blocks\n{listed.output()}\n{unlisted.output()}")
    engine = EngineConfig()
    listed_keys = [key for key in truth if key[0] == "listed"]
    # Capacity lives only in discovery in Dynamo 1.x: the listed workers have it, the others none.
    assert by_worker(families, "llm_kv_blocks_total") == dict.fromkeys(listed_keys, engine.total_blocks)
    assert by_worker(families, "llm_requests_total_slots") == dict.fromkeys(listed_keys, engine.total_slots)
    assert by_worker(families, "llm_kv_active_decode_blocks") == truth  # a 1.x-only series, for both
    assert samples(families, "llm_kv_hit_rate_percent") == {}  # 1.x has no hit-rate events
    # Frozen, the workers publish no load any more; both stay past --stale-after (entries, heartbeats).
    time.sleep(2.5)
    families = scrape(aggregator.url)
    assert by_worker(families, "llm_kv_blocks_active") == truth
    assert {dict(k)["component"]: v for k, v in samples(families, "llm_workers").items()} == {
        "listed": 2, "unlisted": 2}


def test_metrics_are_gzipped_when_asked_as_prometheus_asks(nats_server, processes):
    import gzip

    aggregator = processes.aggregator(nats_server.url)
    processes.add(mock_worker(nats_server.url, "--workers", "2", "--interval", "0.2", "--seed", "3"))
    wait_until(lambda: live_workers(aggregator.url) == 2, 15, what="2 live workers")
    status, headers, body = http_get(f"{aggregator.url}/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    families = {f.name: f for f in text_string_to_metric_families(gzip.decompress(body).decode())}
    assert len(samples(families, "llm_kv_blocks_active")) == 2
    status, headers, plain = http_get(f"{aggregator.url}/metrics")
    assert "Content-Encoding" not in headers and plain.startswith(b"# HELP")


def test_every_dynamo_subject_and_shape_over_nats(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--component", "MyComponent")
    flat = {"request_active_slots": 1, "request_total_slots": 8, "kv_active_blocks": 10, "kv_total_blocks": 100}
    publish(nats_server.url, [
        ("namespace.dynamo.component.backend.kv_metrics", json.dumps({"worker_id": 1, "data": flat}).encode()),
        ("namespace.dynamo.component.backend.kv_metrics", json.dumps({"worker_id": 2, "data": NESTED}).encode()),
        ("namespace.dynamo.component.prefill.kv_metrics",
         json.dumps({"worker_id": 3, "endpoint": "prefill", "data": {"engine_load_metrics": NESTED}}).encode()),
        ("namespace.dynamo.kv_metrics", json.dumps({"worker_id": 4, "data": NESTED}).encode()),
        ("namespace.dynamo.kv-hit-rate", b'{"worker_id":4,"isl_blocks":10,"overlap_blocks":4}'),
        ("namespace.dynamo.component.backend.kv-hit-rate", b'{"worker_id":2,"isl_blocks":10,"overlap_blocks":1}'),
        ("namespace.other.component.backend.kv_metrics", json.dumps({"worker_id": 9, "data": NESTED}).encode()),
    ])

    def exported():
        active = samples(scrape(aggregator.url), "llm_kv_blocks_active")
        return active if len(active) == 4 else None

    active = wait_until(exported, 10, what="4 workers")
    by_worker = {dict(k)["worker_id"]: (dict(k)["component"], dict(k)["endpoint"], v) for k, v in active.items()}
    assert by_worker == {
        "1": ("backend", "generate", 10), "2": ("backend", "generate", 30),
        "3": ("prefill", "prefill", 30), "4": ("MyComponent", "generate", 30),
    }
    rates = {dict(k)["worker_id"]: v for k, v in samples(scrape(aggregator.url), "llm_kv_hit_rate_percent").items()}
    assert rates == {"4": 40.0, "2": 10.0}


def test_bad_input_is_counted_logged_once_and_harms_no_one(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--max-message-bytes", "4096",
                                      env={"DYN_LOGGING_JSONL": "true"})
    good = json.dumps({"worker_id": 1, "data": NESTED}).encode()
    subject = "namespace.dynamo.component.backend.kv_metrics"
    bad = [
        b"{not json", b"\xff\xfe", b"[]", json.dumps({"worker_id": 1}).encode(),
        json.dumps({"worker_id": 1, "data": {**NESTED, "kv_stats": {"kv_active_blocks": "x", "kv_total_blocks": 1}}}).encode(),
        json.dumps({"worker_id": 1, "data": {**NESTED, "kv_stats": {"kv_active_blocks": -1, "kv_total_blocks": 1}}}).encode(),
        json.dumps({"worker_id": 1, "data": {**NESTED, "kv_stats": {"kv_active_blocks": 200, "kv_total_blocks": 1}}}).encode(),
        b" " * 5000,
    ]
    publish(nats_server.url, [(subject, good)] + [(subject, payload) for payload in bad * 3])
    publish(nats_server.url, [("namespace.dynamo.kv-hit-rate", b'{"worker_id":1,"isl_blocks":1,"overlap_blocks":5}')])

    def rejected():
        family = scrape(aggregator.url)["llm_aggregator_messages_rejected"]
        counts = {(s.labels["kind"], s.labels["reason"]): s.value for s in family.samples if s.name.endswith("_total")}
        return counts if sum(counts.values()) == len(bad) * 3 + 1 else None

    counts = wait_until(rejected, 10, what="all rejections counted")
    nonzero = {key: value for key, value in counts.items() if value}
    assert nonzero == {
        ("kv_metrics", "not_json"): 6, ("kv_metrics", "wrong_type"): 6, ("kv_metrics", "missing_field"): 3,
        ("kv_metrics", "out_of_range"): 3, ("kv_metrics", "inconsistent"): 3, ("kv_metrics", "oversized"): 3,
        ("kv_hit_rate", "inconsistent"): 1,
    }
    assert samples(scrape(aggregator.url), "llm_kv_blocks_active") == {
        (("component", "backend"), ("dp_rank", "0"), ("endpoint", "generate"), ("worker_id", "1")): 30.0}
    assert aggregator.health() == 200

    lines = [json.loads(line) for line in aggregator.output().splitlines() if line.startswith("{")]
    rejections = [line for line in lines if line.get("message") == "message rejected"]
    # Rate-limited: one line per (kind, reason, subject) however many messages were bad.
    assert sorted((r["kind"], r["reason"]) for r in rejections) == sorted(k for k in nonzero)
    assert {r["subject"] for r in rejections} == {subject, "namespace.dynamo.kv-hit-rate"}
    assert all(r["level"] == "warning" and "time" in r for r in rejections)


def test_starts_without_nats_then_follows_its_restarts(processes):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    aggregator = processes.aggregator(url, "--stale-after", "30", ready=False)
    assert aggregator.health() == 503
    status, _, body = http_get(f"{aggregator.url}/health")
    assert json.loads(body)["nats"]["connected"] is False

    server = NatsServer(port)
    try:
        server.start()
        wait_until(lambda: aggregator.health() == 200, 15, what="connected")
        publish(url, [("namespace.dynamo.component.backend.kv_metrics", json.dumps({"worker_id": 1, "data": NESTED}).encode())])
        wait_until(lambda: samples(scrape(aggregator.url), "llm_kv_blocks_active"), 10, what="first worker")

        server.kill()
        wait_until(lambda: aggregator.health() == 503, 15, what="503 while NATS is down")
        # /metrics keeps answering while disconnected
        assert samples(scrape(aggregator.url), "llm_aggregator_nats_connected") == {(): 0.0}

        server.start()
        wait_until(lambda: aggregator.health() == 200, 20, what="reconnected")
        publish(url, [("namespace.dynamo.component.backend.kv_metrics", json.dumps({"worker_id": 2, "data": NESTED}).encode())])
        wait_until(lambda: len(samples(scrape(aggregator.url), "llm_kv_blocks_active")) == 2, 10,
                   what="subscription restored after the restart")
        families = scrape(aggregator.url)
        assert samples(families, "llm_aggregator_nats_reconnects", "llm_aggregator_nats_reconnects_total") == {(): 1.0}
    finally:
        server.stop()


def test_live_is_always_ok(processes):
    aggregator = processes.aggregator(f"nats://127.0.0.1:{free_port()}", ready=False)
    status, _, body = http_get(f"{aggregator.url}/live")
    assert (status, json.loads(body)) == (200, {"status": "live"})


@pytest.mark.parametrize("args,env,expected", [
    (["--port", "70000"], {}, "--port: 70000 is not a port"),
    (["--stale-after", "0"], {}, "--stale-after: 0 is outside"),
    (["--nats-url", "http://x"], {}, "is not a NATS URL"),
    ([], {"DYN_NAMESPACE": "a.b"}, "(env DYN_NAMESPACE)"),
    ([], {"DYN_NAMESPACE": "dynamo\n"}, "must be 1-64 letters"),  # `$` alone would match before the newline
    ([], {"AGGREGATOR_PORT": "abc"}, "(env AGGREGATOR_PORT)"),
    ([], {"DYN_LOG": "loud"}, "DYN_LOG: unknown level"),
])
def test_bad_configuration_fails_at_start_with_one_line(args, env, expected):
    import os

    result = subprocess.run([sys.executable, "-m", "aggregator", *args], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
