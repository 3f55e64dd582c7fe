"""The status page as a person uses it: headless Chromium against a real aggregator fed by mock
workers over a real nats-server; and the JSON API checked against the same fleet."""

from __future__ import annotations

import asyncio
import base64
import json

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator.collectors.status_view import StatusView
from aggregator.collectors.telemetry import Telemetry
from aggregator.edges.http_server import build_app
from aggregator.edges.status_page import StatusPage
from aggregator.exposition import status_api as api_types
from aggregator.ingest.pipeline import Ingest
from aggregator.state.fleet import Fleet
from aggregator.state.ingest_counts import IngestCounts
from fleet_protocol import ForwardPassMetrics, KvStats, LoadEvent, WorkerStats

from ..browser import Chromium, Element, parse
from ..support import AggregatorProcess, http_get, mock_worker, publish, wait_until

BACKEND = protocol.component_subject("dynamo", "backend", protocol.KV_METRICS)


@pytest.fixture
def browser(tmp_path) -> Chromium:
    return Chromium(tmp_path / "chromium-profile")


def api(base: str, path: str, headers: dict | None = None) -> tuple[int, dict]:
    status, response_headers, body = http_get(f"{base}{path}", headers)
    assert response_headers["Content-Type"].startswith("application/json"), response_headers
    return status, json.loads(body)


def ident(worker: dict) -> str:
    return f"{worker['component']}/{worker['endpoint']}/{worker['worker_id']}/{worker['dp_rank']}"


def listed(dom: Element) -> dict[str, Element]:
    """The rows of the workers table, by worker."""
    return {row.attrs["data-worker"]: row for row in dom.by_id("workers-table").find_all("tr", data_worker=True)}


def live_workers(base: str) -> int:
    return api(base, "/api/v1/summary")[1]["workers"]


def test_the_page_lists_the_workers_shows_a_rejected_payload_and_drops_a_worker_that_stops(
        nats_server, processes, browser):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "2")
    # Legacy workers: capacity in every message, with no discovery store for the page to need.
    processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--workers", "2", "--interval", "0.2",
                              "--seed", "7"))
    stopping = processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--workers", "1", "--interval",
                                         "0.2", "--seed", "8", "--component", "prefill", "--gpu", "simulated"))
    wait_until(lambda: live_workers(aggregator.url) == 3, 20, what="3 live workers")

    _, dom = browser.dump_dom(f"{aggregator.url}/")
    rows = listed(dom)
    _, workers = api(aggregator.url, "/api/v1/workers")
    assert set(rows) == {ident(w) for w in workers["workers"]} and len(rows) == 3
    for worker in workers["workers"]:
        cells = {td.attrs["data-label"]: td.text().strip() for td in rows[ident(worker)].find_all("td")}
        assert cells["Component"] == worker["component"] and cells["Worker id"] == str(worker["worker_id"])
        assert cells["Source"] == "nats" and cells["Last message"].endswith(" s ago")
        # The blocks in use move between the two reads; the total does not.
        assert cells["KV used / total"].endswith(f" / {worker['kv_blocks_total']:,}")
        assert rows[ident(worker)].find("meter").attrs["max"] == str(worker["kv_blocks_total"])
    groups = {row.attrs["data-group"] for row in dom.by_id("groups").find_all("tr", data_group=True)}
    assert groups == {"backend/generate", "prefill/generate"}
    assert dom.by_id("nats-state").text() == "connected and subscribed"
    assert "None." in dom.by_id("publishers").text()

    # A worker publishing something the aggregator cannot use: the page says under which subject and why.
    bad = b'{"worker_id": "<b id=\\"injected\\">7</b>", "data": {}}'
    publish(nats_server.url, [(BACKEND, bad)])
    wait_until(lambda: any(s["rejected"] for s in api(aggregator.url, "/api/v1/sources")[1]["subjects"]), 10,
               what="the reject counted")
    _, dom = browser.dump_dom(f"{aggregator.url}/")
    row = dom.by_id("subjects").find("tr", data_subject=f"nats/{BACKEND}")
    cells = {td.attrs["data-label"]: td.text() for td in row.find_all("td")}
    assert cells["Subject"] == BACKEND and cells["Rejected"] == "1" and cells["By reason"] == "wrong_type: 1"
    (details,) = dom.by_id("subjects").find_all("details")
    assert BACKEND in details.find("summary").text() and "open" in details.attrs
    (item,) = details.find_all("li")
    assert item.attrs["data-reason"] == "wrong_type" and "worker_id" in item.text()
    assert item.find("pre").text() == bad.decode()
    assert dom.find_all("b", id="injected") == []  # shown as text, never as markup

    # One worker process stops: after --stale-after its worker is gone from the page, the others stay.
    stopping.stop()
    wait_until(lambda: live_workers(aggregator.url) == 2, 15, what="the stopped worker to expire")
    _, dom = browser.dump_dom(f"{aggregator.url}/")
    rows = listed(dom)
    assert len(rows) == 2 and all(key.startswith("backend/") for key in rows)
    prefill = dom.by_id("groups").find("tr", data_group="prefill/generate").find_all("td")
    assert [td.text() for td in prefill][2] == "0" and [td.text() for td in prefill][-1] == "1"  # workers, expired


