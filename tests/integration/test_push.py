"""--push-gateway: the aggregator's exposition pushed to a real Prometheus Pushgateway.

Real Debian `prometheus-pushgateway` (installed by .ci/run), real nats-server, the real
aggregator process; the Pushgateway's /metrics parsed with prometheus_client. A receiver that
refuses, answers 500 or never answers (tests/http_receiver.py) shows failures counted while
ingest and /metrics go on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_demo.nats_server import free_port

from ..http_receiver import Receiver
from ..support import Process, http_get, publish, samples, scrape, slowest_answer, wait_until

PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
needs_pushgateway = pytest.mark.skipif(PUSHGATEWAY is None, reason="the Pushgateway is installed by .ci/run "
                                       "(Debian prometheus-pushgateway)")

LOAD_SUBJECT = "namespace.dynamo.component.backend.kv_metrics"
NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100}}
GROUP = {"job": "llm-aggregator", "instance": "agg-a"}


def load(worker_id: int, active: int = 30) -> bytes:
    return json.dumps({"worker_id": worker_id, "data": {**NESTED, "kv_stats": {"kv_active_blocks": active,
                                                                               "kv_total_blocks": 100}}}).encode()


def hit_rate(worker_id: int, isl: int, overlap: int) -> tuple[str, bytes]:
    return "namespace.dynamo.kv-hit-rate", json.dumps({"worker_id": worker_id, "isl_blocks": isl,
                                                        "overlap_blocks": overlap}).encode()


class Pushgateway:
    def __init__(self, tmp_path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # In memory only: Debian's build persists to /var/lib/prometheus by default (groups of other runs).
        self.process = Process([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{self.port}", "--persistence.file=",
                                *extra])
        self.headers: dict[str, str] = {}

    def wait_ready(self) -> Pushgateway:
        try:
            wait_until(lambda: http_get(f"{self.url}/-/ready", self.headers)[0] == 200, 20, what="Pushgateway ready")
        except AssertionError:
            raise AssertionError(self.process.output()) from None
        return self

    def families(self) -> dict:
        status, _, body = http_get(f"{self.url}/metrics", self.headers)
        assert status == 200, status
        return {family.name: family for family in text_string_to_metric_families(body.decode())}


@pytest.fixture
def pushgateway(tmp_path, processes):
    if PUSHGATEWAY is None:
        pytest.skip("the Pushgateway is installed by .ci/run (Debian prometheus-pushgateway)")
    gateway = Pushgateway(tmp_path)
    processes.add(gateway.process)
    return gateway.wait_ready()


def fleet_series(families: dict, group: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """{(sample name, labels): value} of the fleet's llm_* series (not the aggregator's own), of one group."""
    found = {}
    for family in families.values():
        if not family.name.startswith("llm_") or family.name.startswith("llm_aggregator_"):
            continue
        for sample in family.samples:
            labels = dict(sample.labels)
            if group is not None:
                if any(labels.pop(name, None) != value for name, value in group.items()):
                    continue
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


# Worked out from the monotonic clock at each collection: the same last-seen time may differ in its last
# microsecond from one collection to the next, so these are compared to 1 ms, everything else exactly.
CLOCK_DERIVED = ("llm_worker_last_seen_timestamp_seconds",)


def exact(series: dict[tuple[str, tuple], float]) -> dict[tuple[str, tuple], float]:
    return {key: value for key, value in series.items() if key[0] not in CLOCK_DERIVED}


def close(got: dict[tuple[str, tuple], float], want: dict[tuple[str, tuple], float]) -> bool:
    """The clock-derived series: the same ones, each within 1 ms."""
    clocked = {key for key in want if key[0] in CLOCK_DERIVED}
    return bool(clocked) and clocked == {key for key in got if key[0] in CLOCK_DERIVED} and all(
        abs(got[key] - want[key]) < 1e-3 for key in clocked)


def push_counters(url: str) -> dict[str, float]:
    families = scrape(url)
    failures = samples(families, "llm_aggregator_push_failures", "llm_aggregator_push_failures_total")
    return {
        "samples": samples(families, "llm_aggregator_push_samples", "llm_aggregator_push_samples_total")[()],
        **{dict(labels)["reason"]: value for labels, value in failures.items()},
    }


def publish_known_fleet(nats_url: str, aggregator) -> dict:
    """Two workers' load and three hit-rate events; the aggregator's own fleet series once it has them all."""
    publish(nats_url, [(LOAD_SUBJECT, load(1, 30)), (LOAD_SUBJECT, load(2, 50)),
                       hit_rate(1, 10, 4), hit_rate(2, 20, 5), hit_rate(1, 6, 6)])
    return wait_until(lambda: (s := fleet_series(scrape(aggregator.url)))
                      and s.get(("llm_fleet_kv_hit_rate_isl_blocks_total",
                                 (("component", "backend"), ("endpoint", "generate")))) == 36 and s,
                      10, what="the aggregator's own view")


@needs_pushgateway
def test_the_pushgateway_gets_every_fleet_series_with_exact_values(nats_server, processes, pushgateway):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "600", "--push-gateway", pushgateway.url,
                                      "--push-gateway-interval", "0.2", "--push-gateway-grouping", "instance=agg-a")
    want = publish_known_fleet(nats_server.url, aggregator)
    # The same series, the same values, under the group's labels.
    wait_until(lambda: exact(fleet_series(pushgateway.families(), GROUP)) == exact(want), 10,
               what="the pushed series")
    got = fleet_series(pushgateway.families(), GROUP)
    assert close(got, want)
    worker = (("component", "backend"), ("dp_rank", "0"), ("endpoint", "generate"), ("worker_id", "2"))
    assert got[("llm_kv_blocks_active", worker)] == 50
    assert got[("llm_kv_hit_rate_overlap_blocks_total", worker)] == 5
    assert got[("llm_load_avg", (("component", "backend"), ("endpoint", "generate")))] == 40
    counters = push_counters(aggregator.url)
    assert counters["samples"] > 0
    assert {reason: counters[reason] for reason in ("status_4xx", "status_5xx", "timeout", "connection")} == {
        "status_4xx": 0, "status_5xx": 0, "timeout": 0, "connection": 0}


@needs_pushgateway
def test_expired_workers_leave_the_pushgateway_too(nats_server, processes, pushgateway):
    """Each push replaces the group's series: a worker that expired here is gone there at the next push."""
    processes.aggregator(nats_server.url, "--stale-after", "1", "--push-gateway", pushgateway.url,
                         "--push-gateway-interval", "0.2", "--push-gateway-grouping", "instance=agg-a")
    publish(nats_server.url, [(LOAD_SUBJECT, load(1)), (LOAD_SUBJECT, load(2))])
    wait_until(lambda: len(samples(pushgateway.families(), "llm_kv_blocks_active")) == 2, 10, what="2 workers pushed")
    # Nothing more is published: both expire, and the next push no longer has them.
    wait_until(lambda: samples(pushgateway.families(), "llm_kv_blocks_active") == {}, 15, what="expired workers gone")
    expired = samples(pushgateway.families(), "llm_workers_expired", "llm_workers_expired_total")
    assert expired == {(("component", "backend"), ("endpoint", "generate"), *sorted(GROUP.items())): 2.0}


