"""The status page's HTTP side: `/` (HTML) and `/api/v1/...` (JSON), on the same app as /metrics.

Registered on the same aiohttp application as /metrics (`build_app(..., routes=...)`), so the
same middlewares (basic auth) and server limits apply. Documents are built and encoded on a
worker thread, one at a time, like /metrics' renders, so the event loop keeps taking messages
while a large fleet is read; the cyclic GC is off meanwhile (nothing built forms a cycle, and a
full collection over a large fleet's heap would otherwise run several times per page).

A page is for people and the API for occasional programs: neither may slow ingest down. Builds
take at most BUILD_SHARE of the time (after a build of t seconds the next one waits
t * (1/BUILD_SHARE - 1)), and requests that queued behind a build of the same document share
it when it started after they arrived (so no answer is older than its request). A client
asking back to back, or many browsers refreshing at once, then costs ingest a bounded share
(docs/status-page.md has the measurements).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

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

_JSON = "application/json"
_COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_HTML_HEADERS = {**_COMMON_HEADERS, "Content-Security-Policy": status_html.CONTENT_SECURITY_POLICY}
_MAX_ID = 2**64 - 1
BUILD_SHARE = 0.2
_SHARED_DOCUMENTS = 64  # the most recent build of this many distinct documents (path and query) is kept


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


def _built(build: Callable[[], bytes]) -> bytes:
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
        self._next_build = 0.0  # on the event loop's clock
        self._latest: dict[str, tuple[float, bytes]] = {}  # document -> (when its build started, body)
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

    async def _built_off_loop(self, document: str, build: Callable[[], bytes]) -> bytes:
        """The body of `document` (its path and query), built on a thread from the state as it is
        now or later, within the time share of builds."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        self._before_read()
        async with self._building:
            latest = self._latest.get(document)
            if latest is not None and latest[0] >= arrived:
                return latest[1]  # built for a request that queued with this one, from state read since
            wait = self._next_build - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            started = loop.time()
            body = await asyncio.to_thread(_built, build)
            finished = loop.time()
            self._next_build = finished + (finished - started) * (1 / BUILD_SHARE - 1)
            if len(self._latest) >= _SHARED_DOCUMENTS:
                self._latest.clear()
            self._latest[document] = (started, body)
            return body

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
        body = await self._built_off_loop(request.path_qs, lambda: self._encoder.encode(self.view.summary()))
        return web.Response(body=body, content_type=_JSON, headers=_COMMON_HEADERS)

    async def workers(self, request: web.Request) -> web.Response:
        try:
            query = parse_workers_query(request.query.items())
        except BadQuery as error:
            return self._error(400, "bad_request", str(error))
        body = await self._built_off_loop(request.path_qs, lambda: self._encoder.encode(self.view.workers(query)))
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
        body = await self._built_off_loop(request.path_qs, lambda: self._encoder.encode(self.view.sources()))
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
        body = await self._built_off_loop(request.path_qs, lambda: self._page(query))
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=_HTML_HEADERS)

    def _page(self, query: WorkersQuery) -> bytes:
        view = self.view
        return status_html.render_page(view.summary(), view.workers(query), view.sources())


def _id(text: str, name: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20 or int(text) > _MAX_ID:
        raise BadQuery(f"{name} must be a decimal integer from 0 to {_MAX_ID}; got {text[:40]!r}")
    return int(text)
