"""--remote-write: the aggregator's series sent by Prometheus remote write 1.0 to a real receiver.

A real Prometheus (Debian `prometheus`, installed by .ci/run) with its remote-write receiver on
takes what the aggregator sends; PromQL over its HTTP API must return exactly the aggregator's
own values. A receiver that answers 5xx, 429, 400, refuses or never answers
(tests/http_receiver.py) shows retries, drops and their counts, while ingest and /metrics go on.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import urllib.parse

import cramjam
import pytest

from aggregator.edges.remote_write import STALE_NAN, WriteRequest, encode
from fleet_demo.nats_server import free_port

from ..http_receiver import Receiver
from ..support import Process, http_get, publish, samples, scrape, slowest_answer, wait_until
from .test_push import LOAD_SUBJECT, close, exact, load, publish_known_fleet

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus not installed (.ci/run installs it)")


class Prometheus:
    """A real Prometheus that scrapes nothing and takes remote write."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
        self.process = Process(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-remote-write-receiver"])

    @property
    def write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def wait_ready(self) -> Prometheus:
        try:
            wait_until(lambda: http_get(f"{self.url}/-/ready")[0] == 200, 30, what="Prometheus ready")
        except AssertionError:
            raise AssertionError(self.process.output()) from None
        return self

    def query(self, expr: str) -> dict[tuple[str, tuple], float]:
        """An instant PromQL query: {(metric name, other labels): value}."""
        status, _, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        payload = json.loads(body)
        assert status == 200 and payload["status"] == "success", payload
        found = {}
        for series in payload["data"]["result"]:
            labels = dict(series["metric"])
            name = labels.pop("__name__", "")  # an expression's result has none
            found[(name, tuple(sorted(labels.items())))] = float(series["value"][1])
        return found


@pytest.fixture
def prometheus(tmp_path, processes):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (.ci/run installs it)")
    server = Prometheus(tmp_path)
    processes.add(server.process)
    return server.wait_ready()


def write_counters(url: str) -> dict[str, float]:
    families = scrape(url)
    prefix = "llm_aggregator_remote_write"
    failures = samples(families, f"{prefix}_failures", f"{prefix}_failures_total")
    dropped = samples(families, f"{prefix}_dropped_samples", f"{prefix}_dropped_samples_total")
    return {
        "samples": samples(families, f"{prefix}_samples", f"{prefix}_samples_total")[()],
        "retries": samples(families, f"{prefix}_retries", f"{prefix}_retries_total")[()],
        "queued": samples(families, f"{prefix}_queued_samples")[()],
        **{dict(labels)["reason"]: value for labels, value in failures.items()},
        **{"dropped_" + dict(labels)["reason"]: value for labels, value in dropped.items()},
    }


FLEET_QUERY = '{__name__=~"llm_.+", __name__!~"llm_aggregator_.+", replica="r1"}'


@needs_prometheus
def test_prometheus_receives_every_fleet_series_with_exact_values(nats_server, processes, prometheus):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "600", "--remote-write", prometheus.write_url,
                                      "--remote-write-interval", "0.2", "--remote-write-labels", "replica=r1")
    want = publish_known_fleet(nats_server.url, aggregator)
    # Every series, labelled replica="r1" (no series of the aggregator has that label of its own).
    want = {(name, tuple(sorted((*labels, ("replica", "r1"))))): value for (name, labels), value in want.items()}
    wait_until(lambda: exact(prometheus.query(FLEET_QUERY)) == exact(want), 15,
               what="PromQL returning the aggregator's values")
    assert close(prometheus.query(FLEET_QUERY), want)
    got = prometheus.query('llm_kv_blocks_active{worker_id="2"} + llm_kv_hit_rate_overlap_blocks_total')
    assert got == {("", (("component", "backend"), ("dp_rank", "0"), ("endpoint", "generate"), ("replica", "r1"),
                         ("worker_id", "2"))): 55.0}
    assert prometheus.query('llm_load_avg{component="backend"}') == {
        ("llm_load_avg", (("component", "backend"), ("endpoint", "generate"), ("replica", "r1"))): 40.0}
    counters = write_counters(aggregator.url)
    assert counters["samples"] > 0 and counters["retries"] == 0, counters
    assert sum(v for k, v in counters.items() if k.startswith(("status_", "timeout", "connection", "dropped_"))) == 0


@needs_prometheus
def test_expired_workers_end_with_a_stale_marker(nats_server, processes, prometheus):
    """Without one, Prometheus would keep returning a gone worker's last value for 5 minutes."""
    processes.aggregator(nats_server.url, "--stale-after", "1", "--remote-write", prometheus.write_url,
                         "--remote-write-interval", "0.2", "--remote-write-labels", "replica=r1")
    publish(nats_server.url, [(LOAD_SUBJECT, load(1)), (LOAD_SUBJECT, load(2))])
    wait_until(lambda: len(prometheus.query("llm_kv_blocks_active")) == 2, 15, what="2 workers in Prometheus")
    wait_until(lambda: prometheus.query("llm_kv_blocks_active") == {}, 15, what="both gone once expired")
    assert prometheus.query("llm_workers_expired_total") == {
        ("llm_workers_expired_total", (("component", "backend"), ("endpoint", "generate"), ("replica", "r1"))): 2.0}


