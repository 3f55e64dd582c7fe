"""From a NATS message to the fleet state: decode, validate, apply, count.

No NATS here: the transport hands over (subject, payload), so the whole path from bytes
to state is tested and benchmarked without a server. A bad message is counted by
reason, logged (rate-limited, with its subject) and dropped; it never raises out of
`handle` and never touches another worker's state, because a message is fully decoded
and checked before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

import fleet_protocol as protocol
from aggregator.collectors.telemetry import Telemetry
from aggregator.state.fleet import Fleet, LimitExceeded
from fleet_runtime.logs import LogLimiter

log = structlog.get_logger("aggregator.ingest")


@dataclass(frozen=True, slots=True)
class Route:
    kind: str
    # Applies a payload to the fleet: (fleet, component, payload, now); raises on bad input. It may
    # return (reason, detail) pairs for parts it dropped while using the rest (component metrics).
    apply: Callable[[Fleet, str, bytes, float], list[tuple[str, str]] | None]
    component: str | None  # fixed component for namespace-level subjects, else from the subject


class Ingest:
    def __init__(
        self,
        fleet: Fleet,
        telemetry: Telemetry,
        *,
        namespace: str,
        default_component: str,
        max_message_bytes: int,
        clock=time.monotonic,
        limiter: LogLimiter | None = None,
    ) -> None:
        self.fleet = fleet
        self.telemetry = telemetry
        self.namespace = namespace
        self.default_component = default_component
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._limiter = limiter or LogLimiter()
        self._components: dict[str, str | None] = {}
        limit = max_message_bytes

        def apply_load(fleet: Fleet, component: str, payload: bytes, now: float) -> None:
            fleet.observe_load(component, protocol.decode_load_event(payload, limit), now)

        def apply_hit_rate(fleet: Fleet, component: str, payload: bytes, now: float) -> None:
            fleet.observe_hit_rate(component, protocol.decode_hit_rate_event(payload, limit), now)

        def apply_gpu(fleet: Fleet, component: str, payload: bytes, now: float) -> None:
            fleet.observe_gpu(component, protocol.decode_gpu_metrics(payload, limit), now)

        self.routes: dict[str, Route] = {}
        for event, kind, apply in (
            (protocol.KV_METRICS, "kv_metrics", apply_load),
            (protocol.KV_HIT_RATE, "kv_hit_rate", apply_hit_rate),
            (protocol.GPU_METRICS, "gpu_metrics", apply_gpu),
        ):
            self.add_route(event, kind, apply)

    def add_route(self, event: str, kind: str, apply: Callable[[Fleet, str, bytes, float], object]) -> None:
        """Route `namespace.{ns}.{event}` and `namespace.{ns}.component.*.{event}` to `apply`."""
        ns = self.namespace
        self.routes[protocol.namespace_subject(ns, event)] = Route(kind, apply, self.default_component)
        self.routes[protocol.component_subject(ns, "*", event)] = Route(kind, apply, None)

    def handle(self, pattern: str, subject: str, payload: bytes) -> bool:
        """Apply one message received on a subscription to `pattern`; True if it was used."""
        route = self.routes[pattern]
        telemetry = self.telemetry
        telemetry.received[route.kind].value += 1
        component = route.component or self._component_of(subject)
        try:
            if component is None:  # cannot happen for a subject matching the pattern
                raise protocol.MessageRejected(protocol.WRONG_TYPE, "subject has no component")
            problems = route.apply(self.fleet, component, payload, self._clock())
        except protocol.MessageRejected as error:
            self._reject(route.kind, error.reason, subject, error.detail)
            return False
        except LimitExceeded as error:
            self._reject(route.kind, error.reason, subject, "cardinality limit reached; new worker refused")
            return False
        telemetry.accepted[route.kind].value += 1
        for reason, detail in problems or ():
            self._reject(route.kind, reason, subject, detail)
        return True

    def _component_of(self, subject: str) -> str | None:
        # A fleet has few subjects: remember each one's component instead of splitting every time.
        component = self._components.get(subject)
        if component is None:
            component = protocol.component_of(subject)
            if len(self._components) < 100_000:
                self._components[subject] = component
        return component

    def _reject(self, kind: str, reason: str, subject: str, detail: str) -> None:
        self.telemetry.reject(kind, reason)
        suppressed = self._limiter.allow((kind, reason, subject))
        if suppressed is not None:
            log.warning("message rejected", subject=subject, kind=kind, reason=reason,
                        detail=detail[:300], suppressed_since_last=suppressed)
