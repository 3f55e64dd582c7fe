"""A worker's own status server: real aiohttp server on loopback, real HTTP client."""

from __future__ import annotations

import json

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from fleet_worker.endpoint_metrics import EndpointMetrics
from fleet_worker.registry import MetricsRegistry
from fleet_worker.status_server import HealthState, StatusServer, StatusServerConfig

from .support import OPENMETRICS


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


async def get(session: aiohttp.ClientSession, url: str, **headers) -> tuple[int, str, str]:
    async with session.get(url, headers=headers) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def serve(config: StatusServerConfig):
    runtime = MetricsRegistry()
    metrics = EndpointMetrics(runtime.namespace("dynamo").component("backend").endpoint("generate"))
    with metrics.track(request_bytes=5):
        pass
    server = StatusServer(runtime, config)
    port = await server.start()
    return server, f"http://127.0.0.1:{port}"


async def test_status_server_serves_metrics_health_and_live_over_http():
    server, base = await serve(StatusServerConfig(host="127.0.0.1", port=0))
    try:
        async with aiohttp.ClientSession() as session:
            status, content_type, body = await get(session, f"{base}/metrics")
            assert status == 200 and content_type.startswith("text/plain")
            fams = {f.name: f for f in parse_text(body)}
            assert fams["dynamo_component_requests"].samples[0].value == 1
            assert fams["dynamo_component_request_duration_seconds"].type == "histogram"
            assert "dynamo_component_uptime_seconds" in fams

            status, content_type, body = await get(session, f"{base}/metrics", Accept=OPENMETRICS)
            assert content_type.startswith("application/openmetrics-text")
            assert "dynamo_component_requests" in {f.name for f in parse_openmetrics(body)}

            for path in ("/health", "/live"):
                status, content_type, body = await get(session, base + path)
                assert status == 503 and content_type.startswith("text/plain")
                report = json.loads(body)
                assert report["status"] == "notready" and set(report["uptime"]) == {"secs", "nanos"}
            server.health.set_endpoint("generate")
            server.health.set_ready()
            status, _, body = await get(session, f"{base}/health")
            assert status == 200
            assert json.loads(body)["endpoints"] == {"generate": "ready"}
            assert json.loads(body)["status"] == "ready"

            status, _, body = await get(session, f"{base}/nothing/here")
            assert (status, body) == (404, "Route not found")
    finally:
        await server.stop()


async def test_custom_health_paths_replace_the_defaults():
    config = StatusServerConfig(host="127.0.0.1", port=0, health_path="/healthz", live_path="/livez",
                                starting_status="ready")
    server, base = await serve(config)
    try:
        async with aiohttp.ClientSession() as session:
            assert (await get(session, f"{base}/healthz"))[0] == 200
            assert (await get(session, f"{base}/livez"))[0] == 200
            assert (await get(session, f"{base}/health"))[:3:2] == (404, "Route not found")
            assert (await get(session, f"{base}/live"))[0] == 404
    finally:
        await server.stop()