def test_the_page_refreshes_itself_in_place(nats_server, processes, browser):
    aggregator = processes.aggregator(nats_server.url)
    processes.add(mock_worker(nats_server.url, "--workers", "2", "--interval", "0.2", "--seed", "3"))
    wait_until(lambda: live_workers(aggregator.url) == 2, 20, what="2 live workers")
    # Chromium's virtual time runs the page's timers: 12 s at one refresh every 5 s.
    _, dom = browser.dump_dom(f"{aggregator.url}/", virtual_time_ms=12_000)
    assert int(dom.find("body").attrs["data-refreshes"]) >= 2
    assert dom.by_id("refresh-note").text().startswith("updated ")
    assert len(listed(dom)) == 2 and len(dom.find_all("main", id="live")) == 1


def load_event(worker_id: int, active: int) -> bytes:
    return protocol.encode(LoadEvent(worker_id=worker_id, data=ForwardPassMetrics(
        WorkerStats(request_active_slots=active % 32, request_total_slots=32),
        KvStats(kv_active_blocks=active, kv_total_blocks=1024))))


def test_ten_thousand_workers_render_fast_in_pages(nats_server, processes, browser):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "600")
    publish(nats_server.url, [(BACKEND, load_event(worker_id, (worker_id * 37) % 1000))
                              for worker_id in range(1, 10_001)])
    wait_until(lambda: live_workers(aggregator.url) == 10_000, 60, what="10,000 live workers")

    seconds, dom = browser.dump_dom(f"{aggregator.url}/")
    assert seconds < 20, f"the first page took {seconds:.1f}s"  # a generous bound: ~1 s on a loaded 2-core machine
    rows = listed(dom)
    assert list(rows) == [f"backend/generate/{n}/0" for n in range(1, 101)]
    assert "page 1 of 100" in dom.by_id("workers").text()
    assert "10,000 matching, of 10,000 live" in dom.by_id("workers").text()

    # Following the page's own links, as a person clicks them.
    next_page = dom.find("a", rel="next").attrs["href"]
    _, dom = browser.dump_dom(f"{aggregator.url}/{next_page}")
    assert list(listed(dom)) == [f"backend/generate/{n}/0" for n in range(101, 201)]
    _, dom = browser.dump_dom(f"{aggregator.url}/{dom.find('a', rel='last').attrs['href']}")
    assert list(listed(dom)) == [f"backend/generate/{n}/0" for n in range(9901, 10_001)]
    assert dom.find_all("a", rel="next") == []

    # Sorted by KV use, most used first: the same rows as the API's, in the same order.
    _, dom = browser.dump_dom(f"{aggregator.url}/?sort=kv_usage&order=desc&page_size=25")
    _, page = api(aggregator.url, "/api/v1/workers?sort=kv_usage&order=desc&page_size=25")
    assert list(listed(dom)) == [ident(w) for w in page["workers"]]
    usage = [w["kv_usage_percent"] for w in page["workers"]]
    assert usage == sorted(usage, reverse=True) and usage[0] == pytest.approx(100 * 999 / 1024)

    # The API pages through all of them, each worker once.
    seen = []
    for number in range(1, 11):
        status, page = api(aggregator.url, f"/api/v1/workers?page_size=1000&page={number}")
        assert status == 200 and page["pages"] == 10 and page["matched"] == 10_000
        seen += [w["worker_id"] for w in page["workers"]]
    assert seen == list(range(1, 10_001))


