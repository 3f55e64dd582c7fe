"""A worker's own status server, as Dynamo's system status server: /metrics, health, live.

Enabled by `DYN_SYSTEM_PORT` (bound on `DYN_SYSTEM_HOST`, default 0.0.0.0):

- `GET /metrics`: the worker's MetricsRegistry, text 0.0.4 or OpenMetrics by `Accept`.
- `GET {DYN_SYSTEM_HEALTH_PATH}` (default `/health`) and `GET {DYN_SYSTEM_LIVE_PATH}`
  (default `/live`): Dynamo's health JSON, 200 when ready, 503 when not.
- anything else: 404 `Route not found` (so `/health` is 404 once a custom path replaces it).

The server is prometheus_client's own (`ThreadingWSGIServer`, what `start_http_server` runs):
a thread per request beside the worker's event loop, so a worker needs no web framework.
Rendering the registry from those threads is safe, as prometheus_client's metrics are.

The starting status is `DYN_SYSTEM_STARTING_HEALTH_STATUS` (`ready` | `notready`, default
`notready`); the worker flips it with `health.set_ready()` once it serves. With
`DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS='["generate"]'` the status is instead "all listed
endpoints ready".
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client.exposition import ThreadingWSGIServer

from fleet_worker.registry import MetricsRegistry

READY = "ready"
NOT_READY = "notready"


@dataclass(frozen=True)
class StatusServerConfig:
    host: str = "0.0.0.0"
    port: int = 0  # 0 picks a free port
    health_path: str = "/health"
    live_path: str = "/live"
    starting_status: str = NOT_READY
    use_endpoint_health: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> StatusServerConfig | None:
        """The server's settings, or None when `DYN_SYSTEM_PORT` is unset or negative (disabled).

        Raises ValueError with one line naming the variable when a value is invalid.
        """
        raw_port = environ.get("DYN_SYSTEM_PORT", "").strip()
        if not raw_port:
            return None
        try:
            port = int(raw_port)
        except ValueError:
            raise ValueError(f"DYN_SYSTEM_PORT={raw_port!r} is not a port number") from None
        if port < 0:  # Dynamo's -1: disabled
            return None
        if port > 65535:
            raise ValueError(f"DYN_SYSTEM_PORT={port} is not a port (0-65535; 0 picks a free one)")
        status = environ.get("DYN_SYSTEM_STARTING_HEALTH_STATUS", NOT_READY).strip().lower()
        if status not in (READY, NOT_READY):
            raise ValueError(f"DYN_SYSTEM_STARTING_HEALTH_STATUS={status!r} must be 'ready' or 'notready'")
        paths = {}
        for var, default in (("DYN_SYSTEM_HEALTH_PATH", "/health"), ("DYN_SYSTEM_LIVE_PATH", "/live")):
            path = environ.get(var, default).strip() or default
            if not path.startswith("/") or path == "/metrics":
                raise ValueError(f"{var}={path!r} must be a path starting with '/' other than /metrics")
            paths[var] = path
        endpoints: tuple[str, ...] = ()
        raw_endpoints = environ.get("DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS", "").strip()
        if raw_endpoints:
            try:
                parsed = json.loads(raw_endpoints)
            except ValueError:
                parsed = None
            if not isinstance(parsed, list) or not all(isinstance(e, str) and e for e in parsed):
                raise ValueError(f"DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS={raw_endpoints!r} must be a JSON list "
                                 'of endpoint names, e.g. ["generate"]')
            endpoints = tuple(parsed)
        return cls(
            host=environ.get("DYN_SYSTEM_HOST", "0.0.0.0").strip() or "0.0.0.0",
            port=port,
            health_path=paths["DYN_SYSTEM_HEALTH_PATH"],
            live_path=paths["DYN_SYSTEM_LIVE_PATH"],
            starting_status=status,
            use_endpoint_health=endpoints,
        )


class HealthState:
    """The system status and each endpoint's status; no I/O, time passed in.

    The worker sets it from its event loop while the server's threads report it: a lock keeps
    a report from reading the endpoints while one is being added.
    """

    def __init__(self, starting_status: str = NOT_READY, use_endpoint_health: tuple[str, ...] = (),
                 started: float = 0.0) -> None:
        self.system = starting_status
        self.use_endpoint_health = use_endpoint_health
        self.endpoints: dict[str, str] = {name: NOT_READY for name in use_endpoint_health}
        self.started = started
        self._lock = threading.Lock()

    def set_ready(self, ready: bool = True) -> None:
        self.system = READY if ready else NOT_READY

    def set_endpoint(self, name: str, ready: bool = True) -> None:
        with self._lock:
            self.endpoints[name] = READY if ready else NOT_READY

    @property
    def ready(self) -> bool:
        if self.use_endpoint_health:
            return all(self.endpoints.get(name) == READY for name in self.use_endpoint_health)
        return self.system == READY

    def report(self, now: float) -> dict:
        """Dynamo's JSON: uptime as a serde Duration, endpoints sorted by name."""
        uptime = max(now - self.started, 0.0)
        secs = int(uptime)
        with self._lock:
            endpoints = dict(sorted(self.endpoints.items()))
            ready = self.ready
        return {
            "endpoints": endpoints,
            "status": READY if ready else NOT_READY,
            "uptime": {"nanos": int(round((uptime - secs) * 1e9)) % 1_000_000_000, "secs": secs},
        }


Response = tuple[str, list[tuple[str, str]], bytes]


class StatusServer:
    """Serves one worker's registry and health on `config.host:config.port` from a thread."""

    def __init__(self, registry: MetricsRegistry, config: StatusServerConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.config = config
        self._clock = clock
        self.health = HealthState(config.starting_status, config.use_endpoint_health, clock())
        self._server: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def respond(self, method: str, path: str, accept: str) -> Response:
        """Status line, headers and body for one request: Dynamo's routes, GET only."""
        if method != "GET":
            return "405 Method Not Allowed", [("Allow", "GET"), *_TEXT], b"405: Method Not Allowed"
        if path == "/metrics":
            body, content_type = self.registry.render(accept)
            return "200 OK", [("Content-Type", content_type)], body
        if path in (self.config.health_path, self.config.live_path):
            report = self.health.report(self._clock())
            status = "200 OK" if report["status"] == READY else "503 Service Unavailable"
            return status, list(_TEXT), json.dumps(report, separators=(",", ":")).encode()
        return "404 Not Found", list(_TEXT), b"Route not found"

    def wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, body = self.respond(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"),
                                             environ.get("HTTP_ACCEPT", ""))
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    async def start(self) -> int:
        """Bind and serve; the port bound (the one picked when the config says 0)."""
        server = _ThreadingServer(self.config.host, self.config.port)
        server.set_app(self.wsgi_app)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="status-server", daemon=True)
        self._thread.start()
        self.port = server.server_port
        return self.port

    async def stop(self) -> None:
        """Stop serving and close the socket; waits (off the event loop) for the serving thread."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join)


_TEXT = (("Content-Type", "text/plain; charset=utf-8"),)


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request: a scraper asks every few seconds, for as long as the worker runs."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadingServer(ThreadingWSGIServer):
    def __init__(self, host: str, port: int) -> None:
        # HTTPServer binds IPv4 unless told otherwise; pick the family the host names (`::` too).
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0][0]
        super().__init__((host, port), _QuietHandler)
