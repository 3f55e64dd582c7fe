"""The status documents (exposition/status_api.py) read from the fleet state and the ingest counts.

Runs on the status page's render thread, like /metrics' collectors: it reads snapshots
(`list(...)`) of what the event loop keeps changing. Only the requested page of workers is
turned into documents; the rest of the fleet is filtered and sorted by plain keys, so a page of
a 100,000-worker fleet costs one pass over it plus a sort (docs/status-page.md has the figures).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter

from aggregator import rejects
from aggregator.exposition import status_api as api
from aggregator.state.fleet import Fleet, WorkerKey, WorkerState
from aggregator.state.fleet_stats import hit_rate_percent, load_mean_std
from aggregator.state.ingest_counts import IngestCounts
from aggregator.state.subject_activity import SubjectActivity, SubjectTally

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
ORDERS = ("asc", "desc")
MAX_QUERY_CHARS = 256


def _usage(state: WorkerState) -> float | None:
    load = state.load
    if load is None or not load.kv_stats.kv_total_blocks:
        return None
    return load.kv_stats.kv_active_blocks / load.kv_stats.kv_total_blocks


def _hit_rate(state: WorkerState) -> float | None:
    return hit_rate_percent(state.overlap_blocks, state.isl_blocks)


def _gpus(state: WorkerState) -> int:
    return len(state.gpu.gpus) if state.gpu is not None else 0


@dataclass(frozen=True, slots=True)
class SortKey:
    value: Callable[[WorkerState], object]  # None: no value (sorts last, whatever the order)
    of_load: bool = False  # a field of the load report: workers without one have no value


# The workers table's orders. Every one breaks ties by "key", the worker's identity (component,
# endpoint, worker_id, dp_rank): rows stay put from one refresh to the next. Getters of plain
# attributes are attrgetters, so a sort of 100,000 workers runs at C speed.
SORT_KEYS: dict[str, SortKey] = {
    "key": SortKey(attrgetter("key")),
    "component": SortKey(attrgetter("key.component")),
    "endpoint": SortKey(attrgetter("key.endpoint")),
    "worker_id": SortKey(attrgetter("key.worker_id")),
    "dp_rank": SortKey(attrgetter("key.dp_rank")),
    "source": SortKey(attrgetter("source")),
    "last_seen": SortKey(attrgetter("last_seen")),
    "kv_usage": SortKey(_usage, of_load=True),
    "kv_blocks_active": SortKey(attrgetter("load.kv_stats.kv_active_blocks"), of_load=True),
    "kv_blocks_total": SortKey(attrgetter("load.kv_stats.kv_total_blocks"), of_load=True),
    "slots_active": SortKey(attrgetter("load.worker_stats.request_active_slots"), of_load=True),
    "requests_waiting": SortKey(attrgetter("load.worker_stats.num_requests_waiting"), of_load=True),
    "hit_rate": SortKey(_hit_rate),
    "gpus": SortKey(_gpus),
}


class BadQuery(ValueError):
    """A query parameter that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class WorkersQuery:
    component: str | None = None
    endpoint: str | None = None
    source: str | None = None
    q: str | None = None
    sort: str = "key"
    order: str = "asc"
    page: int = 1
    page_size: int = DEFAULT_PAGE_SIZE

    @property
    def filters(self) -> api.WorkerFilters:
        return api.WorkerFilters(component=self.component, endpoint=self.endpoint, source=self.source, q=self.q)


WORKERS_PARAMETERS = ("component", "endpoint", "source", "q", "sort", "order", "page", "page_size")


