"""The status page's data, in process: what ingest keeps per subject, the documents the view builds
from the fleet (sorting, filtering, paging), and the HTML they become (escaping, CSP)."""

from __future__ import annotations

import base64
import hashlib
import json

import msgspec
import pytest
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.status_view import (
    MAX_PAGE_SIZE,
    SORT_KEYS,
    BadQuery,
    StatusView,
    WorkersQuery,
    parse_no_query,
    parse_workers_query,
)
from aggregator.collectors.telemetry import StatsScrapeTelemetry
from aggregator.exposition import status_api as api
from aggregator.exposition import status_html
from aggregator.ingest import pipeline
from aggregator.ingest.component_snapshots import SnapshotLimits, snapshot_route
from aggregator.ingest.pipeline import Ingest
from aggregator.state import subject_activity
from aggregator.state.fleet import Fleet, WorkerKey
from aggregator.state.ingest_counts import IngestCounts
from aggregator.state.subject_activity import OTHER_SUBJECTS, SubjectActivity
from fleet_protocol import ForwardPassMetrics, KvStats, LoadEvent, WorkerStats

from ..browser import parse
from ..support import render_families, samples

LOAD_PATTERN = protocol.component_subject("dynamo", "*", protocol.KV_METRICS)
HIT_PATTERN = protocol.component_subject("dynamo", "*", protocol.KV_HIT_RATE)


def subject(component: str, event: str = protocol.KV_METRICS) -> str:
    return protocol.component_subject("dynamo", component, event)


def load(worker_id: int, active: int, total: int = 1000, *, waiting: int | None = None, rank: int | None = None,
         endpoint: str = "generate") -> bytes:
    worker_stats = {"request_active_slots": active % 16, "request_total_slots": 16}
    if waiting is not None:
        worker_stats["num_requests_waiting"] = waiting
    if rank is not None:
        worker_stats["data_parallel_rank"] = rank
    return json.dumps({"worker_id": worker_id, "endpoint": endpoint, "data": {
        "worker_stats": worker_stats, "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": total}}}).encode()


def hit(worker_id: int, isl: int, overlap: int) -> bytes:
    return json.dumps({"worker_id": worker_id, "isl_blocks": isl, "overlap_blocks": overlap}).encode()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def nats_state() -> api.NatsConnection:
    return api.NatsConnection(connected=True, subscribed=True, servers=["nats://127.0.0.1:4222"],
                              server="127.0.0.1:4222", reconnects=0, messages_in=0, bytes_in=0)


def build(*, stale_after: float = 60.0, subjects: SubjectActivity | None = None):
    clock = Clock()
    fleet = Fleet(stale_after, max_workers=100_000)
    counts = IngestCounts()
    ingest = Ingest(fleet, counts, namespace="dynamo", default_component="backend", max_message_bytes=65536,
                    clock=clock, subjects=subjects)
    view = StatusView(fleet, counts, ingest.subjects, nats=nats_state, monotonic_clock=clock,
                      wall_clock=lambda: clock.now + 1_700_000_000.0)
    return ingest, fleet, view, clock


def by_subject(view: StatusView) -> dict[tuple[str, str], api.SubjectCounts]:
    return {(s.source, s.subject): s for s in view.sources().subjects}


# What ingest keeps per subject -------------------------------------------------------------------


def test_a_rejected_message_is_kept_under_its_exact_subject_with_reason_detail_time_and_payload():
    ingest, _, view, clock = build()
    assert ingest.handle(LOAD_PATTERN, subject("backend"), load(1, 10))
    clock.now += 2
    bad = b'{"worker_id": "seven", "data": {}}'
    assert not ingest.handle(LOAD_PATTERN, subject("prefill"), bad)
    clock.now += 3
    found = by_subject(view)
    good = found[("nats", subject("backend"))]
    assert (good.kind, good.received, good.accepted, good.rejected, good.last_rejected) == ("kv_metrics", 1, 1, 0, [])
    assert good.age_seconds == 5.0
    rejected = found[("nats", subject("prefill"))]
    assert (rejected.received, rejected.accepted, rejected.rejected) == (1, 0, 1)
    assert rejected.rejected_by_reason == {rejects.WRONG_TYPE: 1}
    (message,) = rejected.last_rejected
    assert message.reason == rejects.WRONG_TYPE and "worker_id" in message.detail
    assert message.payload == bad.decode() and message.payload_bytes == len(bad) and not message.truncated
    assert message.age_seconds == 3.0 and message.at == 1000.0 + 2 + 1_700_000_000.0
    # The per-kind counts (what /metrics exports) agree.
    (kind,) = [k for k in view.sources().kinds if k.kind == pipeline.LOAD]
    assert (kind.source, kind.received, kind.accepted, kind.rejected_by_reason) == (
        "nats", 2, 1, {rejects.WRONG_TYPE: 1})


