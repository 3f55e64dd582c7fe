"""`/metrics?name[]=` against the real aggregator process: every kind of family can be selected.

As prometheus_client's own server does it, a name is a series name (a counter's `_total`, a
histogram's `_bucket`/`_sum`/`_count`), and the answer is the family holding it, with only
the series of that name.
"""

from __future__ import annotations

import gzip
from urllib.parse import urlencode

import pytest

from bench.payloads import full_worker_messages

from ..support import (
    OPENMETRICS,
    http_get,
    parse_openmetrics,
    parse_text,
    publish,
    samples,
    scrape,
    wait_until,
)

# series name -> its family's name; one of each kind the aggregator exports.
SELECTABLE = {
    "llm_kv_blocks_active": "llm_kv_blocks_active",  # per-worker KV
    "llm_kv_hit_rate_isl_blocks_total": "llm_kv_hit_rate_isl_blocks",
    "llm_workers": "llm_workers",  # per component endpoint
    "llm_fleet_kv_hit_rate_isl_blocks_total": "llm_fleet_kv_hit_rate_isl_blocks",
    "DCGM_FI_DEV_GPU_UTIL": "DCGM_FI_DEV_GPU_UTIL",  # per GPU
    "llm_gpus": "llm_gpus",
    "llm_aggregator_messages_accepted_total": "llm_aggregator_messages_accepted",  # the aggregator's own
    "llm_aggregator_nats_connected": "llm_aggregator_nats_connected",
    "process_start_time_seconds": "process_start_time_seconds",
    "dynamo_component_requests_total": "dynamo_component_requests",  # the workers' own, re-exported
    "dynamo_component_request_duration_seconds_bucket": "dynamo_component_request_duration_seconds",
    "dynamo_component_uptime_seconds": "dynamo_component_uptime_seconds",
}


def select(url: str, names: list[str], *, openmetrics: bool, gzipped: bool) -> dict:
    headers = {"Accept": OPENMETRICS} if openmetrics else {}
    if gzipped:
        headers["Accept-Encoding"] = "gzip"
    status, response_headers, body = http_get(f"{url}/metrics?{urlencode([('name[]', n) for n in names])}", headers)
    assert status == 200, status
    if gzipped:
        assert response_headers.get("Content-Encoding") == "gzip"
        body = gzip.decompress(body)
    families = {}
    for family in (parse_openmetrics if openmetrics else parse_text)(body.decode()):
        assert family.name not in families, f"duplicate family {family.name}"
        families[family.name] = family
    return families


def series(families: dict, family: str, name: str) -> set:
    return set(samples(families, family, name))


@pytest.fixture
def fleet(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url)
    publish(nats_server.url, full_worker_messages(3))

    def complete():
        families = scrape(aggregator.url)
        return (len(samples(families, "dynamo_component_requests", "dynamo_component_requests_total")) == 3
                and len(samples(families, "DCGM_FI_DEV_GPU_UTIL")) == 3
                and len(samples(families, "llm_kv_hit_rate_isl_blocks", "llm_kv_hit_rate_isl_blocks_total")) == 3)

    wait_until(complete, 15, what="three full workers")
    return aggregator


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_each_kind_of_family_is_selected_alone(fleet, openmetrics, gzipped):
    everything = scrape(fleet.url, openmetrics=openmetrics)
    for name, family in SELECTABLE.items():
        selected = select(fleet.url, [name], openmetrics=openmetrics, gzipped=gzipped)
        assert list(selected) == [family], name
        (only,) = selected.values()
        assert only.samples and {s.name for s in only.samples} == {name}
        assert only.type == everything[family].type and only.documentation == everything[family].documentation
        assert series(selected, family, name) == series(everything, family, name), name
    # Workers' series are as they were sent: the selection reads them back from their rendered lines.
    requests = select(fleet.url, ["dynamo_component_requests_total"], openmetrics=openmetrics, gzipped=gzipped)
    assert samples(requests, "dynamo_component_requests", "dynamo_component_requests_total") == \
        samples(everything, "dynamo_component_requests", "dynamo_component_requests_total")
    assert len(samples(requests, "dynamo_component_requests", "dynamo_component_requests_total")) == 3


def test_several_names_and_unknown_names(fleet):
    wanted = ["dynamo_component_requests_total", "DCGM_FI_DEV_GPU_UTIL", "llm_workers", "no_such_series"]
    assert set(select(fleet.url, wanted, openmetrics=False, gzipped=False)) == {
        "dynamo_component_requests", "DCGM_FI_DEV_GPU_UTIL", "llm_workers"}
    assert select(fleet.url, ["no_such_series"], openmetrics=True, gzipped=False) == {}
    # A histogram's series are selected by their own names, as in prometheus_client.
    duration = "dynamo_component_request_duration_seconds"
    selected = select(fleet.url, [duration + "_sum", duration + "_count"], openmetrics=False, gzipped=False)
    assert {s.name for s in selected[duration].samples} == {duration + "_sum", duration + "_count"}
