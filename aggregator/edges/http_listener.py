"""Accepting HTTP connections with the limits of Prometheus's own exporters.

Go's net/http server, which every exporter runs, closes a connection that has not sent a
complete request header within ReadHeaderTimeout and an idle keep-alive one after
IdleTimeout; Prometheus caps open connections (`--web.max-connections`, netutil's
LimitListener: at the cap it stops accepting, and new connections wait in the kernel's
backlog). aiohttp has only a keep-alive timeout, armed at connect as well (3630 s by default),
and asyncio's accept loop handles running out of file descriptors badly: each failed accept
logs a traceback and schedules one more retry, so the retries multiply (1.75 million
tracebacks in 70 s were measured). So this module accepts the connections itself:

- at most `max_connections` open (TLS handshakes included); past it, it stops accepting;
- a connection that has sent no complete request header `header_timeout` seconds after it
  opened (after its TLS handshake, itself bounded by the same time) is closed; between
  requests aiohttp's keep-alive timer (`idle_timeout`, also bounding a partial second request)
  closes an idle one;
- an accept that fails for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) is counted,
  logged at most once per `_REPORT_EVERY` seconds with the count held back, and retried when a
  connection closes (which frees a descriptor) or after a pause growing to 1 s; nothing else
  changes, so the service recovers by itself once clients leave.

Each connection is aiohttp's own RequestHandler behind a thin protocol that knows when the
connection ends; a middleware tells it when a request header was complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from aggregator.collectors.http_telemetry import HttpTelemetry

log = structlog.get_logger("aggregator.http")

_OUT_OF_RESOURCES = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS",
                     errno.ENOMEM: "ENOMEM"}
# The client gave up between its connect and our accept: nothing to do but accept the next.
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
_REPORT_EVERY = 10.0
_FIRST_PAUSE = 0.005
_BACKLOG = 128


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    header_timeout: float = 5.0
    idle_timeout: float = 90.0


class Occasionally:
    """Lets one report through per `period` seconds; says how many it held back meanwhile."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.next = 0.0
        self.held_back = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now < self.next:
            self.held_back += 1
            return None
        self.next = now + self.period
        held_back, self.held_back = self.held_back, 0
        return held_back


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol, plus the header timer and the connection slot."""

    def __init__(self, listener: Listener, handler: asyncio.Protocol) -> None:
        self.listener = listener
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.requested = False
        self.released = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.handler.connection_made(transport)
        self.listener.by_handler[self.handler] = self
        if not self.requested:
            self.timer = asyncio.get_running_loop().call_later(
                self.listener.limits.header_timeout, self._header_timed_out)

    def request_started(self) -> None:
        self.requested = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _header_timed_out(self) -> None:
        self.timer = None
        if not self.requested and self.transport is not None and not self.transport.is_closing():
            self.listener.telemetry.closed["header_timeout"].inc()
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.listener.by_handler.pop(self.handler, None)
        try:
            self.handler.connection_lost(exc)
        finally:
            self.listener.release(self)


class Listener:
    """The accept loop over one listening socket, feeding aiohttp's low-level server."""

    def __init__(self, server: Callable[[], asyncio.Protocol], sock: socket.socket, ssl_context: ssl.SSLContext | None,
                 limits: ConnectionLimits, telemetry: HttpTelemetry) -> None:
        self.server = server
        self.sock = sock
        self.ssl_context = ssl_context
        self.limits = limits
        self.telemetry = telemetry
        self.open = 0
        self.by_handler: dict[asyncio.Protocol, _Connection] = {}
        self._freed = asyncio.Event()  # set when a connection ends
        self._starting: set[asyncio.Task] = set()
        self._report = Occasionally(_REPORT_EVERY)
        self._failing_since: float | None = None
        self._failures = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable]):
        """Outermost: a request reached the application, so its header was complete."""
        connection = self.by_handler.get(request.protocol)
        if connection is not None:
            connection.request_started()
        return await handler(request)

    def release(self, connection: _Connection) -> None:
        if not connection.released:
            connection.released = True
            self.open -= 1
            self.telemetry.connections.set(self.open)
            self._freed.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        pause = _FIRST_PAUSE
        while True:
            if self.open >= self.limits.max_connections:
                self._freed.clear()
                await self._freed.wait()
                continue
            try:
                sock, _ = await loop.sock_accept(self.sock)
            except OSError as error:
                if error.errno in _CLIENT_GONE:
                    continue
                self._accept_failed(error)
                self._freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = _FIRST_PAUSE
            if self._failing_since is not None:
                log.info("accepting HTTP connections again", failed_accepts=self._failures,
                         seconds=round(time.monotonic() - self._failing_since, 3))
                self._failing_since, self._failures = None, 0
            self.open += 1
            self.telemetry.connections.set(self.open)
            task = asyncio.create_task(self._start(sock))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _accept_failed(self, error: OSError) -> None:
        name = _OUT_OF_RESOURCES.get(error.errno or 0, "other")
        self.telemetry.accept_errors[name].inc()
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._failures += 1
        held_back = self._report.allow()
        if held_back is not None:
            log.warning("cannot accept HTTP connections" + (": out of file descriptors" if name == "EMFILE" else ""),
                        error=error.strerror or str(error), errno=name, open_connections=self.open,
                        max_connections=self.limits.max_connections, held_back_since_last=held_back,
                        hint="raise the open-files limit (ulimit -n) above --http-max-connections" if name in (
                            "EMFILE", "ENFILE") else None)

    async def _start(self, sock: socket.socket) -> None:
        connection = _Connection(self, self.server())
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.header_timeout if self.ssl_context else None)
        except (TimeoutError, OSError, ssl.SSLError):  # a failed or abandoned TLS handshake
            self.telemetry.closed["tls_handshake"].inc()
            sock.close()
            self.release(connection)
        except BaseException:
            sock.close()
            self.release(connection)
            raise

    async def close(self) -> None:
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        self.sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to `host` (an IP address) and listening, as asyncio's create_server makes it."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