def test_rejected_payloads_are_truncated_and_shown_as_text_even_when_not_utf8():
    ingest, _, view, _ = build()
    payload = b"\xff\xfe" + b"x" * 1000
    ingest.handle(LOAD_PATTERN, subject("backend"), payload)
    (message,) = by_subject(view)[("nats", subject("backend"))].last_rejected
    assert message.reason == rejects.NOT_JSON
    assert message.payload == "\\xff\\xfe" + "x" * (subject_activity.PAYLOAD_BYTES - 2)
    assert message.payload_bytes == 1002 and message.truncated


def test_only_the_last_few_rejected_payloads_are_kept_newest_first_while_every_reject_is_counted():
    ingest, _, view, clock = build()
    for n in range(12):
        clock.now += 1
        ingest.handle(LOAD_PATTERN, subject("backend"), b"not json %d" % n)
    counts = by_subject(view)[("nats", subject("backend"))]
    assert counts.rejected == 12 and counts.rejected_by_reason == {rejects.NOT_JSON: 12}
    assert [m.payload for m in counts.last_rejected] == [
        f"not json {n}" for n in range(11, 11 - subject_activity.RECENT_REJECTS, -1)]


def test_a_snapshot_used_in_part_counts_as_accepted_and_keeps_the_parts_dropped():
    ingest, _, view, _ = build()
    ingest.add_route(protocol.COMPONENT_METRICS, pipeline.COMPONENT_METRICS,
                     snapshot_route(SnapshotLimits(), 1 << 20), reasons=rejects.COMPONENT_METRICS)
    text = "# TYPE dynamo_component_x gauge\ndynamo_component_x 1\n# TYPE llm_kv_blocks_active gauge\n" \
           "llm_kv_blocks_active 3\n"
    payload = json.dumps({"worker_id": 4, "text": text}).encode()
    assert ingest.handle(protocol.component_subject("dynamo", "*", protocol.COMPONENT_METRICS),
                         subject("backend", protocol.COMPONENT_METRICS), payload)
    counts = by_subject(view)[("nats", subject("backend", protocol.COMPONENT_METRICS))]
    assert (counts.received, counts.accepted) == (1, 1)
    assert counts.rejected_by_reason == {rejects.RESERVED_NAME: 1}
    assert counts.last_rejected[0].payload == payload.decode()


def test_pull_mode_entries_are_kept_per_subject_and_their_workers_say_pull():
    ingest, fleet, view, _ = build()
    registry = CollectorRegistry()
    telemetry = StatsScrapeTelemetry(registry, ["dynamo_backend"])
    # As the stats scraper makes its feed: counted in llm_aggregator_stats_scrape_*, not by kind.
    feed = ingest.feed(pipeline.PULL, telemetry.outcomes("dynamo_backend"), service="dynamo_backend")
    event = LoadEvent(worker_id=9, data=ForwardPassMetrics(WorkerStats(request_active_slots=1, request_total_slots=4),
                                                           KvStats(kv_active_blocks=2, kv_total_blocks=8)))
    assert feed.take(pipeline.LOAD, "dynamo_backend.generate-9", Fleet.observe_load, "backend", event)
    feed.reject(pipeline.LOAD, "dynamo_backend.generate-a", rejects.NO_DATA, "no stats handler", b'{"data": null}')
    ingest.handle(LOAD_PATTERN, subject("backend"), load(1, 10))
    assert fleet.workers[WorkerKey("backend", "generate", 9, 0)].source == "pull"
    assert fleet.workers[WorkerKey("backend", "generate", 1, 0)].source == "nats"
    found = by_subject(view)
    assert found[("pull", "dynamo_backend.generate-9")].accepted == 1
    (message,) = found[("pull", "dynamo_backend.generate-a")].last_rejected
    assert (message.reason, message.detail, message.payload) == (rejects.NO_DATA, "no stats handler",
                                                                '{"data": null}')
    kinds = {(k.source, k.kind): k for k in view.sources().kinds}
    assert (kinds[("pull", "kv_metrics")].received, kinds[("pull", "kv_metrics")].accepted) == (2, 1)
    assert kinds[("pull", "kv_metrics")].rejected_by_reason == {rejects.NO_DATA: 1}
    # Hit-rate events (the router's) never change where a worker's load comes from.
    ingest.handle(HIT_PATTERN, subject("backend", protocol.KV_HIT_RATE), hit(9, 10, 5))
    assert fleet.workers[WorkerKey("backend", "generate", 9, 0)].source == "pull"


