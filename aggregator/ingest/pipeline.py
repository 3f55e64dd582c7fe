"""The one way into the fleet state: every source hands over what it decoded, or why it could not.

Sources are edges (core NATS, pull mode, the JetStream journal, Dynamo's discovery store);
each owns its transport and nothing else. What follows is the same for all
and happens here: apply to the fleet with a fleet method, count (per source and kind:
received, accepted, rejected by reason; state/ingest_counts.py), and log a reject with its
subject, rate-limited (the `rate_limit` key, see fleet_runtime.logs.RateLimit), and keep the
subject's counts and last few rejected payloads (state/subject_activity.py, for the status
page). Bad input
never raises out of here and never touches another worker's state: an item is fully decoded
and checked before the fleet method runs.

Two ways in, both made by `Ingest`:
- a `SubjectFeed` takes raw messages on subjects: the subject's route decodes the payload and
  names the fleet method that applies it (`Ingest.add_decoder`). Push is `Ingest.handle`.
- a `Feed` takes items a source decoded itself (`take`), or why it could not (`reject`).

A new source is a decoder, a fleet method and a feed: for example
`ingest.add_decoder(EVENT, "kind", protocol.decode_x, Fleet.observe_x)` then
`ingest.subject_feed("zmq").handle_subject(topic, payload)`.

Dynamo 1.x's event plane has routes of its own (`add_event_topic`), on
`namespace.{ns}.component.*.endpoint.*.{topic}`: the subject's tokens, percent-decoded, are
the component and endpoint labels; the payload is an `EventEnvelope` (MessagePack) whose
`publisher_id` and `sequence` are tracked for lost events and publisher starts
(state/event_publishers.py) before the topic's own payload inside it is decoded and applied
with `observe(fleet, component, endpoint, publisher_id, item, now)`.

No I/O here: the whole path from bytes to state is tested and benchmarked without a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NamedTuple

import msgspec
import structlog

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.state.event_publishers import EventPublishers, StreamCounts, StreamKey
from aggregator.state.fleet import Fleet, LimitExceeded
from aggregator.state.ingest_counts import IngestCounts, KindCounts, Outcomes, Tally
from aggregator.state.subject_activity import SubjectActivity, SubjectTally

log = structlog.get_logger("aggregator.ingest")

# Sources: the `source` of a feed, in its log lines and its counts.
NATS = "nats"  # core NATS subscriptions (push)
ZMQ = "zmq"  # Dynamo 1.x's ZMQ event plane (aggregator/edges/zmq_event_plane.py)
JOURNAL = "journal"  # the JetStream hit-rate stream
PULL = "pull"  # replies to $SRV.STATS requests

# Kinds: the `kind` label of llm_aggregator_messages_*.
LOAD = "kv_metrics"
HIT_RATE = "kv_hit_rate"
GPU = "gpu_metrics"
COMPONENT_METRICS = "component_metrics"
# Dynamo 1.x's event plane (`kv_metrics` is the legacy JSON kind, so its 1.x topic is named for its payload).
ACTIVE_LOAD = "active_load"
FORWARD_PASS = "forward_pass_metrics"
KV_EVENTS = "kv_events"
SERVICE_STATS = "service_stats"  # a 1.x `$SRV.STATS` entry: request counters, no load

# What every kind can be rejected for: a bad payload, or a new worker past a limit.
BASE_REASONS = (*rejects.WIRE, *rejects.WORKER_LIMITS)
EVENT_REASONS = (*BASE_REASONS, *rejects.EVENT_WIRE, *rejects.EVENT_STREAM)

Decode = Callable[[bytes, int], Any]  # (payload, max_bytes) -> item; raises MessageRejected
# (fleet, component, item, now): a Fleet method; raises MessageRejected or LimitExceeded.
Observe = Callable[[Fleet, str, Any, float], Any]
# (fleet, component, payload, now): decodes and applies; returns the (reason, detail) of parts it dropped.
Apply = Callable[[Fleet, str, bytes, float], "list[tuple[str, str]] | None"]
# (fleet, component, endpoint, publisher_id, item, now): a Fleet method for an event-plane payload.
EventObserve = Callable[[Fleet, str, str, int, Any, float], Any]

_LIMIT_DETAIL = "cardinality limit reached; new worker refused"


# A fleet has few subjects, so each one's component, route and names are remembered rather than
# worked out for every message; up to this many subjects of up to this length. Hostile subjects
# are many and long: 2,000 of 1 KB a round kept 4 MB each time, up to 200 MB with 100,000 of
# them. A longer subject (its names past the label limit, so rejected anyway) is worked out again.
MAX_CACHED_SUBJECTS: Final = 10_000
MAX_CACHED_SUBJECT_CHARS: Final = 512


def cacheable_subject(cache: dict, subject: str) -> bool:
    """Whether `subject` may join `cache` (the shard filter's too)."""
    return len(cache) < MAX_CACHED_SUBJECTS and len(subject) <= MAX_CACHED_SUBJECT_CHARS


def _detail(error: protocol.MessageRejected | LimitExceeded) -> str:
    return error.detail if isinstance(error, protocol.MessageRejected) else _LIMIT_DETAIL


def _payload(payload: bytes, max_bytes: int) -> bytes:
    return payload


def _shown(item: object) -> bytes:
    """What the status page shows of an item a source decoded itself and the fleet refused."""
    if not isinstance(item, msgspec.Struct):
        return b""  # not a wire type: the page shows the reason and detail only
    return protocol.encode(item)


@dataclass(frozen=True, slots=True)
class _RouteSpec:
    kind: str
    decode: Decode
    observe: Observe | EventObserve
    component: str | None  # fixed component for namespace-level subjects, else from the subject
    partial: bool  # observe returns the (reason, detail) of parts it dropped while using the rest
    reasons: tuple[str, ...]
    topic: str | None = None  # an event-plane topic: the payload is an envelope, observe an EventObserve


@dataclass(frozen=True, slots=True)
class Route:
    """A subject pattern's route, as one feed uses it (with that feed's counts)."""

    kind: str
    decode: Decode
    observe: Callable[..., Any]  # an Observe, or an EventObserve where `topic` is set
    component: str | None
    partial: bool
    max_bytes: int
    names_source: bool  # observe is Fleet.observe_load: the worker's `source` is the one of its load reports
    counts: KindCounts
    received: Tally  # counts.received and counts.accepted, one lookup closer for the hot path
    accepted: Tally
    topic: str | None = None


class _EventScope(NamedTuple):
    """What an event-plane subject says: its decoded component and endpoint, its stream's counts."""

    component: str
    endpoint: str
    counts: StreamCounts | None


class Feed:
    """One source's way in for items it decoded itself. Counted where `outcomes(kind)` says."""

    def __init__(self, ingest: Ingest, source: str, outcomes: Callable[[str], Outcomes],
                 log_fields: dict[str, str] | None = None) -> None:
        self.ingest = ingest
        self.source = source
        self._outcomes_of = outcomes
        self._outcomes: dict[str, Outcomes] = {}
        self._log_fields = log_fields or {}
        self._key = (source, *self._log_fields.values())  # what tells its log lines from another feed's
        self.subjects = ingest.subjects.of(source)

    def outcomes(self, kind: str) -> Outcomes:
        outcomes = self._outcomes.get(kind)
        if outcomes is None:
            outcomes = self._outcomes[kind] = self._outcomes_of(kind)
        return outcomes

    def take(self, kind: str, subject: str, observe: Observe, component: str, item: object) -> bool:
        """Apply a decoded `item` with `observe` (a Fleet method); True if it was used."""
        outcomes = self.outcomes(kind)
        outcomes.received.inc()
        now = self.ingest.clock()
        tally = self.subjects.of(subject, kind, component, now)
        tally.received += 1
        tally.last_seen = now
        try:
            result = observe(self.ingest.fleet, component, item, now)
        except (protocol.MessageRejected, LimitExceeded) as error:
            self._rejected(outcomes, kind, error.reason, subject, _detail(error), tally, _shown(item), now)
            return False
        outcomes.accepted.inc()
        tally.accepted += 1
        if observe is Fleet.observe_load:
            result.source = self.source
        return True

    def reject(self, kind: str, subject: str, reason: str, detail: str, payload: bytes = b"") -> None:
        """An item of `kind` that arrived on `subject` (in `payload`) but could not be decoded, for `reason`."""
        outcomes = self.outcomes(kind)
        outcomes.received.inc()
        now = self.ingest.clock()
        tally = self.subjects.of(subject, kind, None, now)
        tally.received += 1
        tally.last_seen = now
        self._rejected(outcomes, kind, reason, subject, detail, tally, payload, now)

    def _rejected(self, outcomes: Outcomes, kind: str, reason: str, subject: str, detail: str,
                  tally: SubjectTally, payload: bytes, now: float) -> None:
        outcomes.reject(reason)
        tally.reject(reason, detail, payload, now)
        # The subject's hash in the key: the limiter remembers up to 10,000 keys, and hostile subjects are long.
        log.warning("message rejected", source=self.source, **self._log_fields, subject=subject, kind=kind,
                    reason=reason, detail=detail[:300], rate_limit=(self._key, kind, reason, hash(subject)))


class SubjectFeed(Feed):
    """One source's way in for raw messages on subjects, decoded by the routes of `Ingest`."""

    def __init__(self, ingest: Ingest, source: str) -> None:
        super().__init__(ingest, source, partial(ingest.counts.of, source))
        self.routes: dict[str, Route] = {}
        self._fleet = ingest.fleet
        self._clock = ingest.clock
        self._namespace = ingest.namespace
        self._tallies = self.subjects.tallies  # one lookup closer for the hot path
        self._components: dict[str, str | None] = {}
        self._patterns: dict[str, str | None] = {}
        self._scopes: dict[str, _EventScope] = {}
        self._publishers = ingest.event_publishers
        # Count what a publisher sent before its first message here (ZMQ: PUB/SUB drops it).
        self.count_unseen = False

    def _add(self, pattern: str, spec: _RouteSpec) -> None:
        counts = self.ingest.counts.of(self.source, spec.kind, spec.reasons)
        self._outcomes[spec.kind] = counts
        self.routes[pattern] = Route(spec.kind, spec.decode, spec.observe, spec.component, spec.partial,
                                     self.ingest.max_message_bytes,
                                     spec.observe in (Fleet.observe_load, Fleet.observe_active_load),
                                     counts, counts.received, counts.accepted, spec.topic)

    def handle(self, pattern: str, subject: str, payload: bytes) -> bool:
        """Apply one message received on a subscription to `pattern`; True if it was used."""
        route = self.routes[pattern]
        if route.topic is not None:
            return self._handle_event(route, subject, payload)
        route.received.value += 1
        now = self._clock()
        tally = self._tallies.get(subject)
        if tally is None:
            tally = self.subjects.of(subject, route.kind, route.component or self._component_of(subject), now)
        tally.received += 1
        tally.last_seen = now
        component = tally.component or route.component or self._component_of(subject)
        try:
            if component is None:  # cannot happen for a subject matching the pattern
                raise protocol.MessageRejected(protocol.WRONG_TYPE, "subject has no component")
            result = route.observe(self._fleet, component, route.decode(payload, route.max_bytes), now)
        except (protocol.MessageRejected, LimitExceeded) as error:
            self._rejected(route.counts, route.kind, error.reason, subject, _detail(error), tally, payload, now)
            return False
        return self._accepted(route, result, subject, tally, payload, now)

    def _handle_event(self, route: Route, subject: str, payload: bytes,
                      envelope: protocol.EventEnvelope | None = None) -> bool:
        """`handle` for an event-plane route: the envelope (decoded from `payload` unless given), its
        publisher's sequence, then the payload inside it."""
        route.received.value += 1
        now = self._clock()
        tally = self._tallies.get(subject)
        if tally is None:
            tally = self.subjects.of(subject, route.kind, None, now)
        tally.received += 1
        tally.last_seen = now
        try:
            scope = self._scopes.get(subject)
            if scope is None:
                scope = self._event_scope(subject, route.topic)
            if envelope is None:
                envelope = protocol.decode_envelope(payload, route.max_bytes)
            if envelope.topic != route.topic:
                raise protocol.MessageRejected(protocol.INCONSISTENT, f"envelope of topic {envelope.topic[:64]!r} "
                                                                      f"on a {route.topic} subject")
            if not self._publishers.observe(scope.counts, envelope.publisher_id, envelope.sequence,
                                            self.count_unseen):
                raise protocol.MessageRejected(rejects.DUPLICATE, f"publisher {envelope.publisher_id:x} sequence "
                                                                  f"{envelope.sequence} seen before")
            result = route.observe(self._fleet, scope.component, scope.endpoint, envelope.publisher_id,
                                   route.decode(envelope.payload, route.max_bytes), now)
        except (protocol.MessageRejected, LimitExceeded) as error:
            self._rejected(route.counts, route.kind, error.reason, subject, _detail(error), tally, payload, now)
            return False
        return self._accepted(route, result, subject, tally, payload, now)

    def _accepted(self, route: Route, result: Any, subject: str, tally: SubjectTally, payload: bytes,
                  now: float) -> bool:
        route.accepted.value += 1
        tally.accepted += 1
        if route.names_source:
            result.source = self.source
        elif route.partial:
            # Parts dropped while the rest was used: the message counts as accepted, each part as a reject.
            for reason, detail in result or ():
                self._rejected(route.counts, route.kind, reason, subject, detail, tally, payload, now)
        return True

    def handle_envelope(self, subject: str, envelope: protocol.EventEnvelope, shown: bytes = b"") -> bool:
        """An envelope a source decoded itself (ZMQ's framing), as if received on the event-plane `subject`
        (`namespace.{ns}.component.{c}.endpoint.{e}.{topic}`); `shown`: its bytes, for the status page."""
        pattern = self.pattern_of(subject)
        route = self.routes.get(pattern) if pattern is not None else None
        if route is None or route.topic is None:
            log.warning("message on a subject no route takes", source=self.source, subject=subject[:256],
                        rate_limit=(self._key, "unrouted", hash(subject)))
            return False
        return self._handle_event(route, subject, shown, envelope)

    def event_kind(self, topic: str) -> str | None:
        """The kind an event-plane `topic`'s messages are counted under; None for a topic no route takes."""
        route = self.routes.get(protocol.event_subject_pattern(self._namespace, topic))
        return route.kind if route is not None and route.topic is not None else None

    def _event_scope(self, subject: str, topic: str | None) -> _EventScope:
        names = protocol.parse_event_subject(subject)  # raises MessageRejected for a token not percent-encoded
        if names.endpoint is None or names.topic != topic or names.namespace != self.ingest.namespace:
            raise protocol.MessageRejected(protocol.WRONG_TYPE, f"subject {subject[:256]!r} is not an endpoint's "
                                                                f"{topic} in namespace {self.ingest.namespace!r}")
        scope = _EventScope(names.component, names.endpoint,
                            self._publishers.counts(StreamKey(names.component, names.endpoint, names.topic)))
        if cacheable_subject(self._scopes, subject):
            self._scopes[subject] = scope
        return scope

    def handle_subject(self, subject: str, payload: bytes) -> bool:
        """`handle` for a source that knows the subject only (no subscription pattern)."""
        pattern = self.pattern_of(subject)
        if pattern is None:
            log.warning("message on a subject no route takes", source=self.source, subject=subject,
                        rate_limit=(self._key, "unrouted", hash(subject)))
            return False
        return self.handle(pattern, subject, payload)

    def pattern_of(self, subject: str) -> str | None:
        """The route pattern `subject` matches exactly: itself, or its component token as `*`."""
        pattern = self._patterns.get(subject, "")
        if pattern != "":
            return pattern
        route = self.routes.get(subject)
        if route is not None and route.component is not None:  # a namespace-level subject
            pattern = subject
        else:
            parts = subject.split(".")
            pattern = None
            candidate = None
            if len(parts) == 5 and parts[:3] == ["namespace", self._namespace, "component"]:
                candidate = protocol.component_subject(self._namespace, "*", parts[4])
            elif (len(parts) == 7 and parts[0] == "namespace" and parts[2] == "component" and parts[4] == "endpoint"
                  and parts[1] == protocol.encode_event_segment(self._namespace)):
                candidate = f"namespace.{parts[1]}.component.*.endpoint.*.{parts[6]}"
            if candidate is not None and candidate in self.routes:
                pattern = candidate
        if cacheable_subject(self._patterns, subject):
            self._patterns[subject] = pattern
        return pattern

    def _component_of(self, subject: str) -> str | None:
        component = self._components.get(subject)
        if component is None:
            component = protocol.component_of(subject)
            if cacheable_subject(self._components, subject):
                self._components[subject] = component
        return component


class Ingest:
    """The routes from subjects to fleet methods, and the feeds that use them."""

    def __init__(
        self,
        fleet: Fleet,
        counts: IngestCounts,
        *,
        namespace: str,
        default_component: str,
        max_message_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        subjects: SubjectActivity | None = None,
    ) -> None:
        self.fleet = fleet
        self.counts = counts
        self.subjects = subjects if subjects is not None else SubjectActivity()
        self.namespace = namespace
        self.default_component = default_component
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        # One per aggregator, whatever feed an envelope comes through (NATS now, ZMQ later).
        self.event_publishers = EventPublishers(max_streams=3 * fleet.max_groups)
        self._specs: dict[str, _RouteSpec] = {}
        self._feeds: list[SubjectFeed] = []
        self.push = self.subject_feed(NATS)
        self.handle = self.push.handle  # the hot path, bound once
        for event, kind, decode, observe in (
            (protocol.KV_METRICS, LOAD, protocol.decode_load_event, Fleet.observe_load),
            (protocol.KV_HIT_RATE, HIT_RATE, protocol.decode_hit_rate_event, Fleet.observe_hit_rate),
            (protocol.GPU_METRICS, GPU, protocol.decode_gpu_metrics, Fleet.observe_gpu),
        ):
            self.add_decoder(event, kind, decode, observe)
        self.add_event_topic(protocol.KV_METRICS_TOPIC, ACTIVE_LOAD, protocol.decode_active_load,
                             Fleet.observe_active_load)
        self.add_event_topic(protocol.FORWARD_PASS_METRICS_TOPIC, FORWARD_PASS, protocol.decode_forward_pass_v1,
                             Fleet.observe_forward_pass)
        self.add_event_topic(protocol.KV_EVENTS_TOPIC, KV_EVENTS, protocol.decode_kv_events, Fleet.observe_kv_events,
                             partial=True)

    @property
    def routes(self) -> dict[str, Route]:
        """The push feed's routes: the patterns to subscribe to."""
        return self.push.routes

    def add_decoder(self, event: str, kind: str, decode: Decode, observe: Observe, *,
                    reasons: Iterable[str] = ()) -> None:
        """Route `event`'s subjects to `observe(fleet, component, decode(payload, max_message_bytes), now)`.

        Subjects: `namespace.{ns}.{event}` (component: the default one) and
        `namespace.{ns}.component.*.{event}`. `reasons`: rejects beyond BASE_REASONS, counted from 0.
        """
        self._add(event, _RouteSpec(kind, decode, observe, None, False, (*BASE_REASONS, *reasons)))

    def add_route(self, event: str, kind: str, apply: Apply, *, reasons: Iterable[str] = ()) -> None:
        """Route `event`'s subjects to `apply(fleet, component, payload, now)`, which decodes and applies
        in one, and returns the (reason, detail) of parts it dropped while using the rest."""
        self._add(event, _RouteSpec(kind, _payload, apply, None, True, (*BASE_REASONS, *reasons)))

    def add_event_topic(self, topic: str, kind: str, decode: Decode, observe: EventObserve, *, partial: bool = False,
                        reasons: Iterable[str] = ()) -> None:
        """Route Dynamo 1.x's `namespace.{ns}.component.*.endpoint.*.{topic}` to
        `observe(fleet, component, endpoint, publisher_id, decode(envelope.payload, max_message_bytes), now)`.

        `partial`: observe returns the (reason, detail) of parts it dropped while using the rest.
        `reasons`: rejects beyond EVENT_REASONS, counted from 0.
        """
        pattern = protocol.event_subject_pattern(self.namespace, topic)
        self._register(pattern, _RouteSpec(kind, decode, observe, None, partial, (*EVENT_REASONS, *reasons), topic))

    def _add(self, event: str, spec: _RouteSpec) -> None:
        ns = self.namespace
        for pattern, component in ((protocol.namespace_subject(ns, event), self.default_component),
                                   (protocol.component_subject(ns, "*", event), None)):
            self._register(pattern, _RouteSpec(spec.kind, spec.decode, spec.observe, component, spec.partial,
                                               spec.reasons))

    def _register(self, pattern: str, spec: _RouteSpec) -> None:
        self._specs[pattern] = spec
        for feed in self._feeds:
            feed._add(pattern, spec)

    def subject_feed(self, source: str) -> SubjectFeed:
        """A way in for raw messages on subjects, counted as `source`'s."""
        feed = SubjectFeed(self, source)
        for pattern, spec in self._specs.items():
            feed._add(pattern, spec)
        self._feeds.append(feed)
        return feed

    def feed(self, source: str, outcomes: Outcomes | None = None, **log_fields: str) -> Feed:
        """A way in for items `source` decodes itself; counted in `outcomes` (whatever their kind),
        else in the ingest counts. `log_fields` go into its reject lines."""
        if outcomes is None:
            return Feed(self, source, partial(self.counts.of, source, reasons=BASE_REASONS), log_fields)
        fixed = outcomes
        return Feed(self, source, lambda kind: fixed, log_fields)
