"""Reading Dynamo workers' NATS service stats (pull mode). Pure: no I/O, no clock.

A Dynamo worker runs a NATS micro service named `slugify("{ns}_{component}")` with one
endpoint per served endpoint, named `{endpoint}-{worker_id as lower-case hex}` in a group
named like the service, so its subject is `{service}.{endpoint}-{hex}`. A
`$SRV.STATS.{service}` request is answered by every instance; each endpoint entry of a
reply carries the worker's ForwardPassMetrics in `data`.

Dynamo 1.x (request plane `nats`) answers too, but as a plain NATS micro service: no `data`,
the entry named `{service}-{endpoint}-{hex}`, with the framework's counters (requests,
errors, processing time in nanoseconds). Such an entry becomes an `EndpointCounters`; an
entry without data that is not of that shape is still rejected as `no_data`.

Where Dynamo's aggregator was wrong, this module is stricter:
- the subject must be exactly `{service}.{endpoint}-{hex}` (Dynamo matched the prefix
  `{service}.{endpoint}`, so `generate2-…` was read as `generate`, with a garbage id);
- every endpoint entry is decoded on its own, with its own reject reason (Dynamo zipped
  lists of ids and data by index, so one bad entry shifted other workers' data);
- the hex suffix must be 1-16 hex digits, nothing else (Python's `int(_, 16)` would also
  take `0x`, `_`, signs and spaces).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

import fleet_protocol as protocol
from aggregator.config import ScrapeTarget
from aggregator.rejects import NO_DATA, NO_WORKER_ID
from fleet_protocol import EndpointStatsV1, ForwardPassMetrics, MessageRejected
from fleet_protocol.service_stats import (
    StatsEndpoint,
    decode_endpoint_stats_v1,
    parse_instance_endpoint_name,
    parse_worker_id,
    service_name,
    stats_subject,
)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """What one stats request covers: a service and the endpoints wanted from it (name -> component)."""

    service: str
    endpoints: Mapping[str, str]

    @property
    def subject(self) -> str:
        return stats_subject(self.service)


def plan_services(namespace: str, targets: Iterable[ScrapeTarget]) -> list[ServicePlan]:
    """One stats request per service, however many of its endpoints are wanted.

    Raises ValueError when two different components map to the same service (e.g.
    `Backend` and `backend`): their workers could not be told apart.
    """
    plans: dict[str, dict[str, str]] = {}
    components: dict[str, str] = {}
    for target in targets:
        service = service_name(namespace, target.component)
        other = components.setdefault(service, target.component)
        if other != target.component:
            raise ValueError(f"components {other!r} and {target.component!r} are both NATS service {service!r}")
        plans.setdefault(service, {})[target.endpoint] = target.component
    return [ServicePlan(service, endpoints) for service, endpoints in plans.items()]


class NotWanted(Exception):
    """An endpoint of the service that no scrape target asked for (e.g. `generate2` beside `generate`)."""


def match_subject(subject: str, plan: ServicePlan) -> tuple[str, int]:
    """(endpoint, worker_id) for a subject that is exactly `{service}.{endpoint}-{hex}` of a wanted endpoint.

    Raises NotWanted for other endpoints, MessageRejected(no_worker_id) for a wanted
    endpoint without a worker id suffix.
    """
    prefix = plan.service + "."
    if not subject.startswith(prefix):
        raise NotWanted(subject)
    rest = subject[len(prefix):]
    endpoint, dash, suffix = rest.rpartition("-")
    if dash and endpoint in plan.endpoints:
        worker_id = parse_worker_id(suffix)
        if worker_id is not None:
            return endpoint, worker_id
    if rest in plan.endpoints:
        raise MessageRejected(NO_WORKER_ID, f"static endpoint {subject!r} names no worker")
    raise NotWanted(subject)


@dataclass(frozen=True, slots=True)
class EndpointReading:
    component: str
    endpoint: str
    worker_id: int
    metrics: ForwardPassMetrics
    subject: str


@dataclass(frozen=True, slots=True)
class EndpointCounters:
    """A Dynamo 1.x entry: the worker process's request counters."""

    component: str
    endpoint: str
    worker_id: int
    stats: EndpointStatsV1
    subject: str


@dataclass(frozen=True, slots=True)
class EndpointReject:
    reason: str
    subject: str  # the endpoint's subject, or `endpoints[i]` when the entry has none
    detail: str


@dataclass(slots=True)
class ReplyReading:
    """What one instance's stats reply yields: a reading or a reject per wanted endpoint."""

    readings: list[EndpointReading] = field(default_factory=list)
    counters: list[EndpointCounters] = field(default_factory=list)
    rejects: list[EndpointReject] = field(default_factory=list)
    ignored: int = 0  # endpoints of the service that no target asked for


def read_stats_reply(payload: bytes, plan: ServicePlan, max_bytes: int) -> ReplyReading:
    """Decode one `$SRV.STATS.{service}` reply; raises MessageRejected only if the envelope is unusable."""
    reply = protocol.decode_stats_reply(payload, max_bytes)
    reading = ReplyReading()
    for index, raw in enumerate(reply.endpoints):
        subject = f"endpoints[{index}]"
        try:
            entry = protocol.decode_stats_endpoint(raw)
            subject = entry.subject
            endpoint, worker_id = match_subject(entry.subject, plan)
            data = bytes(entry.data)
            if data == b"null":
                stats = read_counters(raw, entry, plan, endpoint, worker_id)
                component = plan.endpoints[endpoint]
                reading.counters.append(EndpointCounters(component, endpoint, worker_id, stats, subject))
                continue
            metrics = protocol.decode_forward_pass_metrics(data, max_bytes)
        except NotWanted:
            reading.ignored += 1
            continue
        except MessageRejected as error:
            reading.rejects.append(EndpointReject(error.reason, subject, error.detail))
            continue
        component = plan.endpoints[endpoint]
        reading.readings.append(EndpointReading(component, endpoint, worker_id, metrics, subject))
    return reading


def read_counters(raw: msgspec.Raw, entry: StatsEndpoint, plan: ServicePlan, endpoint: str, worker_id: int
                  ) -> EndpointStatsV1:
    """The counters of an entry without data, if it is a Dynamo 1.x one (named for the same endpoint and
    worker as its subject); else MessageRejected(no_data), as for a 0.x worker without a stats handler."""
    if parse_instance_endpoint_name(entry.name or "", plan.service) != (endpoint, worker_id):
        raise MessageRejected(NO_DATA, "endpoint has no stats data")
    return decode_endpoint_stats_v1(raw)
