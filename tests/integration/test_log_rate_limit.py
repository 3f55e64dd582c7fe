"""Log rate-limiting: one structlog processor (fleet_runtime.logs.RateLimit), alone and in a real aggregator."""

from __future__ import annotations

import json
import math
import time

import pytest
import structlog

from fleet_protocol import component_subject
from fleet_runtime.logs import RateLimit

from ..support import publish, scrape, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def line(limit: RateLimit, event: str = "message rejected", **fields) -> dict:
    return limit(None, "warning", {"event": event, **fields})


def test_a_key_logs_once_per_interval_then_says_how_many_lines_it_held_back():
    clock = Clock()
    limit = RateLimit(interval=10.0, clock=clock)
    assert line(limit, subject="a", rate_limit=("k", "a")) == {
        "event": "message rejected", "subject": "a", "suppressed_since_last": 0}
    for _ in range(5):
        clock.now += 1.9
        with pytest.raises(structlog.DropEvent):
            line(limit, subject="a", rate_limit=("k", "a"))
    clock.now = 1010.0  # the interval since the last line that went out
    assert line(limit, subject="a", rate_limit=("k", "a"))["suppressed_since_last"] == 5
    with pytest.raises(structlog.DropEvent):
        line(limit, subject="a", rate_limit=("k", "a"))
    clock.now = 1020.0
    assert line(limit, subject="a", rate_limit=("k", "a"))["suppressed_since_last"] == 1


def test_keys_and_messages_are_limited_apart():
    limit = RateLimit(interval=10.0, clock=Clock())
    assert line(limit, rate_limit="a")["suppressed_since_last"] == 0
    assert line(limit, rate_limit="b")["suppressed_since_last"] == 0
    assert line(limit, "stats request failed", rate_limit="a")["suppressed_since_last"] == 0
    with pytest.raises(structlog.DropEvent):
        line(limit, rate_limit="b")


def test_events_without_a_key_pass_untouched():
    limit = RateLimit(interval=10.0, clock=Clock())
    for _ in range(3):
        event = {"event": "connected to NATS", "server": "127.0.0.1:4222"}
        assert limit(None, "info", event) is event
        assert event == {"event": "connected to NATS", "server": "127.0.0.1:4222"}
    assert len(limit) == 0


def test_hostile_key_churn_never_grows_memory_past_max_keys():
    clock = Clock()
    limit = RateLimit(interval=10.0, max_keys=100, clock=clock)
    for i in range(10_000):
        assert line(limit, rate_limit=("subject", i))["suppressed_since_last"] == 0  # a new key: never held back
        assert len(limit) <= 100
    # Known keys are still limited after the table started over.
    with pytest.raises(structlog.DropEvent):
        line(limit, rate_limit=("subject", 9_999))


def test_an_unhashable_key_is_limited_by_its_text_and_never_raises():
    limit = RateLimit(interval=10.0, clock=Clock())
    assert line(limit, rate_limit=["a", {"b": 1}])["suppressed_since_last"] == 0
    with pytest.raises(structlog.DropEvent):
        line(limit, rate_limit=["a", {"b": 1}])


def test_a_flood_of_bad_messages_logs_a_line_per_subject_and_reason(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, env={"DYN_LOGGING_JSONL": "true"})
    subjects = [component_subject("dynamo", f"c{i}", "kv_metrics") for i in range(3)]
    bad = {"not_json": b"{not json", "wrong_type": b"[]"}
    per_key = 1000
    started = time.monotonic()
    publish(nats_server.url, [(s, payload) for _ in range(per_key) for s in subjects for payload in bad.values()])

    def all_rejected():
        family = scrape(aggregator.url)["llm_aggregator_messages_rejected"]
        return sum(s.value for s in family.samples if s.name.endswith("_total")) == len(subjects) * len(bad) * per_key

    wait_until(all_rejected, 30, what="every bad message counted")
    elapsed = time.monotonic() - started
    lines = [json.loads(x) for x in aggregator.output().splitlines() if x.startswith("{")]
    rejections = [x for x in lines if x.get("message") == "message rejected"]
    keys = {(x["source"], x["kind"], x["reason"], x["subject"]) for x in rejections}
    assert keys == {("nats", "kv_metrics", reason, s) for reason in bad for s in subjects}
    # One line per key per 10 s: 6 lines for 6,000 messages, however slow this machine is.
    assert len(rejections) <= len(keys) * (1 + math.ceil(elapsed / 10.0))
    assert all(x["level"] == "warning" and x["suppressed_since_last"] < per_key for x in rejections)
