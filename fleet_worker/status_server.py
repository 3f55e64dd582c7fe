"""A worker's own status server, as Dynamo's system status server: /metrics, health, live.

Enabled by `DYN_SYSTEM_PORT` (bound on `DYN_SYSTEM_HOST`, default 0.0.0.0):

- `GET /metrics`: the worker's MetricsRegistry, text 0.0.4 or OpenMetrics by `Accept`.
- `GET {DYN_SYSTEM_HEALTH_PATH}` (default `/health`) and `GET {DYN_SYSTEM_LIVE_PATH}`
  (default `/live`): Dynamo's health JSON, 200 when ready, 503 when not.
- anything else: 404 `Route not found` (so `/health` is 404 once a custom path replaces it).

The starting status is `DYN_SYSTEM_STARTING_HEALTH_STATUS` (`ready` | `notready`, default
`notready`); the worker flips it with `health.set_ready()` once it serves. With
`DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS='["generate"]'` the status is instead "all listed
endpoints ready".
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

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
    def from_env(cls, environ: Mapping[str, str]) -> "StatusServerConfig | None":
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
    """The system status and each endpoint's status; no I/O, time passed in."""

    def __init__(self, starting_status: str = NOT_READY, use_endpoint_health: tuple[str, ...] = (),
                 started: float = 0.0) -> None:
        self.system = starting_status
        self.use_endpoint_health = use_endpoint_health
        self.endpoints: dict[str, str] = {name: NOT_READY for name in use_endpoint_health}
        self.started = started

    def set_ready(self, ready: bool = True) -> None:
        self.system = READY if ready else NOT_READY

    def set_endpoint(self, name: str, ready: bool = True) -> None:
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
        return {
            "endpoints": dict(sorted(self.endpoints.items())),
            "status": READY if self.ready else NOT_READY,
            "uptime": {"nanos": int(round((uptime - secs) * 1e9)) % 1_000_000_000, "secs": secs},
        }


class StatusServer:
    def __init__(self, registry: MetricsRegistry, config: StatusServerConfig, *, clock=time.monotonic) -> None:
        self.registry = registry
        self.config = config
        self._clock = clock
        self.health = HealthState(config.starting_status, config.use_endpoint_health, clock())
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        async def route(request: web.Request) -> web.Response:
            path = request.path
            if path == "/metrics":
                body, content_type = self.registry.render(request.headers.get("Accept", ""))
                return web.Response(body=body, headers={"Content-Type": content_type})
            if path in (self.config.health_path, self.config.live_path):
                report = self.health.report(self._clock())
                status = 200 if report["status"] == READY else 503
                return web.Response(text=json.dumps(report, separators=(",", ":")), status=status,
                                    content_type="text/plain")
            return web.Response(text="Route not found", status=404, content_type="text/plain")

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", route)
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # aiohttp has no public accessor
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