def test_the_json_api_against_a_fleet_with_push_and_pull_workers(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "5", "--scrape", "backend/generate")
    processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--workers", "2", "--interval", "0.2",
                              "--seed", "5", "--gpu", "simulated", "--gpus-per-worker", "2"))
    processes.add(mock_worker(nats_server.url, "--workers", "1", "--interval", "0.2", "--seed", "6", "--protocol",
                              "legacy", "--mode", "pull", "--gpu", "none", "--no-component-metrics"))
    wait_until(lambda: live_workers(aggregator.url) == 3, 20, what="3 live workers")

    _, workers = wait_until(lambda: (lambda d: d if all(w["source"] for w in d[1]["workers"]) else None)(
        api(aggregator.url, "/api/v1/workers")), 10, what="every worker's load")
    assert workers["api_version"] == 1 and workers["total"] == workers["matched"] == 3
    assert sorted(w["source"] for w in workers["workers"]) == ["nats", "nats", "pull"]
    assert all(w["discovery"] is None for w in workers["workers"])
    _, pulled = api(aggregator.url, "/api/v1/workers?source=pull")
    assert [w["source"] for w in pulled["workers"]] == ["pull"] and pulled["filters"]["source"] == "pull"

    _, summary = api(aggregator.url, "/api/v1/summary")
    assert summary["workers"] == 3 and summary["nats"]["connected"] and summary["discovery"] is None
    assert summary["gpus"] == 4 and [g["workers"] for g in summary["groups"]] == [3]

    for worker in workers["workers"]:
        status, detail = api(aggregator.url, f"/api/v1/workers/{ident(worker)}")
        assert status == 200 and detail["worker"]["worker_id"] == worker["worker_id"]
        assert len(detail["gpu_list"]) == (2 if worker["source"] == "nats" else 0)
    status, missing = api(aggregator.url, "/api/v1/workers/backend/generate/12345/0")
    assert status == 404 and missing["error"] == "not_found" and "12345" in missing["message"]

    _, sources = api(aggregator.url, "/api/v1/sources")
    subjects = {(s["source"], s["subject"]) for s in sources["subjects"]}
    assert ("nats", BACKEND) in subjects and any(source == "pull" for source, _ in subjects)
    assert sources["publishers"] == [] and set(sources["reasons"]) >= {"not_json", "wrong_type", "no_data"}

    for path, message in [
        ("/api/v1/workers?page_size=5000", "page_size must be an integer from 1 to 1000; got 5000"),
        ("/api/v1/workers?sort=nope", "sort must be one of "),
        ("/api/v1/workers?colour=red", "unknown parameter 'colour'"),
        ("/api/v1/summary?x=1", "unknown parameter 'x'; this endpoint takes none"),
        ("/api/v1/workers/backend/generate/abc/0", "worker_id must be a decimal integer"),
    ]:
        status, error = api(aggregator.url, path)
        assert (status, error["error"], error["api_version"]) == (400, "bad_request", 1), path
        assert error["message"].startswith(message), (path, error["message"])
    status, error = api(aggregator.url, "/api/v1/nothing/here")
    assert status == 404 and error["error"] == "not_found"
    status, headers, body = http_get(f"{aggregator.url}/?page=0")
    assert status == 400 and b"page must be an integer of at least 1" in body


