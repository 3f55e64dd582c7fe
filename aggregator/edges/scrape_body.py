"""The /metrics body: rendered once for all the scrapes that want it at the same moment, and
written to each client in slices, so a client that reads slowly (or not at all) holds no copy.

Single flight: one render of a given format (text or OpenMetrics, gzipped or not) is in flight
at a time, and a scrape of that format arriving meanwhile waits for it and gets the same bytes.
There is no reuse window: a scrape arriving after a render finished starts a new one, so a body
is never older than the scrape that asked for it, except for a joiner, whose body is the
render it joined (begun at most one render time before it arrived).

Renders run one at a time in their own thread (one glibc malloc arena, not one per pooled
thread), so the event loop keeps taking NATS messages while a large fleet renders. Bodies
are sent `_SLICE` bytes at a time, waiting for each to drain: asyncio's transport keeps a
private copy of whatever the socket did not take, which for a whole 10 MB body written at
once was 10 MB per stalled client (40 of them took RSS from 76 to 721 MB). And glibc keeps
freed memory in its heap unless told to give it back (malloc_trim), which it is once the last
scrape in flight of a large body is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import chain

from aiohttp import web
from prometheus_client import exposition as prometheus_exposition

from aggregator.collectors.http_telemetry import HttpTelemetry
from aggregator.exposition import encoder as exposition

try:
    # ISA-L's deflate: a real Prometheus always asks for gzip, and on a 91 MB body (10,000 full
    # workers) ISA-L level 1 takes 12 ms where zlib level 1 takes 91 ms, for a smaller body.
    from isal import isal_zlib as zlib
except ImportError:  # a platform without an isal wheel: zlib, slower but the same format
    import zlib  # type: ignore[no-redef]

# Level 1: level 9 (prometheus_client's choice) costs ~10x the CPU for a few percent smaller bodies.
GZIP_LEVEL = 1
_GZIP_WBITS = 16 + 15  # a gzip member (header and CRC), not a bare zlib stream
_SLICE = 128 * 1024
# Bodies from this size on are worth giving the heap back after (small fleets never pay for it).
_TRIM_AFTER_BYTES = 1024 * 1024


def render(source, accept: str, gzipped: bool, names: tuple[str, ...] = ()) -> tuple[bytes, dict]:
    """(body, headers) of `source` in the format `accept` negotiates, gzipped if asked; only the
    series `names` when given (`?name[]=`)."""
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


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), which returns the free memory of every arena to the system; None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim  # a CDLL call releases the GIL
    except (OSError, AttributeError, TypeError):  # musl, macOS: no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return partial(trim, 0)


class SharedRenders:
    """Single-flight renders of the full registry, one per format in flight, in one render thread."""

    def __init__(self, source, telemetry: HttpTelemetry) -> None:
        self.source = source
        self.telemetry = telemetry
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._in_flight: dict[tuple[str, bool], asyncio.Future] = {}
        self._one_at_a_time = asyncio.Lock()
        self._scrapes = 0
        self._large_since_trim = False
        self._trim = _malloc_trim()

    async def body(self, accept: str, gzipped: bool) -> tuple[bytes, dict]:
        _, content_type = prometheus_exposition.choose_encoder(accept)
        key = (content_type, gzipped)
        future = self._in_flight.get(key)
        if future is None:
            future = self._in_flight[key] = asyncio.ensure_future(self._render(accept, gzipped))
            future.add_done_callback(partial(self._forget, key))
        # Shielded: a scrape that gives up (write timeout, client gone) leaves the render to the others.
        return await asyncio.shield(future)

    def _forget(self, key: tuple[str, bool], future: asyncio.Future) -> None:
        if self._in_flight.get(key) is future:
            del self._in_flight[key]

    async def _render(self, accept: str, gzipped: bool) -> tuple[bytes, dict]:
        async with self._one_at_a_time:
            self.telemetry.renders.inc()
            body, headers = await asyncio.get_running_loop().run_in_executor(
                self.executor, render, self.source, accept, gzipped)
        if len(body) >= _TRIM_AFTER_BYTES:
            self._large_since_trim = True
        return body, headers

    def scrape_started(self) -> None:
        self._scrapes += 1

    def scrape_done(self) -> None:
        """Once no scrape holds a large body any more, its memory goes back to the system."""
        self._scrapes -= 1
        if self._scrapes == 0 and self._large_since_trim and self._trim is not None:
            self._large_since_trim = False
            self.executor.submit(self._trim)  # after any render queued, never during one

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def send(request: web.Request, body: bytes, headers: dict) -> web.StreamResponse:
    """Write `body` in slices, each sent (or in the kernel's buffer) before the next is handed over."""
    response = web.StreamResponse(headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    view = memoryview(body)
    for start in range(0, len(view), _SLICE):
        await response.write(view[start:start + _SLICE])
    await response.write_eof()
    return response
