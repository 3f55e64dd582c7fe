"""The HTTP edge: /metrics (text 0.0.4 or OpenMetrics by content negotiation), /health, /live."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable, Iterable
from itertools import chain

from aiohttp import web
from prometheus_client import CollectorRegistry

from aggregator.collectors.telemetry import Telemetry
from aggregator.exposition import encoder as exposition

try:
    # ISA-L's deflate: a real Prometheus always asks for gzip, and on a 91 MB body (10,000 full
    # workers) ISA-L level 1 takes 12 ms where zlib level 1 takes 91 ms, for a smaller body.
    from isal import isal_zlib as zlib
except ImportError:  # a platform without an isal wheel: zlib, slower but the same format
    import zlib

# Level 1: level 9 (prometheus_client's choice) costs ~10x the CPU for a few percent smaller bodies.
GZIP_LEVEL = 1
_GZIP_WBITS = 16 + 15  # a gzip member (header and CRC), not a bare zlib stream


def _render(source, accept: str, gzipped: bool, names: tuple[str, ...] = ()) -> tuple[bytes, dict]:
    # A render allocates a few objects per sample; with a large fleet alive, CPython's cyclic GC
    # would run full collections over the whole heap several times mid-render (measured at
    # 10,000 workers: 1.1 s with it, 0.4 s without). Nothing a render makes forms a cycle.
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        families, content_type = exposition.encode_families(source, accept, names)
        headers = {"Content-Type": content_type}
        if gzipped:
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
            pieces = [compressor.compress(b"".join(family)) for family in families]
            pieces.append(compressor.flush())
            headers["Content-Encoding"] = "gzip"
            body = b"".join(pieces)
        else:
            body = b"".join(chain.from_iterable(families))
    finally:
        if gc_enabled:
            gc.enable()
    return body, headers


def build_app(
    registry: CollectorRegistry,
    telemetry: Telemetry,
    *,
    health: Callable[[], dict],
    before_scrape: Callable[[], None] = lambda: None,
    middlewares: tuple = (),
    routes: Iterable[web.RouteDef] = (),
) -> web.Application:
    # One render at a time: concurrent scrapes queue rather than multiply the CPU spent.
    rendering = asyncio.Lock()

    async def metrics(request: web.Request) -> web.Response:
        started = time.perf_counter()
        before_scrape()
        # `?name[]=a&name[]=b` restricts the output to those series, as prometheus_client's own server does.
        names = tuple(request.query.getall("name[]", []))
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
        accept = request.headers.get("Accept", "")
        if names:
            # A selection (`name[]`) is small by intent: rendered in place, it costs less than a
            # thread hand-off, whose GIL switches stall the event loop for up to 5 ms each.
            body, headers = _render(registry, accept, gzipped, names)
        else:
            async with rendering:
                # In a thread, so the event loop keeps taking NATS messages (and /health) while a
                # large fleet renders; the collectors read snapshots of the state (list(...)).
                body, headers = await asyncio.to_thread(_render, registry, accept, gzipped)
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
    app.add_routes(routes)  # more pages (the status page), behind the same middlewares
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
