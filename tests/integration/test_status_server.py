"""A worker's own status server: the real server on loopback, a real HTTP client (urllib)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from fleet_worker.endpoint_metrics import EndpointMetrics
from fleet_worker.registry import MetricsRegistry
from fleet_worker.status_server import HealthState, StatusServer, StatusServerConfig

from ..support import OPENMETRICS


def test_config_from_env():
    assert StatusServerConfig.from_env({}) is None
    assert StatusServerConfig.from_env({"DYN_SYSTEM_PORT": "-1"}) is None
    config = StatusServerConfig.from_env({
        "DYN_SYSTEM_PORT": "8081", "DYN_SYSTEM_HOST": "127.0.0.1", "DYN_SYSTEM_HEALTH_PATH": "/healthz",
        "DYN_SYSTEM_LIVE_PATH": "/livez", "DYN_SYSTEM_STARTING_HEALTH_STATUS": "ready",
        "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": '["generate"]',
    })
    assert config == StatusServerConfig("127.0.0.1", 8081, "/healthz", "/livez", "ready", ("generate",))
    for bad, var in (({"DYN_SYSTEM_PORT": "http"}, "DYN_SYSTEM_PORT"),
                     ({"DYN_SYSTEM_PORT": "70000"}, "DYN_SYSTEM_PORT"),
                     ({"DYN_SYSTEM_PORT": "0", "DYN_SYSTEM_STARTING_HEALTH_STATUS": "up"}, "STARTING"),
                     ({"DYN_SYSTEM_PORT": "0", "DYN_SYSTEM_HEALTH_PATH": "health"}, "HEALTH_PATH"),
                     ({"DYN_SYSTEM_PORT": "0", "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": "generate"}, "USE_ENDPOINT")):
        with pytest.raises(ValueError, match=var):
            StatusServerConfig.from_env(bad)


def test_health_report_shape_and_endpoint_health():
    health = HealthState("notready", started=10.0)
    assert health.report(22.313803539) == {"endpoints": {}, "status": "notready",
                                           "uptime": {"nanos": 313803539, "secs": 12}}
    health.set_endpoint("load_metrics")
    health.set_endpoint("generate")
    health.set_ready()
    assert health.report(28.0)["endpoints"] == {"generate": "ready", "load_metrics": "ready"}
    assert list(health.report(28.0)["endpoints"]) == ["generate", "load_metrics"]
    assert health.ready
    by_endpoint = HealthState("ready", ("generate",))
    assert not by_endpoint.ready  # the system says ready, the listed endpoint does not yet
    by_endpoint.set_endpoint("generate")
    assert by_endpoint.ready


def fetch(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def get(url: str, **headers: str) -> tuple[int, str, str]:
    status, response_headers, body = fetch(url, **headers)
    return status, response_headers.get("Content-Type", ""), body


Serve = Callable[[StatusServerConfig], Awaitable[tuple[StatusServer, str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts status servers (a registry with one tracked request) on loopback; stops each after the test."""
    started: list[StatusServer] = []

    async def start(config: StatusServerConfig) -> tuple[StatusServer, str]:
        runtime = MetricsRegistry()
        metrics = EndpointMetrics(runtime.namespace("dynamo").component("backend").endpoint("generate"))
        with metrics.track(request_bytes=5):
            pass
        server = StatusServer(runtime, config)
        started.append(server)
        port = await server.start()
        return server, f"http://127.0.0.1:{port}"

    yield start
    for server in reversed(started):
        await server.stop()


async def test_status_server_serves_metrics_health_and_live_over_http(serve: Serve):
    server, base = await serve(StatusServerConfig(host="127.0.0.1", port=0))
    status, content_type, body = get(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    fams = {f.name: f for f in parse_text(body)}
    assert fams["dynamo_component_requests"].samples[0].value == 1
    assert fams["dynamo_component_request_duration_seconds"].type == "histogram"
    assert "dynamo_component_uptime_seconds" in fams

    status, content_type, body = get(f"{base}/metrics", Accept=OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert "dynamo_component_requests" in {f.name for f in parse_openmetrics(body)}

    for path in ("/health", "/live"):
        status, content_type, body = get(base + path)
        assert status == 503 and content_type.startswith("text/plain")
        report = json.loads(body)
        assert report["status"] == "notready" and set(report["uptime"]) == {"secs", "nanos"}
    server.health.set_endpoint("generate")
    server.health.set_ready()
    status, _, body = get(f"{base}/health")
    assert status == 200
    assert json.loads(body)["endpoints"] == {"generate": "ready"}
    assert json.loads(body)["status"] == "ready"

    status, _, body = get(f"{base}/nothing/here")
    assert (status, body) == (404, "Route not found")


async def test_custom_health_paths_replace_the_defaults(serve: Serve):
    config = StatusServerConfig(host="127.0.0.1", port=0, health_path="/healthz", live_path="/livez",
                                starting_status="ready")
    _, base = await serve(config)
    assert get(f"{base}/healthz")[0] == 200
    assert get(f"{base}/livez")[0] == 200
    assert get(f"{base}/health")[:3:2] == (404, "Route not found")
    assert get(f"{base}/live")[0] == 404


async def test_only_get_is_served(serve: Serve):
    _, base = await serve(StatusServerConfig(host="127.0.0.1", port=0, starting_status="ready"))
    for path in ("/metrics", "/health", "/nothing"):
        status, headers, _ = fetch(base + path, method="POST")
        assert (status, headers.get("Allow")) == (405, "GET")


async def test_stop_closes_the_port_and_a_second_stop_is_harmless(serve: Serve):
    server, base = await serve(StatusServerConfig(host="127.0.0.1", port=0))
    port = server.port
    assert port is not None and get(f"{base}/live")[0] == 503
    await server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    await server.stop()