def test_the_page_and_the_api_need_the_same_credentials_as_metrics(nats_server, processes, tmp_path):
    hashed = bcrypt.hashpw(b"status-pass-3", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  operator: '{hashed}'\n")
    # Started without waiting on /live, which answers 401 here.
    aggregator = processes.add(AggregatorProcess(nats_server.url, "--web-config-file", str(web)))
    good = {"Authorization": "Basic " + base64.b64encode(b"operator:status-pass-3").decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"operator:nope").decode()}
    wait_until(lambda: http_get(f"{aggregator.url}/live", good)[0] == 200, 15, what="the aggregator up")
    paths = ["/", "/?page=2", "/api/v1/summary", "/api/v1/workers", "/api/v1/sources",
             "/api/v1/workers/backend/generate/1/0", "/api/v1/unknown", "/metrics"]
    for path in paths:
        assert http_get(f"{aggregator.url}{path}")[0] == 401, path
        assert http_get(f"{aggregator.url}{path}", wrong)[0] == 401, path
    assert [http_get(f"{aggregator.url}{path}", good)[0] for path in paths] == [200, 200, 200, 200, 200, 404, 404, 200]
    status, headers, _ = http_get(f"{aggregator.url}/", good)
    assert "script-src 'sha256-" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"


class CountingView(StatusView):
    """The real view, counting the summaries it builds."""

    builds = 0

    def summary(self):
        type(self).builds += 1
        return super().summary()


async def test_requests_queued_behind_a_build_share_it_and_get_state_no_older_than_they_are():
    fleet = Fleet(600, max_workers=100_000)
    counts = IngestCounts()
    ingest = Ingest(fleet, counts, namespace="dynamo", default_component="backend", max_message_bytes=65536)
    for worker_id in range(1, 5001):
        ingest.handle(protocol.component_subject("dynamo", "*", protocol.KV_METRICS), BACKEND,
                      load_event(worker_id, worker_id % 700))
    view = CountingView(fleet, counts, ingest.subjects, nats=lambda: api_types.NatsConnection(
        connected=False, subscribed=False, servers=[], server=None, reconnects=0, messages_in=0, bytes_in=0))
    registry = CollectorRegistry()
    app = build_app(registry, Telemetry(registry), health=lambda: {"status": "ready"},
                    routes=StatusPage(view).routes())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        async def summary() -> dict:
            response = await client.get("/api/v1/summary")
            assert response.status == 200
            return await response.json()

        answers = await asyncio.gather(*(summary() for _ in range(20)))
        assert all(answer["workers"] == 5000 for answer in answers)
        assert CountingView.builds < 5  # one build per wave of requests, not one per request
        # A request that comes after a build gets a build of its own: never an answer older than it.
        ingest.handle(protocol.component_subject("dynamo", "*", protocol.KV_METRICS), BACKEND, load_event(5001, 1))
        before = CountingView.builds
        assert (await summary())["workers"] == 5001 and CountingView.builds == before + 1


async def test_each_worker_s_link_on_the_page_leads_to_its_document_whatever_its_names():
    fleet = Fleet(600)
    counts = IngestCounts()
    ingest = Ingest(fleet, counts, namespace="dynamo", default_component="backend", max_message_bytes=65536)
    odd = "team/a b<&>%2F"  # a NATS token may hold any of these
    ingest.handle(protocol.component_subject("dynamo", "*", protocol.KV_METRICS),
                  protocol.component_subject("dynamo", odd, protocol.KV_METRICS), load_event(2**64 - 1, 5))
    view = StatusView(fleet, counts, ingest.subjects, nats=lambda: api_types.NatsConnection(
        connected=False, subscribed=False, servers=[], server=None, reconnects=0, messages_in=0, bytes_in=0))
    registry = CollectorRegistry()
    app = build_app(registry, Telemetry(registry), health=lambda: {"status": "ready"},
                    routes=StatusPage(view).routes())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.get("/")
        assert response.status == 200
        (row,) = listed(parse(await response.text())).values()
        link = row.find("a").attrs["href"]
        response = await client.get("/" + link)
        assert response.status == 200
        worker = (await response.json())["worker"]
        assert (worker["component"], worker["endpoint"], worker["worker_id"]) == (odd, "generate", 2**64 - 1)