def one_collection(receiver: Receiver, nats_url: str, processes, *extra: str):
    """An aggregator that collects once at start (then not for an hour), in requests of at most 50 samples."""
    return processes.aggregator(nats_url, "--remote-write", receiver.url, "--remote-write-interval", "3600",
                                "--remote-write-max-samples-per-send", "50", *extra)


@pytest.mark.parametrize(("status", "reason"), [(503, "status_5xx"), (429, "status_429")])
def test_5xx_and_429_are_retried_with_backoff_until_the_receiver_takes_the_request(nats_server, processes, status,
                                                                                    reason):
    receiver = Receiver(status).start()
    try:
        aggregator = one_collection(receiver, nats_server.url, processes)
        wait_until(lambda: receiver.requests(status) >= 4, 15, what="the same request sent again")
        receiver.status = 204
        # Every request of the collection goes through once the receiver takes them; nothing dropped.
        wait_until(lambda: write_counters(aggregator.url)["queued"] == 0 and receiver.requests(204) >= 2, 15,
                   what="the queue emptied")
        time.sleep(0.5)  # nothing more is sent: the next collection is an hour away
        counters = write_counters(aggregator.url)
        failed = receiver.requests(status)
        assert counters[reason] == failed and counters["retries"] == failed, (counters, failed)
        assert counters["dropped_queue_full"] == counters["dropped_rejected"] == 0
        # The samples of each accepted request are counted; one request held 50 at most.
        accepted = receiver.requests(204)
        assert 50 * (accepted - 1) < counters["samples"] <= 50 * accepted, (counters, accepted)
    finally:
        receiver.stop()


def test_a_4xx_is_not_retried_and_its_samples_are_counted_as_dropped(nats_server, processes):
    receiver = Receiver(400).start()
    try:
        aggregator = one_collection(receiver, nats_server.url, processes)
        wait_until(lambda: write_counters(aggregator.url)["queued"] == 0 and receiver.requests() >= 2, 15,
                   what="the collection's requests sent")
        time.sleep(0.5)
        counters = write_counters(aggregator.url)
        sent = receiver.requests()
        assert counters["status_4xx"] == sent and counters["retries"] == 0, (counters, sent)  # each sent once
        assert 50 * (sent - 1) < counters["dropped_rejected"] <= 50 * sent and counters["samples"] == 0, counters
    finally:
        receiver.stop()


@pytest.mark.parametrize(("status", "reason"), [("refused", "connection"), (None, "timeout")],
                         ids=["refused", "no-answer"])
def test_a_receiver_that_is_away_fills_a_bounded_queue_and_holds_up_neither_ingest_nor_scrapes(
        nats_server, processes, status, reason):
    receiver = None if status == "refused" else Receiver(status).start()
    try:
        url = receiver.url if receiver is not None else f"http://127.0.0.1:{free_port()}"
        aggregator = processes.aggregator(nats_server.url, "--stale-after", "600", "--remote-write", url,
                                          "--remote-write-interval", "0.2", "--remote-write-timeout", "3",
                                          "--remote-write-max-samples-per-send", "50",
                                          "--remote-write-queue-samples", "400")
        wait_until(lambda: write_counters(aggregator.url)[reason] >= 1, 15, what=f"failures ({reason}) counted")
        publish(nats_server.url, [(LOAD_SUBJECT, load(i)) for i in range(100)])
        wait_until(lambda: sum(samples(scrape(aggregator.url), "llm_workers").values()) == 100, 10, what="100 workers")
        for _ in range(40):  # over 4 s: through at least one whole hung request
            slowest_answer(aggregator.url, limit=1.0)
            time.sleep(0.1)
        counters = write_counters(aggregator.url)
        assert counters["samples"] == 0 and counters["retries"] >= 1, counters
        # The queue stays within its bound; what did not fit is counted.
        assert 0 < counters["queued"] <= 400 and counters["dropped_queue_full"] > 0, counters
    finally:
        if receiver is not None:
            receiver.stop()


def test_the_write_request_is_numbered_as_remote_write_1_0():
    """Field numbers and types as in prometheus/prompb (a wrong one would still round-trip here, so they are
    compared with the spec's; the real Prometheus above decodes the whole)."""
    descriptor = WriteRequest.DESCRIPTOR
    assert descriptor.full_name == "prometheus.WriteRequest"
    series = descriptor.fields_by_name["timeseries"].message_type
    assert {f.name: f.number for f in descriptor.fields} == {"timeseries": 1}
    assert {f.name: f.number for f in series.fields} == {"labels": 1, "samples": 2}
    double, int64 = 1, 3  # FieldDescriptor.TYPE_DOUBLE, TYPE_INT64
    assert {f.name: (f.number, f.type) for f in series.fields_by_name["samples"].message_type.fields} == {
        "value": (1, double), "timestamp": (2, int64)}
    assert {f.name: f.number for f in series.fields_by_name["labels"].message_type.fields} == {"name": 1, "value": 2}
    body = encode([((("__name__", "up"), ("job", "a")), 1.5), ((("__name__", "gone"),), STALE_NAN)], 1700000000123)
    request = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))  # snappy's block format
    assert [([(label.name, label.value) for label in s.labels], [(p.value, p.timestamp) for p in s.samples])
            for s in request.timeseries][0] == ([("__name__", "up"), ("job", "a")], [(1.5, 1700000000123)])
    # Prometheus's stale marker is one NaN bit pattern, not any NaN.
    assert struct.pack("<d", request.timeseries[1].samples[0].value) == struct.pack("<Q", 0x7FF0000000000002)
