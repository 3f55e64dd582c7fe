"""The status page's HTTP side: `/` (HTML) and `/api/v1/...` (JSON), on the same app as /metrics.

Registered on the same aiohttp application as /metrics (`build_app(..., routes=...)`), so the
same middlewares (basic auth) and server limits apply. Documents are built and encoded on a
worker thread, one at a time, like /metrics' renders, so the event loop keeps taking messages
while a large fleet is read; the cyclic GC is off meanwhile (nothing built forms a cycle, and a
full collection over a large fleet's heap would otherwise run several times per page).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import TypeVar

import msgspec
from aiohttp import web

from aggregator.collectors.status_view import (
    BadQuery,
    StatusView,
    WorkersQuery,
    parse_no_query,
    parse_workers_query,
)
from aggregator.edges.nats_transport import NatsSubscriber
from aggregator.exposition import status_api as api
from aggregator.exposition import status_html
from aggregator.state.fleet import WorkerKey

T = TypeVar("T")

_JSON = "application/json"
_COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_HTML_HEADERS = {**_COMMON_HEADERS, "Content-Security-Policy": status_html.CONTENT_SECURITY_POLICY}
_MAX_ID = 2**64 - 1


def nats_connection(subscriber: NatsSubscriber) -> Callable[[], api.NatsConnection]:
    """The NATS connection's state as the status documents show it (never a credential)."""

    def read() -> api.NatsConnection:
        nc = subscriber.nc
        url = nc.connected_url if nc is not None else None
        stats = nc.stats if nc is not None else {}
        return api.NatsConnection(
            connected=bool(nc is not None and nc.is_connected), subscribed=subscriber.subscribed,
            servers=list(subscriber.display_servers),
            server=f"{url.hostname}:{url.port}" if url is not None and nc is not None and nc.is_connected else None,
            reconnects=int(stats.get("reconnects", 0)), messages_in=int(stats.get("in_msgs", 0)),
            bytes_in=int(stats.get("in_bytes", 0)))

    return read


def _built(build: Callable[[], T]) -> T:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return build()
    finally:
        if enabled:
            gc.enable()


class StatusPage:
    """The routes of the status page and API over one StatusView."""

    def __init__(self, view: StatusView, *, before_read: Callable[[], None] = lambda: None) -> None:
        self.view = view
        self._before_read = before_read  # expiry, so a page never shows a worker past stale_after
        self._building = asyncio.Lock()
        self._encoder = msgspec.json.Encoder()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.page),
            web.get("/api/v1/summary", self.summary),
            web.get("/api/v1/workers", self.workers),
            web.get("/api/v1/workers/{component}/{endpoint}/{worker_id}/{dp_rank}", self.worker),
            web.get("/api/v1/sources", self.sources),
            web.get("/api/v1/{rest:.*}", self.unknown),
        ]

    async def _off_loop(self, build: Callable[[], T]) -> T:
        self._before_read()
        async with self._building:
            return await asyncio.to_thread(_built, build)

    def _json(self, document: msgspec.Struct, status: int = 200) -> web.Response:
        return web.Response(body=self._encoder.encode(document), status=status, content_type=_JSON,
                            headers=_COMMON_HEADERS)

    def _error(self, status: int, error: str, message: str) -> web.Response:
        return self._json(api.ApiError(error=error, message=message), status)

    # -- JSON -----------------------------------------------------------------------------------

    async def summary(self, request: web.Request) -> web.Response:
        try:
            parse_no_query(request.query.items())
        except BadQuery as error:
            return self._error(400, "bad_request", str(error))
        body = await self._off_loop(lambda: self._encoder.encode(self.view.summary()))
        return web.Response(body=body, content_type=_JSON, headers=_COMMON_HEADERS)

    async def workers(self, request: web.Request) -> web.Response:
        try:
            query = parse_workers_query(request.query.items())
        except BadQuery as error:
            return self._error(400, "bad_request", str(error))
        body = await self._off_loop(lambda: self._encoder.encode(self.view.workers(query)))
        return web.Response(body=body, content_type=_JSON, headers=_COMMON_HEADERS)

    async def worker(self, request: web.Request) -> web.Response:
        info = request.match_info
        try:
            parse_no_query(request.query.items())
            key = WorkerKey(info["component"], info["endpoint"], _id(info["worker_id"], "worker_id"),
                            _id(info["dp_rank"], "dp_rank"))
        except BadQuery as error:
            return self._error(400, "bad_request", str(error))
        self._before_read()
        detail = self.view.worker(key)  # one worker: cheaper in place than a thread hand-off
        if detail is None:
            return self._error(404, "not_found", f"no live worker {key.component}/{key.endpoint}/"
                                                 f"{key.worker_id}/{key.dp_rank} (expired, or never seen)")
        return self._json(detail)

    async def sources(self, request: web.Request) -> web.Response:
        try:
            parse_no_query(request.query.items())
        except BadQuery as error:
            return self._error(400, "bad_request", str(error))
        body = await self._off_loop(lambda: self._encoder.encode(self.view.sources()))
        return web.Response(body=body, content_type=_JSON, headers=_COMMON_HEADERS)

    async def unknown(self, request: web.Request) -> web.Response:
        return self._error(404, "not_found", f"no such API path {request.path!r}; see /api/v1/summary, "
                                             "/api/v1/workers, /api/v1/sources")

    # -- HTML -----------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        try:
            query = parse_workers_query(request.query.items())
        except BadQuery as error:
            return web.Response(body=status_html.render_error(400, str(error)), status=400,
                                content_type="text/html", charset="utf-8", headers=_HTML_HEADERS)
        body = await self._off_loop(lambda: self._page(query))
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=_HTML_HEADERS)

    def _page(self, query: WorkersQuery) -> bytes:
        view = self.view
        return status_html.render_page(view.summary(), view.workers(query), view.sources())


def _id(text: str, name: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20 or int(text) > _MAX_ID:
        raise BadQuery(f"{name} must be a decimal integer from 0 to {_MAX_ID}; got {text[:40]!r}")
    return int(text)