def test_subjects_are_bounded_per_source_and_idle_ones_make_room():
    ingest, _, view, clock = build(subjects=SubjectActivity(max_subjects=3))
    for component in ("a", "b", "c", "d", "e"):
        ingest.handle(LOAD_PATTERN, subject(component), load(1, 1))
    found = by_subject(view)
    assert set(found) == {("nats", subject(c)) for c in "abc"} | {("nats", OTHER_SUBJECTS)}
    assert found[("nats", OTHER_SUBJECTS)].received == 2
    # Past the idle time, a new subject takes the place of the silent ones (a sweep at most once a minute).
    clock.now += subject_activity.IDLE_SUBJECT_SECONDS + 1
    ingest.handle(LOAD_PATTERN, subject("a"), load(1, 1))
    ingest.handle(LOAD_PATTERN, subject("f"), load(2, 1))
    ingest.handle(LOAD_PATTERN, subject("g"), load(3, 1))
    ingest.handle(LOAD_PATTERN, subject("h"), load(4, 1))  # full again, and swept a moment ago
    found = by_subject(view)
    assert set(found) == {("nats", subject(c)) for c in "afg"} | {("nats", OTHER_SUBJECTS)}
    assert found[("nats", OTHER_SUBJECTS)].received == 3


# Workers: query, order, filters, pages -------------------------------------------------------------


@pytest.mark.parametrize(("query", "message"), [
    ("page=0", "page must be an integer of at least 1; got 0"),
    ("page=x", "page must be an integer of at least 1; got 'x'"),
    ("page=-1", "page must be an integer of at least 1; got '-1'"),
    (f"page_size={MAX_PAGE_SIZE + 1}", f"page_size must be an integer from 1 to {MAX_PAGE_SIZE}; got 1001"),
    ("page_size=1.5", "page_size must be an integer from 1 to 1000; got '1.5'"),
    ("sort=size", "sort must be one of key, component,"),
    ("order=up", "order must be asc or desc; got 'up'"),
    ("colour=red", "unknown parameter 'colour'; known: component, endpoint, source, q, sort, order, page,"),
    ("page=1&page=2", "parameter 'page' given more than once"),
    ("q=" + "x" * 300, "parameter 'q' is longer than 256 characters"),
])
def test_a_bad_workers_query_says_what_is_wrong(query, message):
    pairs = [tuple(part.split("=", 1)) for part in query.split("&")]
    with pytest.raises(BadQuery) as error:
        parse_workers_query(pairs)
    assert str(error.value).startswith(message)


def test_the_documents_without_parameters_refuse_any():
    parse_no_query([])
    with pytest.raises(BadQuery, match="unknown parameter 'x'; this endpoint takes none"):
        parse_no_query([("x", "1")])


def populate(ingest: Ingest, clock: Clock, workers: int) -> None:
    """Workers in three components with loads that tie often; every 7th reports hit rates only
    (no load: no value for the load keys), every 5th has no num_requests_waiting."""
    for n in range(workers):
        clock.now += 0.001
        component = ("backend", "prefill", "decode")[n % 3]
        worker_id = 1000 + (n * 7919) % 5003
        if n % 7 == 0:
            ingest.handle(HIT_PATTERN, subject(component, protocol.KV_HIT_RATE), hit(worker_id, 10 + n, n % 10))
        else:
            ingest.handle(LOAD_PATTERN, subject(component),
                          load(worker_id, active=(n * 37) % 50, total=100 + n % 3,
                               waiting=None if n % 5 == 0 else n % 4))


