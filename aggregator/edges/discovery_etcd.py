"""Dynamo's etcd discovery backend (`DYN_DISCOVERY_BACKEND=etcd`, `ETCD_ENDPOINTS`), read through etcd's JSON gateway.

Dynamo keeps its keys at the root (`v1/{bucket}/...`, no prefix), each on the worker's
lease (TTL 30 s, kept alive by the worker): a clean shutdown deletes them, and a killed
worker's keys are deleted by etcd when its lease expires. Both reach a watch as DELETE
events, so this reader has nothing to expire itself.

The client is etcd's v3 JSON gateway (`POST /v3/kv/range`, streaming `POST /v3/watch`),
spoken with aiohttp, which the aggregator already depends on; it is part of etcd's
documented API (served by every etcd 3.4+ on its client port) and carries all a reader
needs. Not a gRPC client: the Python etcd v3 clients are either unmaintained (etcd3,
aioetcd3) or bring grpcio and protobuf, a large native dependency, for two calls.

How: each bucket's prefix of the namespace is listed at one pinned revision, a page at a
time (bounded responses), then one watch of `v1/` from the next revision. A watch that ends,
is compacted away, or whose endpoint stops answering a probe (a watch stream is silent
when nothing changes, so silence alone says nothing) is followed by a new listing, diffed
against the view. A failed endpoint gives way to the next one of `ETCD_ENDPOINTS`, with a
growing delay. TLS and etcd's auth token, as Dynamo's workers are told them (`ETCD_AUTH_*`), are
`etcd_gateway`'s: a token etcd no longer takes is renewed there, or here for a watch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Final

import aiohttp
import msgspec
import structlog
from msgspec import Struct

from aggregator.collectors.discovery_telemetry import AUTH, COMPACTED, UNREACHABLE, WATCH_LOST, DiscoveryTelemetry
from aggregator.config import DiscoveryConfig
from aggregator.edges import etcd_gateway
from aggregator.edges.discovery_store import Backoff, DiscoveryView, DiscoveryWatcher
from aggregator.edges.etcd_gateway import EtcdGateway, EtcdUnavailable, TokenRefused
from fleet_protocol.discovery import KEY_ROOT

log = structlog.get_logger("aggregator.discovery")

PAGE_KEYS: Final = 200  # keys per range request
REQUEST_TIMEOUT_S: Final = 5.0
PROBE_INTERVAL_S: Final = 5.0
# A watch that lasted this long was a working one: the next failure starts from the shortest delay.
# Shorter ones keep doubling it, so a proxy that ends every watch at once costs a listing per 5 s at most.
STEADY_WATCH_S: Final = 30.0
# A watch response holds whole revisions (a lease's keys go in one): bounded all the same.
MAX_WATCH_LINE: Final = 32 * 1024 * 1024


# etcd's gateway JSON: int64 as strings (decoded with strict=False), bytes as base64.


class _Header(Struct, gc=False):
    revision: int = 0


class _KeyValue(Struct, gc=False):
    key: bytes
    value: bytes = b""
    mod_revision: int = 0


class _RangeResponse(Struct, gc=False):
    header: _Header = msgspec.field(default_factory=_Header)
    kvs: list[_KeyValue] = msgspec.field(default_factory=list)
    more: bool = False


class _Event(Struct, gc=False):
    kv: _KeyValue
    type: str = "PUT"


class _WatchResponse(Struct, gc=False):
    header: _Header = msgspec.field(default_factory=_Header)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: list[_Event] = msgspec.field(default_factory=list)


class _GatewayError(Struct, gc=False):
    message: str = ""
    http_code: int = 0


class _WatchLine(Struct, gc=False):
    result: _WatchResponse | None = None
    error: _GatewayError | None = None


_range_decoder: Final = msgspec.json.Decoder(_RangeResponse, strict=False)
_watch_decoder: Final = msgspec.json.Decoder(_WatchLine, strict=False)


class WatchEnded(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with `prefix`"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdDiscovery(DiscoveryWatcher):
    backend = "etcd"

    def __init__(self, config: DiscoveryConfig, view: DiscoveryView, telemetry: DiscoveryTelemetry, *,
                 probe_interval: float = PROBE_INTERVAL_S, request_timeout: float = REQUEST_TIMEOUT_S,
                 page_keys: int = PAGE_KEYS) -> None:
        super().__init__(view, telemetry, ",".join(config.etcd_endpoints))
        self.endpoints = [url.rstrip("/") for url in config.etcd_endpoints]
        self.probe_interval = probe_interval
        self.request_timeout = request_timeout
        self.page_keys = page_keys
        # A page of entries at their size limit, base64-encoded, with room for keys and JSON.
        self.max_page_bytes = page_keys * (config.max_entry_bytes * 4 // 3 + 4096) + 65536
        self.revision = 0  # of the store as the view last saw it
        self.watch_created = False  # the watch being followed was accepted (its token with it)
        self.gateway = EtcdGateway(config, request_timeout)
        self.protection = etcd_gateway.describe(config)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        endpoint = 0
        log.info("reading Dynamo's discovery store", backend=self.backend, endpoints=self.endpoints,
                 namespace=self.view.namespace, auth=self.protection)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout)
        async with self.gateway.session(timeout) as session:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                base = self.endpoints[endpoint % len(self.endpoints)]
                try:
                    await self._list(session, base)
                    self._listed()
                    watched_from = loop.time()
                    try:
                        await self._follow(session, base, stop)
                    finally:
                        if loop.time() - watched_from >= STEADY_WATCH_S:
                            backoff.reset()
                except WatchEnded as ended:
                    if ended.reason == COMPACTED:
                        # Still connected, the view right up to the watch's end: a new listing catches up.
                        self.telemetry.errors.labels(COMPACTED).inc()
                    else:
                        self._failed(ended.reason, f"{base}: {ended}")
                except EtcdUnavailable as error:
                    self.view.abandon_listing()
                    self._failed(error.reason, f"{base}: {error}")
                    endpoint += 1
                except Exception as error:  # noqa: BLE001 - a bug here must not end discovery for good
                    self.view.abandon_listing()
                    self._bug(error)
                await backoff.wait(stop)

    async def _list(self, session: aiohttp.ClientSession, base: str) -> None:
        """Every key of the namespace at one revision into the view; keys it no longer holds deleted."""
        self.view.begin_listing()
        revision = 0
        for prefix in self.view.prefixes.values():
            start = prefix.encode()
            end = prefix_end(start)
            while True:
                body: dict = {"key": _b64(start), "range_end": _b64(end), "limit": self.page_keys}
                if revision:
                    body["revision"] = revision  # every page of the listing at the first one's revision
                data = await self.gateway.post(session, base, "/v3/kv/range", body, self.max_page_bytes)
                try:
                    page = _range_decoder.decode(data)
                except msgspec.DecodeError as error:
                    raise EtcdUnavailable(f"not a range response: {error}") from None
                revision = revision or page.header.revision
                for kv in page.kvs:
                    self.view.apply(kv.key.decode(errors="replace"), kv.value)
                if not page.more or not page.kvs:
                    break
                start = page.kvs[-1].key + b"\0"
        if not revision:
            raise EtcdUnavailable("no revision in the range responses")
        self.revision = revision
        self.view.end_listing()

    async def _follow(self, session: aiohttp.ClientSession, base: str, stop: asyncio.Event) -> None:
        """Apply the watch's changes until `stop`; raises WatchEnded when the watch or the endpoint is lost."""
        stopped = asyncio.ensure_future(stop.wait())
        tasks = [asyncio.ensure_future(self._watch(session, base)), asyncio.ensure_future(self._probe(session, base)),
                 stopped]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, WatchEnded, EtcdUnavailable):
                    await task
        for task in done:
            if task is not stopped:
                task.result()  # raises what ended it

    async def _watch(self, session: aiohttp.ClientSession, base: str) -> None:
        """Follow the watch; raises WatchEnded. A token refused is renewed, the watch made again from where
        it was; a new token refused before a watch was accepted with it ends the watch (`auth`)."""
        renewed = False
        while True:
            token = await self.gateway.token(session, base)
            self.watch_created = False
            try:
                await self._watch_with(session, base, token)
            except TokenRefused as refused:
                self.gateway.forget(token)
                if renewed and not self.watch_created:
                    raise WatchEnded(AUTH, f"watch refused a token issued just before: {refused}") from None
                renewed = True

    async def _watch_with(self, session: aiohttp.ClientSession, base: str, token: str | None) -> None:
        root = f"{KEY_ROOT}/".encode()
        body = {"create_request": {"key": _b64(root), "range_end": _b64(prefix_end(root)),
                                   "start_revision": self.revision + 1}}
        try:
            async with self.gateway.stream(session, base, "/v3/watch", body, token) as response:
                if response.status != 200:
                    raise WatchEnded(WATCH_LOST, f"watch refused: HTTP {response.status}")
                buffer = bytearray()  # one response per line
                async for chunk in response.content.iter_any():
                    searched = len(buffer)
                    buffer += chunk
                    while (end := buffer.find(b"\n", searched)) >= 0:
                        line = bytes(buffer[:end])
                        del buffer[:end + 1]
                        searched = 0
                        if line.strip():
                            self._apply_watch(line)
                    if len(buffer) > MAX_WATCH_LINE:
                        raise WatchEnded(WATCH_LOST, f"a watch response over {MAX_WATCH_LINE} bytes")
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise WatchEnded(WATCH_LOST, str(error) or type(error).__name__) from None
        raise WatchEnded(WATCH_LOST, "the watch stream ended")

    def _apply_watch(self, line: bytes) -> None:
        try:
            message = _watch_decoder.decode(line)
        except msgspec.DecodeError as error:
            raise WatchEnded(WATCH_LOST, f"not a watch response: {error}") from None
        if message.error is not None:
            raise WatchEnded(WATCH_LOST, f"watch error: {message.error.message[:200]}")
        result = message.result
        if result is None:
            return
        if result.created and not result.canceled:
            self.watch_created = True
        if result.canceled:
            if result.compact_revision:
                raise WatchEnded(COMPACTED, f"revision {self.revision + 1} compacted (now {result.compact_revision})")
            refusal = self.gateway.watch_refusal(result.cancel_reason)
            if isinstance(refusal, TokenRefused):
                raise refusal
            if refusal is not None:
                raise WatchEnded(AUTH, f"watch canceled: {refusal}")
            raise WatchEnded(WATCH_LOST, f"watch canceled: {result.cancel_reason[:200]}")
        for event in result.events:
            key = event.kv.key.decode(errors="replace")
            if event.type == "DELETE":
                self.view.remove(key)
            else:
                self.view.apply(key, event.kv.value)
            self.revision = max(self.revision, event.kv.mod_revision)

    async def _probe(self, session: aiohttp.ClientSession, base: str) -> None:
        """Returns never while the endpoint answers; raises WatchEnded once it does not."""
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.gateway.post(session, base, "/v3/maintenance/status", {}, 65536)
            except EtcdUnavailable as error:
                reason = WATCH_LOST if error.reason == UNREACHABLE else error.reason
                raise WatchEnded(reason, f"the endpoint stopped answering: {error}") from None
