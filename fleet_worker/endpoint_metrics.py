"""Automatic per-endpoint metrics for any handler, as Dynamo's work handler records them.

    generate_metrics = EndpointMetrics(runtime.namespace("dynamo").component("backend").endpoint("generate"))

    @generate_metrics.handler
    async def generate(request: bytes) -> AsyncIterator[bytes]:
        ...

    # or, around any block of code:
    async with generate_metrics.track(request_bytes=len(body)) as call:
        call.response_bytes += len(reply)

Every call counts `dynamo_component_requests_total`, observes
`dynamo_component_request_duration_seconds`, holds `dynamo_component_inflight_requests`
while it runs, adds `dynamo_component_request_bytes_total` /
`dynamo_component_response_bytes_total`, and counts `dynamo_component_errors_total{error_type}`
when it fails. Exceptions still propagate; the metrics only watch.

Within a wrapped handler, `current_call()` is the running call, so a handler can report
what only it knows (a simulated latency, an error it answered instead of raising).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections.abc import Callable

import msgspec

from fleet_worker.registry import DEFAULT_BUCKETS, MetricsError, MetricsRegistry

# Dynamo's error_type for a failure inside the handler itself.
GENERATE_ERROR = "generate"
CANCELLED_ERROR = "cancelled"

_current: contextvars.ContextVar[RequestCall | None] = contextvars.ContextVar("dynamo_request_call", default=None)


def current_call() -> RequestCall | None:
    """The call being tracked by the innermost wrapped handler, or None outside one."""
    return _current.get()


def payload_size(payload: object) -> int:
    """Bytes of a request or response as it would travel: raw bytes, UTF-8 text, else JSON."""
    if payload is None:
        return 0
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return len(payload)
    if isinstance(payload, str):
        return len(payload.encode())
    try:
        return len(msgspec.json.encode(payload))
    except (TypeError, ValueError):  # not serialisable: its size is unknown, not an error of the call
        return 0


class RequestCall:
    """One tracked call; a context manager, sync (`with`) and async (`async with`)."""

    __slots__ = ("_metrics", "request_bytes", "response_bytes", "duration", "error_type", "_started")

    def __init__(self, metrics: EndpointMetrics, request_bytes: int = 0) -> None:
        self._metrics = metrics
        self.request_bytes = request_bytes
        self.response_bytes = 0
        self.duration: float | None = None  # set to report a duration instead of the measured one
        self.error_type: str | None = None
        self._started = 0.0

    def fail(self, error_type: str = GENERATE_ERROR) -> None:
        """Count this call as failed with `error_type` without raising (keep the set of types small)."""
        self.error_type = error_type

    def __enter__(self) -> RequestCall:
        m = self._metrics
        m.requests.inc()
        m.inflight.inc()
        self._started = m.clock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        m = self._metrics
        m.inflight.dec()
        duration = self.duration if self.duration is not None else m.clock() - self._started
        m.duration.observe(max(duration, 0.0))
        if self.request_bytes:
            m.request_bytes.inc(self.request_bytes)
        if self.response_bytes:
            m.response_bytes.inc(self.response_bytes)
        if exc_type is not None and self.error_type is None:
            if issubclass(exc_type, asyncio.CancelledError):
                self.error_type = CANCELLED_ERROR
            else:
                self.error_type = getattr(exc, "error_type", None) or GENERATE_ERROR
        if self.error_type is not None:
            m.errors(str(self.error_type)).inc()

    async def __aenter__(self) -> RequestCall:
        return self.__enter__()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.__exit__(exc_type, exc, tb)


class HandlerError(Exception):
    """An error a handler raises to be counted under its own `error_type`."""

    def __init__(self, error_type: str, message: str = "") -> None:
        super().__init__(message or error_type)
        self.error_type = error_type


class EndpointMetrics:
    """The automatic metrics of one endpoint, created at the endpoint level of a registry."""

    def __init__(self, endpoint: MetricsRegistry, *, buckets=DEFAULT_BUCKETS, clock=time.perf_counter) -> None:
        if endpoint.level != "endpoint":
            raise MetricsError(f"automatic endpoint metrics belong to an endpoint, not a {endpoint.level}")
        self.endpoint = endpoint
        self.clock = clock
        self.requests = endpoint.create_counter("requests_total", "Total number of requests processed by component "
                                                "endpoint")
        self.duration = endpoint.create_histogram("request_duration_seconds", "Time spent processing requests by "
                                                  "component endpoint", buckets=buckets)
        self.inflight = endpoint.create_gauge("inflight_requests", "Number of requests currently being processed "
                                              "by component endpoint")
        self.request_bytes = endpoint.create_counter("request_bytes_total", "Total number of bytes received in "
                                                     "requests by component endpoint")
        self.response_bytes = endpoint.create_counter("response_bytes_total", "Total number of bytes sent in "
                                                      "responses by component endpoint")
        errors = endpoint.create_countervec("errors_total", "Total number of errors in work handler processing",
                                            ["error_type"])
        self._errors = errors
        self._error_children: dict[str, object] = {}

    def errors(self, error_type: str):
        child = self._error_children.get(error_type)
        if child is None:
            child = self._error_children[error_type] = self._errors.labels(error_type)
        return child

    def track(self, request_bytes: int = 0) -> RequestCall:
        return RequestCall(self, request_bytes)

    def handler(self, func: Callable | None = None, *, request_arg: int = 0,
                request_size: Callable[[object], int] = payload_size,
                response_size: Callable[[object], int] = payload_size):
        """Wrap a handler (function, coroutine function, generator or async generator).

        The request is positional argument `request_arg` (use 1 for a method); a
        generator's items are each counted as response bytes, and the call lasts until
        the stream ends.
        """
        if func is None:
            return functools.partial(self.handler, request_arg=request_arg, request_size=request_size,
                                     response_size=response_size)

        def start(args) -> RequestCall:
            size = request_size(args[request_arg]) if len(args) > request_arg else 0
            return RequestCall(self, size)

        if inspect.isasyncgenfunction(func):
            @functools.wraps(func)
            async def stream_async(*args, **kwargs):
                with start(args) as call:
                    stream = func(*args, **kwargs)
                    try:
                        while True:
                            token = _current.set(call)
                            try:
                                item = await stream.__anext__()
                            except StopAsyncIteration:
                                return
                            finally:
                                _current.reset(token)
                            call.response_bytes += response_size(item)
                            yield item
                    finally:
                        await stream.aclose()
            return stream_async

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def call_async(*args, **kwargs):
                with start(args) as call:
                    token = _current.set(call)
                    try:
                        result = await func(*args, **kwargs)
                    finally:
                        _current.reset(token)
                    call.response_bytes += response_size(result)
                    return result
            return call_async

        if inspect.isgeneratorfunction(func):
            @functools.wraps(func)
            def stream_sync(*args, **kwargs):
                with start(args) as call:
                    stream = func(*args, **kwargs)
                    try:
                        while True:
                            token = _current.set(call)
                            try:
                                item = next(stream)
                            except StopIteration:
                                return
                            finally:
                                _current.reset(token)
                            call.response_bytes += response_size(item)
                            yield item
                    finally:
                        stream.close()
            return stream_sync

        @functools.wraps(func)
        def call_sync(*args, **kwargs):
            with start(args) as call:
                token = _current.set(call)
                try:
                    result = func(*args, **kwargs)
                finally:
                    _current.reset(token)
                call.response_bytes += response_size(result)
                return result
        return call_sync
