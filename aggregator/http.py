"""The HTTP edge: /metrics (text 0.0.4 or OpenMetrics by content negotiation), /health, /live."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .telemetry import Telemetry

# Level 1: a real Prometheus always asks for gzip, and level 9 (the library default)
# costs ~10x the CPU for a few percent smaller bodies.
GZIP_LEVEL = 1


def render_metrics(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def build_app(
    registry: CollectorRegistry,
    telemetry: Telemetry,
    *,
    health: Callable[[], dict],
    before_scrape: Callable[[], None] = lambda: None,
    middlewares: tuple = (),
) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        started = time.perf_counter()
        before_scrape()
        # `?name[]=a&name[]=b` restricts the output to those families, as prometheus_client's own server does.
        names = request.query.getall("name[]", [])
        source = registry.restricted_registry(names) if names else registry
        body, content_type = render_metrics(source, request.headers.get("Accept", ""))
        headers = {"Content-Type": content_type}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers["Content-Encoding"] = "gzip"
        telemetry.scrape_duration.observe(time.perf_counter() - started)
        return web.Response(body=body, headers=headers)

    async def health_route(request: web.Request) -> web.Response:
        state = health()
        status = 200 if state["status"] == "ready" else 503
        return web.Response(text=json.dumps(state), status=status, content_type="application/json")

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health_route)
    app.router.add_get("/live", live)
    return app


async def start_server(app: web.Application, host: str, port: int, ssl_context=None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (for --port 0)."""
    for site in runner.sites:
        server = site._server  # aiohttp exposes no public accessor for the socket
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
    raise RuntimeError("server not started")