def parse_workers_query(pairs: Iterable[tuple[str, str]]) -> WorkersQuery:
    """The workers query from a URL's parameters; raises BadQuery with a message a person can act on."""
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in WORKERS_PARAMETERS:
            raise BadQuery(f"unknown parameter {name!r}; known: {', '.join(WORKERS_PARAMETERS)}")
        if name in values:
            raise BadQuery(f"parameter {name!r} given more than once")
        if len(value) > MAX_QUERY_CHARS:
            raise BadQuery(f"parameter {name!r} is longer than {MAX_QUERY_CHARS} characters")
        values[name] = value
    sort = values.get("sort", "key")
    if sort not in SORT_KEYS:
        raise BadQuery(f"sort must be one of {', '.join(SORT_KEYS)}; got {sort!r}")
    order = values.get("order", "asc")
    if order not in ORDERS:
        raise BadQuery(f"order must be asc or desc; got {order!r}")
    page = _integer(values, "page", 1, 1, None)
    page_size = _integer(values, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    return WorkersQuery(component=values.get("component") or None, endpoint=values.get("endpoint") or None,
                        source=values.get("source") or None, q=values.get("q") or None, sort=sort, order=order,
                        page=page, page_size=page_size)


def _integer(values: dict[str, str], name: str, default: int, low: int, high: int | None) -> int:
    text = values.get(name)
    if text is None or text == "":
        return default
    bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise BadQuery(f"{name} must be an integer {bound}; got {text!r}")
    number = int(text)
    if number < low or (high is not None and number > high):
        raise BadQuery(f"{name} must be an integer {bound}; got {number}")
    return number


def parse_no_query(pairs: Iterable[tuple[str, str]]) -> None:
    for name, _ in pairs:
        raise BadQuery(f"unknown parameter {name!r}; this endpoint takes none")


def _payload_text(payload: bytes) -> str:
    return payload.decode("utf-8", "backslashreplace")


class StatusView:
    """Builds the status documents; every method may run on a thread other than the event loop's."""

    def __init__(
        self,
        fleet: Fleet,
        counts: IngestCounts,
        subjects: SubjectActivity,
        *,
        nats: Callable[[], api.NatsConnection],
        publishers: Callable[[], list[api.Publisher]] = list,
        discovery: Callable[[], dict[str, object] | None] = lambda: None,
        started: float | None = None,
        monotonic_clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.counts = counts
        self.subjects = subjects
        self._nats = nats
        self._publishers = publishers
        self._discovery = discovery
        self._monotonic = monotonic_clock
        self._wall = wall_clock
        self.started = monotonic_clock() if started is None else started
        self.order = KeyOrder(fleet)
        fleet.add_listener(self.order)

    def _clocks(self) -> tuple[float, float]:
        """(now on the monotonic clock, offset from it to Unix time)."""
        now, wall = self._monotonic(), self._wall()
        return now, wall - now

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> api.Summary:
        now, offset = self._clocks()
        fleet = self.fleet
        fresh_after = now - fleet.stale_after
        # One pass over the workers, per component endpoint: live workers, the loads for mean and
        # std (fleet_stats, as /metrics' llm_load_avg/std), KV blocks and fresh GPUs.
        groups_seen = list(fleet.groups.items())
        per_group: dict[tuple[str, ...], _GroupSums] = {}  # by (component, endpoint)
        for key, state in list(fleet.workers.items()):
            sums = per_group.get(key[:2])
            if sums is None:
                sums = per_group[key[:2]] = _GroupSums()
            sums.workers += 1
            load = state.load
            if load is not None:
                kv = load.kv_stats
                sums.loads.append(float(kv.kv_active_blocks))
                sums.active += kv.kv_active_blocks
                sums.total += kv.kv_total_blocks
            gpu = state.gpu
            if gpu is not None and state.gpu_seen >= fresh_after:
                sums.gpus += len(gpu.gpus)
        groups = []
        isl = overlap = 0
        for group, totals in groups_seen:
            sums = per_group.get(group, _NO_WORKERS)
            isl += totals.isl_blocks
            overlap += totals.overlap_blocks
            mean_std = load_mean_std(sums.loads)
            groups.append(api.GroupSummary(
                component=group.component, endpoint=group.endpoint, workers=sums.workers, expired=totals.expired,
                load_avg=mean_std[0] if mean_std else None, load_std=mean_std[1] if mean_std else None,
                kv_blocks_active=sums.active, kv_blocks_total=sums.total,
                kv_usage_percent=_percent(sums.active, sums.total),
                hit_rate_percent=hit_rate_percent(totals.overlap_blocks, totals.isl_blocks), gpus=sums.gpus))
        groups.sort(key=lambda g: (g.component, g.endpoint))
        active = sum(g.kv_blocks_active for g in groups)
        total = sum(g.kv_blocks_total for g in groups)
        received = accepted = rejected = 0
        for kind in self.counts.all():
            received += kind.received.value
            accepted += kind.accepted.value
            rejected += sum(tally.value for tally in list(kind.rejected.values()))
        return api.Summary(
            generated_at=now + offset, uptime_seconds=now - self.started, workers=sum(g.workers for g in groups),
            max_workers=fleet.max_workers, stale_after_seconds=fleet.stale_after, kv_blocks_active=active,
            kv_blocks_total=total, kv_usage_percent=_percent(active, total),
            hit_rate_percent=hit_rate_percent(overlap, isl), gpus=sum(g.gpus for g in groups),
            messages_received=received, messages_accepted=accepted, messages_rejected=rejected, groups=groups,
            nats=self._nats(), discovery=self._discovery())

    # -- workers -----------------------------------------------------------------------------

    def workers(self, query: WorkersQuery) -> api.WorkersPage:
        now, offset = self._clocks()
        states = self.order.states()
        total = len(states)
        matched = _filtered(states, query)
        start = (query.page - 1) * query.page_size
        page = _page(matched, query, start)
        pages = max(1, math.ceil(len(matched) / query.page_size))
        return api.WorkersPage(
            generated_at=now + offset, total=total, matched=len(matched), page=query.page,
            page_size=query.page_size, pages=pages, sort=query.sort, order=query.order, filters=query.filters,
            workers=[self._worker(state, now, offset) for state in page])

    def worker(self, key: WorkerKey) -> api.WorkerDetail | None:
        state = self.fleet.workers.get(key)
        if state is None:
            return None
        now, offset = self._clocks()
        gpu = state.gpu if state.gpu is not None and state.gpu_seen >= now - self.fleet.stale_after else None
        metrics = state.component_metrics
        return api.WorkerDetail(
            generated_at=now + offset, worker=self._worker(state, now, offset),
            hostname=(gpu.hostname or None) if gpu is not None else None,
            gpu_driver_version=gpu.driver_version if gpu is not None else None,
            gpu_sampler_error=gpu.sampler_error if gpu is not None else None,
            gpu_list=[api.Gpu(index=g.index, name=g.name, uuid=g.uuid, gpu_util_percent=g.gpu_util,
                              fb_used_mib=g.fb_used_mib, fb_total_mib=g.fb_total_mib, temperature_c=g.gpu_temp_c,
                              power_w=g.power_usage_w) for g in (gpu.gpus if gpu is not None else ())],
            component_families=sorted(metrics.families) if metrics is not None else [])

    def _worker(self, state: WorkerState, now: float, offset: float) -> api.Worker:
        key, load = state.key, state.load
        kv = load.kv_stats if load is not None else None
        slots = load.worker_stats if load is not None else None
        fresh_gpu = state.gpu is not None and state.gpu_seen >= now - self.fleet.stale_after
        age = max(now - state.last_seen, 0.0)
        usage = _usage(state)
        metrics = state.component_metrics
        return api.Worker(
            component=key.component, endpoint=key.endpoint, worker_id=key.worker_id, dp_rank=key.dp_rank,
            source=state.source, last_seen=state.last_seen + offset, age_seconds=age,
            expires_in_seconds=max(self.fleet.stale_after - age, 0.0),
            kv_blocks_active=kv.kv_active_blocks if kv is not None else None,
            kv_blocks_total=kv.kv_total_blocks if kv is not None else None,
            kv_usage_percent=100.0 * usage if usage is not None else None,
            slots_active=slots.request_active_slots if slots is not None else None,
            slots_total=slots.request_total_slots if slots is not None else None,
            requests_waiting=slots.num_requests_waiting if slots is not None else None,
            hit_rate_percent=_hit_rate(state), isl_blocks=state.isl_blocks, overlap_blocks=state.overlap_blocks,
            gpus=len(state.gpu.gpus) if fresh_gpu and state.gpu is not None else 0,
            component_series=metrics.series if metrics is not None else 0)

    # -- sources -----------------------------------------------------------------------------

    def sources(self) -> api.Sources:
        now, offset = self._clocks()
        kinds = []
        for counts in self.counts.all():
            by_reason = {reason: tally.value for reason, tally in list(counts.rejected.items()) if tally.value}
            kinds.append(api.KindCounts(source=counts.source, kind=counts.kind, received=counts.received.value,
                                        accepted=counts.accepted.value, rejected=sum(by_reason.values()),
                                        rejected_by_reason=dict(sorted(by_reason.items()))))
        tallies = self.subjects.all()
        kinds += _kinds_of_subjects(tallies, {kind.source for kind in kinds})
        kinds.sort(key=lambda k: (k.source, k.kind))
        subjects = [_subject(tally, now, offset) for tally in tallies]
        subjects.sort(key=lambda s: (s.source, s.subject))
        return api.Sources(generated_at=now + offset, kinds=kinds, subjects=subjects,
                           publishers=self._publishers(), reasons=dict(rejects.DESCRIPTIONS), nats=self._nats(),
                           discovery=self._discovery())


@dataclass(slots=True)
class _GroupSums:
    workers: int = 0
    active: int = 0
    total: int = 0
    gpus: int = 0
    loads: list[float] = field(default_factory=list)


_NO_WORKERS = _GroupSums()


def _kinds_of_subjects(tallies: list[SubjectTally], counted: set[str]) -> list[api.KindCounts]:
    """Per-kind counts of the sources ingest does not count by kind (pull mode: its entries are counted
    in llm_aggregator_stats_scrape_*), summed from their subjects."""
    sums: dict[tuple[str, str], list] = {}
    for tally in tallies:
        if tally.source in counted:
            continue
        entry = sums.setdefault((tally.source, tally.kind), [0, 0, {}])
        entry[0] += tally.received
        entry[1] += tally.accepted
        for reason, count in dict(tally.rejected or {}).items():
            entry[2][reason] = entry[2].get(reason, 0) + count
    return [api.KindCounts(source=source, kind=kind, received=received, accepted=accepted,
                           rejected=sum(by_reason.values()), rejected_by_reason=dict(sorted(by_reason.items())))
            for (source, kind), (received, accepted, by_reason) in sums.items()]


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def _subject(tally: SubjectTally, now: float, offset: float) -> api.SubjectCounts:
    rejected = dict(tally.rejected) if tally.rejected is not None else {}
    recent = list(tally.last_rejects) if tally.last_rejects is not None else []
    last = tally.last_seen
    return api.SubjectCounts(
        source=tally.source, subject=tally.subject, kind=tally.kind, received=tally.received,
        accepted=tally.accepted, rejected=sum(rejected.values()), rejected_by_reason=dict(sorted(rejected.items())),
        last_seen=last + offset if last is not None else None,
        age_seconds=max(now - last, 0.0) if last is not None else None,
        last_rejected=[api.RejectedMessage(at=r.at + offset, age_seconds=max(now - r.at, 0.0), reason=r.reason,
                                           detail=r.detail, payload=_payload_text(r.payload), payload_bytes=r.size,
                                           truncated=r.size > len(r.payload))
                       for r in reversed(recent)])


def _filtered(states: list[WorkerState], query: WorkersQuery) -> list[WorkerState]:
    if query.component is not None:
        states = [s for s in states if s.key.component == query.component]
    if query.endpoint is not None:
        states = [s for s in states if s.key.endpoint == query.endpoint]
    if query.source is not None:
        states = [s for s in states if s.source == query.source]
    if query.q is not None:
        needle = query.q.lower()
        states = [s for s in states if _matches(s.key, needle)]
    return states


def _matches(key: WorkerKey, needle: str) -> bool:
    """`q`: a part of the component, the endpoint, or the worker id in decimal or hex."""
    return (needle in key.component.lower() or needle in key.endpoint.lower()
            or needle in str(key.worker_id) or needle in f"{key.worker_id:x}")


def _page(states: list[WorkerState], query: WorkersQuery, start: int) -> list[WorkerState]:
    """The rows [start, start + page_size) of `states` (in key order) in the order asked; no value last."""
    end = start + query.page_size
    if start >= len(states):
        return []
    descending = query.order == "desc"
    if query.sort == "key":
        return (states[::-1] if descending else states)[start:end]
    sort_key = SORT_KEYS[query.sort]
    get = sort_key.value
    values = [None if s.load is None else get(s) for s in states] if sort_key.of_load else list(map(get, states))
    if None in values:
        present = [(value, state) for value, state in zip(values, states, strict=True) if value is not None]
        missing = [state for value, state in zip(values, states, strict=True) if value is None]
    else:
        present, missing = list(zip(values, states, strict=True)), []
    # Sorted by value alone: Python's sort is stable (reverse included), so ties stay in key order.
    first = itemgetter(0)
    if end * 8 < len(present):
        # An early page of a large fleet: a partial selection (as stable as a sort), not a full sort.
        pick = heapq.nlargest if descending else heapq.nsmallest
        return [state for _, state in pick(end, present, key=first)[start:]]
    present.sort(key=first, reverse=descending)
    ordered = [state for _, state in present] + missing
    return ordered[start:end]


class KeyOrder:
    """The live workers in key order (component, endpoint, worker_id, dp_rank), sorted again only
    when the set of workers changed: a FleetListener (expiry) plus the fleet's size (arrivals)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._keys: list[WorkerKey] = []
        self._expiries = 0  # bumped on the event loop
        self._sorted_at = -1

    def gpu_reading(self, state: WorkerState) -> None:
        """The order does not depend on readings."""

    def workers_expired(self, keys: list[WorkerKey]) -> None:
        self._expiries += 1

    def states(self) -> list[WorkerState]:
        workers = self._fleet.workers
        expiries = self._expiries  # read before the snapshot: an expiry after it shows next time
        keys = self._keys
        if expiries != self._sorted_at or len(keys) != len(workers):
            # Arrivals only ever grow the fleet, and any departure is an expiry: same size, same set.
            keys = sorted(list(workers))
            self._keys, self._sorted_at = keys, expiries
        get = workers.get
        return [state for state in map(get, keys) if state is not None]
