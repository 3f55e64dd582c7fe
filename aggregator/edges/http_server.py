"""The HTTP edge: /metrics (text 0.0.4 or OpenMetrics by content negotiation), /health, /live.

Bounded against slow and hostile clients as an exporter is: connections (http_listener),
scrapes in flight (`max_scrapes`, past it 503 at once, as node_exporter's --web.max-requests)
and the time a scrape may take to be written (`write_timeout`, Go's WriteTimeout: the
connection is closed when it passes); concurrent scrapes share one rendered body (scrape_body).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from aggregator.collectors.http_telemetry import HttpTelemetry
from aggregator.collectors.telemetry import Telemetry
from aggregator.edges import scrape_body
from aggregator.edges.http_listener import (
    ConnectionLimits,
    Listener,
    Occasionally,
    listening_socket,
)

GZIP_LEVEL = scrape_body.GZIP_LEVEL
_REQUEST_ERRORS_EVERY = 60.0


@dataclass(frozen=True)
class ScrapeLimits:
    max_scrapes: int = 40
    write_timeout: float = 30.0


def build_app(
    registry: CollectorRegistry,
    telemetry: Telemetry,
    *,
    health: Callable[[], dict],
    before_scrape: Callable[[], None] = lambda: None,
    middlewares: tuple = (),
    http_telemetry: HttpTelemetry | None = None,
    limits: ScrapeLimits | None = None,
    routes: Iterable[web.RouteDef] = (),
) -> web.Application:
    http_telemetry = http_telemetry or HttpTelemetry(None)
    limits = limits or ScrapeLimits()
    renders = scrape_body.SharedRenders(registry, http_telemetry)
    in_flight = 0
    retry_after = str(max(1, math.ceil(limits.write_timeout / 10)))

    async def metrics(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight
        if in_flight >= limits.max_scrapes:
            http_telemetry.refused["scrape_limit"].inc()
            return web.Response(status=503, text="Too many scrapes in progress\n", headers={"Retry-After": retry_after})
        in_flight += 1
        renders.scrape_started()
        try:
            async with asyncio.timeout(limits.write_timeout):
                return await _scrape(request)
        except TimeoutError:
            http_telemetry.closed["write_timeout"].inc()
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:  # the client left mid-body
            pass
        finally:
            in_flight -= 1
            renders.scrape_done()
        # The connection is gone: aiohttp finds it closed when it writes this, and drops it quietly.
        return web.Response(status=503)

    async def _scrape(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        before_scrape()
        # `?name[]=a&name[]=b` restricts the output to those series, as prometheus_client's own server does.
        names = tuple(request.query.getall("name[]", []))
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
        accept = request.headers.get("Accept", "")
        if names:
            # A selection (`name[]`) is small by intent: rendered in place, it costs less than a
            # thread hand-off, whose GIL switches stall the event loop for up to 5 ms each.
            body, headers = scrape_body.render(registry, accept, gzipped, names)
        else:
            body, headers = await renders.body(accept, gzipped)
        telemetry.scrape_duration.observe(time.perf_counter() - started)
        return await scrape_body.send(request, body, headers)

    async def health_route(request: web.Request) -> web.Response:
        state = health()
        status = 200 if state["status"] == "ready" else 503
        return web.Response(text=json.dumps(state), status=status, content_type="application/json")

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def stop_rendering(app: web.Application) -> None:
        renders.close()

    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health_route)
    app.router.add_get("/live", live)
    app.add_routes(routes)  # more pages (the status page), behind the same middlewares
    app.on_cleanup.append(stop_rendering)
    return app


class _RareRequestErrors(logging.Filter):
    """aiohttp logs a traceback for every request it cannot parse, quoting the request's bytes
    (an Authorization header among them): any client could fill the log, with credentials.
    One line a minute instead, with the error's class and how many were held back; a handler's
    own exception keeps its traceback, rate-limited the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.report = Occasionally(_REQUEST_ERRORS_EVERY)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        held_back = self.report.allow()
        if held_back is None:
            return False
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "malformed HTTP request refused (%s, status %s); %d more held back in the last minute"
            record.args = (type(error).__name__, error.code, held_back)
            record.exc_info, record.exc_text = None, None
        elif held_back:
            record.msg = f"{record.msg} (%d more held back in the last minute)"
            record.args = (*(record.args or ()), held_back)
        return True


def _request_logger() -> logging.Logger:
    logger = logging.getLogger("aggregator.http.requests")
    if not any(isinstance(f, _RareRequestErrors) for f in logger.filters):
        logger.addFilter(_RareRequestErrors())
    return logger


def _protocol(runner: web.AppRunner) -> asyncio.Protocol:
    """A new aiohttp RequestHandler for one connection."""
    server = runner.server
    assert server is not None, "runner not set up"
    return server()


@dataclass
class HttpServer:
    """A started server: its bound port, and how to stop it."""

    runner: web.AppRunner
    listener: Listener
    task: asyncio.Task

    @property
    def port(self) -> int:
        return self.listener.sock.getsockname()[1]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.listener.close()
        await self.runner.cleanup()


async def start_server(app: web.Application, host: str, port: int, ssl_context=None, *,
                       limits: ConnectionLimits | None = None,
                       telemetry: HttpTelemetry | None = None) -> HttpServer:
    telemetry = telemetry or HttpTelemetry(None)
    limits = limits or ConnectionLimits()
    sock = listening_socket(host, port)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=limits.idle_timeout,
                           logger=_request_logger())
    try:
        listener = Listener(lambda: _protocol(runner), sock, ssl_context, limits, telemetry)
        app.middlewares.insert(0, listener.middleware)
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    task = asyncio.create_task(listener.serve(), name="http-accept")
    task.add_done_callback(_accept_loop_ended)
    return HttpServer(runner, listener, task)


def _accept_loop_ended(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        structlog.get_logger("aggregator.http").error("HTTP accept loop failed; no new connections",
                                                      exc_info=task.exception())