def reference(fleet: Fleet, sort: str, order: str) -> list[WorkerKey]:
    """The order the API promises, worked out the plain way: by value (ties by key), no value last."""
    value = SORT_KEYS[sort].value
    of_load = SORT_KEYS[sort].of_load
    states = sorted(fleet.workers.values(), key=lambda s: s.key)
    if sort == "key":
        return [s.key for s in (states[::-1] if order == "desc" else states)]
    valued = [s for s in states if not (of_load and s.load is None) and value(s) is not None]
    missing = [s for s in states if s not in valued]
    valued.sort(key=value, reverse=order == "desc")
    return [s.key for s in valued + missing]


@pytest.mark.parametrize("sort", list(SORT_KEYS))
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_pages_in_every_order_list_each_worker_once_ties_by_key_and_no_value_last(sort, order):
    ingest, fleet, view, clock = build()
    populate(ingest, clock, 400)
    listed: list[WorkerKey] = []
    page = 1
    while True:
        document = view.workers(WorkersQuery(sort=sort, order=order, page=page, page_size=9))
        assert document.total == document.matched == len(fleet) == 400 and document.pages == 45
        listed += [WorkerKey(w.component, w.endpoint, w.worker_id, w.dp_rank) for w in document.workers]
        if page == document.pages:
            break
        page += 1
    assert listed == reference(fleet, sort, order)
    assert view.workers(WorkersQuery(sort=sort, order=order, page=46, page_size=9)).workers == []


def test_filters_narrow_the_workers_and_the_pages():
    ingest, fleet, view, clock = build()
    populate(ingest, clock, 90)
    page = view.workers(WorkersQuery(component="prefill", page_size=1000))
    assert page.matched == 30 and {w.component for w in page.workers} == {"prefill"}
    assert view.workers(WorkersQuery(component="prefill", endpoint="nope")).matched == 0
    assert view.workers(WorkersQuery(source="nats")).matched == sum(1 for s in fleet.workers.values() if s.load)
    some = next(iter(fleet.workers))
    by_decimal = view.workers(WorkersQuery(q=str(some.worker_id)))
    assert some in {WorkerKey(w.component, w.endpoint, w.worker_id, w.dp_rank) for w in by_decimal.workers}
    by_hex = view.workers(WorkersQuery(q=f"{some.worker_id:x}".upper()))
    assert some.worker_id in {w.worker_id for w in by_hex.workers}
    assert view.workers(WorkersQuery(q="PREF")).matched == 30


def test_a_worker_arriving_as_another_expires_is_listed_in_its_place():
    ingest, fleet, view, clock = build(stale_after=10)
    ingest.handle(LOAD_PATTERN, subject("backend"), load(1, 1))
    clock.now += 5
    ingest.handle(LOAD_PATTERN, subject("backend"), load(2, 1))
    assert [w.worker_id for w in view.workers(WorkersQuery()).workers] == [1, 2]
    clock.now += 6
    assert fleet.expire(clock.now) == [WorkerKey("backend", "generate", 1, 0)]
    ingest.handle(LOAD_PATTERN, subject("backend"), load(3, 1))  # the same number of workers as before
    assert [w.worker_id for w in view.workers(WorkersQuery()).workers] == [2, 3]


def test_one_worker_in_full_and_how_it_will_expire():
    ingest, fleet, view, clock = build(stale_after=30)
    ingest.handle(LOAD_PATTERN, subject("backend"), load(5, 250, 1000, waiting=2, rank=1))
    ingest.handle(HIT_PATTERN, subject("backend", protocol.KV_HIT_RATE),
                  json.dumps({"worker_id": 5, "dp_rank": 1, "isl_blocks": 40, "overlap_blocks": 10}).encode())
    clock.now += 12
    detail = view.worker(WorkerKey("backend", "generate", 5, 1))
    assert detail is not None
    worker = detail.worker
    assert (worker.kv_blocks_active, worker.kv_blocks_total, worker.kv_usage_percent) == (250, 1000, 25.0)
    assert (worker.slots_active, worker.slots_total, worker.requests_waiting) == (250 % 16, 16, 2)
    assert (worker.hit_rate_percent, worker.isl_blocks, worker.overlap_blocks) == (25.0, 40, 10)
    assert (worker.age_seconds, worker.expires_in_seconds) == (12.0, 18.0)
    assert (worker.source, worker.discovery, worker.gpus, detail.gpu_list) == ("nats", None, 0, [])
    assert view.worker(WorkerKey("backend", "generate", 5, 0)) is None