@pytest.mark.parametrize(("status", "reason"), [("refused", "connection"), (500, "status_5xx"), (None, "timeout")],
                         ids=["refused", "500", "no-answer"])
def test_a_failing_pushgateway_is_counted_and_holds_up_neither_ingest_nor_scrapes(nats_server, processes, status,
                                                                                   reason):
    receiver = None if status == "refused" else Receiver(status).start()
    try:
        url = receiver.url if receiver is not None else f"http://127.0.0.1:{free_port()}"
        aggregator = processes.aggregator(nats_server.url, "--stale-after", "600", "--push-gateway", url,
                                          "--push-gateway-interval", "0.2", "--push-gateway-timeout", "3")
        wait_until(lambda: push_counters(aggregator.url)[reason] >= 1, 15, what=f"failures ({reason}) counted")
        # While pushes fail, or hang for their 3 s timeout, every message is taken and /metrics answers at once.
        publish(nats_server.url, [(LOAD_SUBJECT, load(i)) for i in range(100)])
        wait_until(lambda: sum(samples(scrape(aggregator.url), "llm_workers").values()) == 100, 10, what="100 workers")
        for _ in range(40):  # over 4 s: through at least one whole hung push
            slowest_answer(aggregator.url, limit=1.0)
            time.sleep(0.1)
        assert push_counters(aggregator.url)[reason] >= 2
        assert push_counters(aggregator.url)["samples"] == 0
        if receiver is not None and status == 500:
            receiver.status = 200  # it comes back: the next push goes through
            wait_until(lambda: push_counters(aggregator.url)["samples"] > 0, 10, what="pushes accepted again")
    finally:
        if receiver is not None:
            receiver.stop()


@needs_pushgateway
def test_credentials_in_the_url_become_basic_auth_and_are_never_shown(nats_server, processes, tmp_path):
    secret = "push-secret-9"
    hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=4)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(f"basic_auth_users:\n  pusher: {hashed}\n")
    gateway = Pushgateway(tmp_path, f"--web.config.file={web_config}")
    gateway.headers = {"Authorization": "Basic cHVzaGVyOnB1c2gtc2VjcmV0LTk="}  # pusher:push-secret-9
    processes.add(gateway.process)
    gateway.wait_ready()
    authorised = gateway.url.replace("http://", f"http://pusher:{secret}@")
    aggregator = processes.aggregator(nats_server.url, "--push-gateway-interval", "0.2",
                                      env={"AGGREGATOR_PUSH_GATEWAY": authorised})
    refused = processes.aggregator(nats_server.url, "--push-gateway-interval", "0.2",
                                   env={"AGGREGATOR_PUSH_GATEWAY": gateway.url.replace("http://", "http://pusher:no@")})
    publish(nats_server.url, [(LOAD_SUBJECT, load(7))])
    wait_until(lambda: len(samples(gateway.families(), "llm_kv_blocks_active")) == 1, 10, what="pushed with auth")
    wait_until(lambda: push_counters(refused.url)["status_4xx"] >= 1, 10, what="a wrong password refused (401)")
    for process in (aggregator, refused):
        for text in (process.output(), http_get(f"{process.url}/health")[2].decode(),
                     http_get(f"{process.url}/metrics")[2].decode()):
            assert secret not in text and "pusher:no@" not in text
    assert "http://***@127.0.0.1" in aggregator.output()  # the URL is logged, without its credentials


def test_a_bad_url_is_refused_at_start_without_showing_its_password():
    result = subprocess.run([sys.executable, "-m", "aggregator", "--push-gateway", "http://user:hunter2@host:99999"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("aggregator: error: argument --push-gateway: 'http://***@host:99999' has an "
                                     "invalid port (env AGGREGATOR_PUSH_GATEWAY)")