def test_the_summary_shows_the_statistics_metrics_exports():
    ingest, fleet, view, clock = build()
    populate(ingest, clock, 120)
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    families = render_families(registry)
    summary = view.summary()
    groups = {(g.component, g.endpoint): g for g in summary.groups}

    def exported(name: str, sample: str | None = None) -> dict[tuple[str, str], float]:
        return {(dict(k)["component"], dict(k)["endpoint"]): v for k, v in samples(families, name, sample).items()}

    assert exported("llm_workers") == {key: g.workers for key, g in groups.items()}
    assert exported("llm_load_avg") == pytest.approx({key: g.load_avg for key, g in groups.items()})
    assert exported("llm_load_std") == pytest.approx({key: g.load_std for key, g in groups.items()})
    assert exported("llm_fleet_kv_hit_rate_percent") == pytest.approx(
        {key: g.hit_rate_percent for key, g in groups.items()})
    active = samples(families, "llm_kv_blocks_active")
    total = samples(families, "llm_kv_blocks_total")
    assert summary.kv_blocks_active == sum(active.values()) and summary.kv_blocks_total == sum(total.values())
    assert summary.workers == len(fleet) == 120
    assert summary.messages_received == summary.messages_accepted == 120


def test_the_documents_decode_as_their_types():
    ingest, _, view, clock = build()
    populate(ingest, clock, 20)
    ingest.handle(LOAD_PATTERN, subject("backend"), b"{")
    for document in (view.summary(), view.workers(WorkersQuery()), view.sources()):
        encoded = msgspec.json.encode(document)
        assert msgspec.json.decode(encoded, type=type(document)) == document
        assert json.loads(encoded)["api_version"] == api.API_VERSION == 1


# HTML -----------------------------------------------------------------------------------------------


def page_of(view: StatusView, query: WorkersQuery | None = None) -> str:
    return status_html.render_page(view.summary(), view.workers(query or WorkersQuery()), view.sources()).decode()


def test_what_workers_send_is_shown_as_text_never_as_markup():
    ingest, _, view, _ = build()
    hostile = '<img src=x onerror="alert(1)">'
    ingest.handle(LOAD_PATTERN, subject(hostile), load(1, 1))
    payload = b'</pre><script>alert(2)</script><b class="x">'
    ingest.handle(LOAD_PATTERN, subject(hostile), payload)
    dom = parse(page_of(view))
    assert len(dom.find_all("script")) == 1  # the page's own
    assert dom.find_all("img") == [] and dom.find_all("b", **{"class": "x"}) == []
    (row,) = dom.find_all("tr", data_worker=f"{hostile}/generate/1/0")
    assert row.find("td").text() == hostile
    (pre,) = dom.by_id("subjects").find_all("pre")
    assert pre.text() == payload.decode()


def test_the_content_security_policy_allows_exactly_the_page_s_script():
    _, _, view, _ = build()
    html = page_of(view)
    (script,) = parse(html).find_all("script")
    digest = base64.b64encode(hashlib.sha256(script.text().encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in status_html.CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in status_html.CONTENT_SECURITY_POLICY


def test_sort_and_page_links_keep_the_filters():
    ingest, _, view, clock = build()
    populate(ingest, clock, 60)
    dom = parse(page_of(view, WorkersQuery(component="backend", page_size=5, page=2, sort="kv_usage")))
    assert dom.find("a", rel="next").attrs["href"] == "?component=backend&sort=kv_usage&page=3&page_size=5"
    assert dom.find("a", rel="first").attrs["href"] == "?component=backend&sort=kv_usage&page_size=5"
    headers = {a.text().rstrip(" ▲▼"): a.attrs["href"] for a in dom.by_id("workers-table").find("thead").find_all("a")}
    assert headers["KV used / total"] == "?component=backend&sort=kv_usage&order=desc&page_size=5"
    assert headers["Waiting"] == "?component=backend&sort=requests_waiting&page_size=5"
    assert "page 2 of 4" in dom.by_id("workers").text()


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.04, "0.0 s"), (9.96, "10.0 s"), (12.7, "12 s"), (185, "3 m 05 s"), (7260, "2 h 01 m"), (2 * 86400 + 3600, "2 d 01 h"),
])
def test_durations_read_as_a_person_reads_them(seconds, shown):
    assert status_html.duration(seconds) == shown
