"""Per-worker state of the fleet, with expiry. No I/O: time comes in as a number.

A worker is one data-parallel rank of one worker process on one component endpoint:
`WorkerKey(component, endpoint, worker_id, dp_rank)`. Every message from it refreshes
all of its series together, and when it falls silent for `stale_after` seconds all of
them go together, so a live worker's counters never reset and a dead one leaves nothing.

What readers derive from a worker and keep while it lives (the exposition's rendered series)
is theirs: they register a `FleetListener` and are told when a reading arrives and when
workers go, so the state carries data only.

Dynamo 1.x sources fill fields of their own, never the legacy ones: `active_load`
(kv_metrics), `forward_passes` (forward-pass-metrics), `kv_cache` (kv-events), `capacity`
(the model card in discovery) and `service_stats` (`$SRV.STATS` without data). Discovery also
decides liveness: a worker whose instance entry exists is not expired however long it is
silent, and when the entry goes its ranks are dropped at once (`delete_instance`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from aggregator.rejects import GROUP_LIMIT, LABEL_LIMIT, OUT_OF_RANGE, WORKER_LIMIT
from aggregator.state.component_index import ComponentIndex, Problem, WorkerMetrics
from aggregator.state.discovery_index import Capacity, DiscoveryIndex, Instance, ModelCardRanks
from aggregator.state.fleet_stats import hit_rate_percent, load_mean_std
from aggregator.state.forward_passes import ForwardPasses
from aggregator.state.kv_cache import CachedBlocks, KvBlockBudget
from fleet_protocol import (
    MAX_LABEL_LENGTH,
    ActiveLoad,
    EndpointStatsV1,
    ForwardPassMetrics,
    ForwardPassMetricsV1,
    GpuMetricsEvent,
    InstanceEntry,
    KvHitRateEvent,
    LoadEvent,
    MessageRejected,
    MetricsSnapshot,
    ModelEntry,
    RouterEvent,
)

MAX_RANK = 65535


class WorkerKey(NamedTuple):
    component: str
    endpoint: str
    worker_id: int
    dp_rank: int


class GroupKey(NamedTuple):
    component: str
    endpoint: str


@dataclass(slots=True)
class WorkerState:
    key: WorkerKey
    last_seen: float
    load: ForwardPassMetrics | None = None
    isl_blocks: int = 0
    overlap_blocks: int = 0
    component_metrics: WorkerMetrics | None = None  # the worker's latest MetricsRegistry snapshot
    gpu: GpuMetricsEvent | None = None  # the latest GPU readings, replaced whole
    gpu_seen: float = 0.0  # when they came; readings older than stale_after are not exported
    source: str | None = None  # the ingest source ("nats", "pull", ...) of its latest load report
    # Dynamo 1.x
    active_load: ActiveLoad | None = None  # the latest kv_metrics, replaced whole
    forward_passes: ForwardPasses | None = None
    kv_cache: CachedBlocks | None = None
    capacity: Capacity | None = None  # from the model card of its instance, if it names this rank
    service_stats: EndpointStatsV1 | None = None  # the latest `$SRV.STATS` counters (request plane nats)


class FleetListener(Protocol):
    """Told of the changes after which a reader's derived data is out of date. Called on the
    thread that changes the fleet, right after the change."""

    def gpu_reading(self, state: WorkerState) -> None:
        """`state.gpu` was replaced by a new reading."""

    def workers_expired(self, keys: list[WorkerKey]) -> None:
        """These workers are gone (a worker seen again later is a new one)."""


@dataclass(slots=True)
class GroupTotals:
    """What a component endpoint accumulated over its lifetime, expired workers included."""

    isl_blocks: int = 0
    overlap_blocks: int = 0
    expired: int = 0
    deregistered: int = 0  # dropped because their discovery instance entry went


@dataclass(slots=True)
class GroupStats:
    key: GroupKey
    live_workers: int
    load_avg: float | None
    load_std: float | None
    hit_rate_percent: float | None
    totals: GroupTotals = field(default_factory=GroupTotals)


class LimitExceeded(Exception):
    """A new worker or group would pass a configured cardinality limit."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fleet:
    def __init__(
        self,
        stale_after: float,
        *,
        max_workers: int = 100_000,
        max_groups: int = 10_000,
        default_endpoint: str = "generate",
        max_component_series: int = 100_000,
        kv_blocks: KvBlockBudget | None = None,
    ) -> None:
        self.stale_after = stale_after
        self.max_workers = max_workers
        self.max_groups = max_groups
        self.default_endpoint = default_endpoint
        # Ordered by last update, oldest first, so expiry only looks at the stale head.
        self.workers: OrderedDict[WorkerKey, WorkerState] = OrderedDict()
        self.groups: dict[GroupKey, GroupTotals] = {}
        # A group's totals outlive its workers, but not forever: once the table is full, the group
        # empty for the longest time makes room for a new one (its totals restart from zero if it
        # comes back, a counter reset that Prometheus's rate() handles). Junk names cannot lock
        # out a new component once their workers have expired.
        self._live_in_group: dict[GroupKey, int] = {}
        self._idle_groups: OrderedDict[GroupKey, None] = OrderedDict()  # no live worker; longest idle first
        self.groups_evicted = 0
        self.component_metrics = ComponentIndex(max_component_series)
        self._listeners: tuple[FleetListener, ...] = ()
        # Hit-rate events name no endpoint: they go to the endpoint the worker reports load on.
        self._endpoint_of: dict[tuple[str, int, int], str] = {}
        self.kv_blocks = kv_blocks or KvBlockBudget()
        self.discovery = DiscoveryIndex()
        # Each instance's worker keys (its ranks), kept only once discovery is in use: a deleted
        # instance entry drops them all at once.
        self._ranks_of: dict[Instance, list[WorkerKey]] | None = None

    def __len__(self) -> int:
        return len(self.workers)

    def add_listener(self, listener: FleetListener) -> None:
        self._listeners = (*self._listeners, listener)

    def _touch(self, key: tuple[str, str, int, int], now: float) -> WorkerState:
        # `key` may be a plain tuple (hot path): it hashes and compares equal to its WorkerKey.
        state = self.workers.get(key)  # type: ignore[call-overload]  # equal to its WorkerKey, see above
        if state is not None:
            state.last_seen = now
            self.workers.move_to_end(key)  # type: ignore[arg-type]
            return state
        key = WorkerKey(*key)
        if len(self.workers) >= self.max_workers:
            raise LimitExceeded(WORKER_LIMIT)
        # The endpoint is bounded by the decoder; the component comes from the subject.
        if len(key.component) > MAX_LABEL_LENGTH:
            raise LimitExceeded(LABEL_LIMIT)
        group = GroupKey(key.component, key.endpoint)
        if group not in self.groups:
            if len(self.groups) >= self.max_groups:
                self._evict_idle_group()
            self.groups[group] = GroupTotals()
        state = self.workers[key] = WorkerState(key, now)
        live = self._live_in_group.get(group, 0)
        if not live:
            self._idle_groups.pop(group, None)
        self._live_in_group[group] = live + 1
        if self._ranks_of is not None:
            instance = Instance(key.component, key.endpoint, key.worker_id)
            self._ranks_of.setdefault(instance, []).append(key)
            card = self.discovery.card_of(instance)
            if card is not None:
                state.capacity = card.capacity_of(key.dp_rank)
        return state

    def _evict_idle_group(self) -> None:
        if not self._idle_groups:
            raise LimitExceeded(GROUP_LIMIT)  # every group has a live worker: the limit holds
        group, _ = self._idle_groups.popitem(last=False)
        del self.groups[group]
        self.groups_evicted += 1

    def _check_new_workers(self, component: str, endpoint: str, count: int) -> None:
        """Raises LimitExceeded if `count` new workers of `component`/`endpoint` would pass a limit."""
        if len(self.workers) + count > self.max_workers:
            raise LimitExceeded(WORKER_LIMIT)
        if len(component) > MAX_LABEL_LENGTH:
            raise LimitExceeded(LABEL_LIMIT)
        if (GroupKey(component, endpoint) not in self.groups and len(self.groups) >= self.max_groups
                and not self._idle_groups):  # an idle group would be evicted to make room
            raise LimitExceeded(GROUP_LIMIT)

    def observe_load(self, component: str, event: LoadEvent, now: float) -> WorkerState:
        rank = event.data.worker_stats.data_parallel_rank or 0
        state = self._touch((component, event.endpoint, event.worker_id, rank), now)
        state.load = event.data
        self._endpoint_of[(component, event.worker_id, rank)] = event.endpoint
        return state

    def observe_hit_rate(self, component: str, event: KvHitRateEvent, now: float) -> WorkerState:
        rank = event.dp_rank or 0
        endpoint = self._endpoint_of.get((component, event.worker_id, rank), self.default_endpoint)
        state = self._touch((component, endpoint, event.worker_id, rank), now)
        state.isl_blocks += event.isl_blocks
        state.overlap_blocks += event.overlap_blocks
        totals = self.groups[GroupKey(component, endpoint)]
        totals.isl_blocks += event.isl_blocks
        totals.overlap_blocks += event.overlap_blocks
        return state

    def restore_group(self, group: GroupKey, isl_blocks: int, overlap_blocks: int, expired: int) -> None:
        """Put back a component endpoint's lifetime totals from a snapshot (before its workers')."""
        totals = self.groups.setdefault(group, GroupTotals())
        totals.isl_blocks, totals.overlap_blocks, totals.expired = isl_blocks, overlap_blocks, expired
        if not self._live_in_group.get(group):
            self._idle_groups[group] = None  # idle until one of its workers comes back

    def restore_hit_rate(self, key: WorkerKey, isl_blocks: int, overlap_blocks: int, last_seen: float) -> None:
        """Put back a worker's hit-rate sums from a snapshot; group totals are restored by restore_group."""
        state = self._touch(key, last_seen)
        state.isl_blocks += isl_blocks
        state.overlap_blocks += overlap_blocks
        self._endpoint_of.setdefault((key.component, key.worker_id, key.dp_rank), key.endpoint)

    def observe_component_metrics(self, component: str, snapshot: MetricsSnapshot, metrics: WorkerMetrics,
                                  now: float) -> list[Problem]:
        """Replace the worker's snapshot (`metrics`, checked and rendered from `snapshot` by the ingest side).

        Families whose type conflicts with other workers' are dropped and returned as
        problems. Raises MessageRejected (series_limit) or LimitExceeded before changing anything.
        """
        key = WorkerKey(component, snapshot.endpoint, snapshot.worker_id, snapshot.dp_rank or 0)
        state = self.workers.get(key)
        previous = state.component_metrics if state is not None else None
        problems = self.component_metrics.admit(metrics, previous)
        state = self._touch(key, now)
        if previous is not None:
            self.component_metrics.remove(previous)
        self.component_metrics.add(metrics)
        metrics.seal()
        state.component_metrics = metrics
        return problems

    def observe_gpu(self, component: str, event: GpuMetricsEvent, now: float) -> WorkerState:
        """The worker's latest GPU readings; the message also keeps the worker alive."""
        key = WorkerKey(component, event.endpoint, event.worker_id, event.dp_rank or 0)
        state = self._touch(key, now)
        state.gpu = event
        state.gpu_seen = now
        for listener in self._listeners:
            listener.gpu_reading(state)
        return state

    # Dynamo 1.x: the event plane (component and endpoint from the subject) -----------------

    def observe_active_load(self, component: str, endpoint: str, publisher_id: int, load: ActiveLoad,
                            now: float) -> WorkerState:
        """A kv_metrics message: the rank's load, replaced whole (Dynamo sends every field each time)."""
        state = self._touch((component, endpoint, load.worker_id, load.dp_rank), now)
        state.active_load = load
        return state

    def observe_forward_pass(self, component: str, endpoint: str, publisher_id: int, metrics: ForwardPassMetricsV1,
                             now: float) -> WorkerState:
        """A forward-pass-metrics message (an iteration, or the idle heartbeat: liveness either way)."""
        state = self._touch((component, endpoint, metrics.worker, metrics.dp_rank), now)
        passes = state.forward_passes
        if passes is None:
            passes = state.forward_passes = ForwardPasses()
        passes.observe(publisher_id, metrics)
        return state

    def observe_kv_events(self, component: str, endpoint: str, publisher_id: int, batch: list[RouterEvent],
                          now: float) -> list[tuple[str, str]]:
        """A kv-events batch, applied event by event; the (reason, detail) of events it dropped.

        An event is dropped whole, before it changes anything, when its worker is refused (a
        limit) or names one storage tier too many; the rest of the batch is applied.
        """
        dropped: list[tuple[str, str]] = []
        for event in batch:
            key = (component, endpoint, event.worker_id, event.event.dp_rank)
            try:
                known = self.workers.get(key)  # type: ignore[call-overload]  # equal to its WorkerKey
                if known is not None and known.kv_cache is not None:
                    known.kv_cache.check_tier(event.storage_tier)
                state = self._touch(key, now)
            except LimitExceeded as error:
                dropped.append((error.reason, f"event {event.event.event_id} of worker {event.worker_id}"))
                continue
            except MessageRejected as error:
                dropped.append((error.reason, error.detail))
                continue
            blocks = state.kv_cache
            if blocks is None:
                blocks = state.kv_cache = CachedBlocks()
            blocks.apply(self.kv_blocks, publisher_id, event.storage_tier, event.event)
        return dropped

    # Dynamo 1.x: `$SRV.STATS` without data (request plane nats) ------------------------------

    def observe_service_stats(self, component: str, endpoint: str, worker_id: int, stats: EndpointStatsV1,
                              now: float) -> WorkerState:
        """A worker process's request counters; on its first rank (the model card's start rank, else 0)."""
        card = self.discovery.card_of(Instance(component, endpoint, worker_id))
        rank = card.ranks.start if card is not None and card.ranks else 0
        state = self._touch((component, endpoint, worker_id, rank), now)
        state.service_stats = stats
        return state

    # Dynamo 1.x: the discovery store ------------------------------------------------------

    def _index_ranks(self) -> dict[Instance, list[WorkerKey]]:
        if self._ranks_of is None:
            self._ranks_of = {}
            for key in self.workers:
                self._ranks_of.setdefault(Instance(key.component, key.endpoint, key.worker_id), []).append(key)
        return self._ranks_of

    def put_instance(self, key: str, entry: InstanceEntry, now: float) -> None:
        """An instance entry at `key`: its worker lives while the entry does (no expiry)."""
        instance = Instance(entry.component, entry.endpoint, entry.instance_id)
        if key not in self.discovery.instances:
            if len(self.discovery.instances) >= self.max_workers:
                raise LimitExceeded(WORKER_LIMIT)
            if len(instance.component) > MAX_LABEL_LENGTH:
                raise LimitExceeded(LABEL_LIMIT)
        self._index_ranks()
        previous = self.discovery.put_instance(key, instance)
        if previous is not None and previous not in self.discovery.live:
            self._drop_instance(previous)

    def delete_instance(self, key: str, now: float) -> list[WorkerKey]:
        """The instance entry at `key` is gone: its worker's ranks are dropped now (unless another key names it)."""
        instance = self.discovery.delete_instance(key)
        return self._drop_instance(instance) if instance is not None else []

    def _drop_instance(self, instance: Instance) -> list[WorkerKey]:
        keys = self._index_ranks().pop(instance, [])
        dropped = [key for key in keys if key in self.workers]
        for key in dropped:
            self._drop(key, self.workers[key])
            self.groups[GroupKey(key.component, key.endpoint)].deregistered += 1
        if dropped:
            for listener in self._listeners:
                listener.workers_expired(dropped)
        return dropped

    def put_model_card(self, key: str, entry: ModelEntry, now: float) -> None:
        """A model card at `key`: its capacity for each of its ranks, each rank a worker series from now on."""
        card = ModelCardRanks.of(entry.card_json.runtime_config)
        if card.ranks.stop - 1 > MAX_RANK:
            raise MessageRejected(OUT_OF_RANGE, f"data-parallel ranks {card.ranks.start}..{card.ranks.stop - 1} "
                                                f"past {MAX_RANK}")
        instance = Instance(entry.component, entry.endpoint, entry.instance_id)
        missing = [rank for rank in card.ranks
                   if (instance.component, instance.endpoint, instance.worker_id, rank) not in self.workers]
        if missing:
            self._check_new_workers(instance.component, instance.endpoint, len(missing))
        self._index_ranks()  # before the ranks are made, so that _touch records them
        previous = self.discovery.put_card(key, instance, card)
        if previous is not None:
            self._apply_capacity(previous)
        for rank in card.ranks:
            self._touch((instance.component, instance.endpoint, instance.worker_id, rank), now)
        self._apply_capacity(instance)

    def delete_model_card(self, key: str, now: float) -> None:
        """The model card at `key` is gone: its ranks keep living (the instance says), without its capacity."""
        instance = self.discovery.delete_card(key)
        if instance is not None:
            self._apply_capacity(instance)

    def _apply_capacity(self, instance: Instance) -> None:
        card = self.discovery.card_of(instance)
        for key in self._index_ranks().get(instance, ()):
            state = self.workers.get(key)
            if state is not None:
                state.capacity = card.capacity_of(key.dp_rank) if card is not None else None

    # Expiry ---------------------------------------------------------------------------------

    def _drop(self, key: WorkerKey, state: WorkerState) -> None:
        del self.workers[key]
        if state.component_metrics is not None:
            self.component_metrics.remove(state.component_metrics)
        if state.kv_cache is not None:
            state.kv_cache.release(self.kv_blocks)
        index = (key.component, key.worker_id, key.dp_rank)
        if self._endpoint_of.get(index) == key.endpoint:
            del self._endpoint_of[index]
        group = GroupKey(key.component, key.endpoint)
        live = self._live_in_group[group] - 1
        if live:
            self._live_in_group[group] = live
        else:
            del self._live_in_group[group]
            self._idle_groups[group] = None  # its totals stay until the table needs the room

    def expire(self, now: float) -> list[WorkerKey]:
        """Drop every worker last seen more than `stale_after` seconds before `now`, except those whose
        discovery instance entry exists."""
        expired: list[WorkerKey] = []
        deadline = now - self.stale_after
        live = self.discovery.live
        kept = 0
        # A kept worker goes to the back, out of last-seen order; the others stay in order among
        # themselves, so the first fresh one still ends the stale ones. Each is looked at once.
        while self.workers and kept < len(self.workers):
            key, state = next(iter(self.workers.items()))
            if state.last_seen > deadline:
                break
            if live and (key.component, key.endpoint, key.worker_id) in live:
                self.workers.move_to_end(key)
                kept += 1
                continue
            self._drop(key, state)
            expired.append(key)
            self.groups[GroupKey(key.component, key.endpoint)].expired += 1
            if self._ranks_of is not None:
                self._forget_rank(key)
        if expired:
            for listener in self._listeners:
                listener.workers_expired(expired)
        return expired

    def _forget_rank(self, key: WorkerKey) -> None:
        assert self._ranks_of is not None
        instance = Instance(key.component, key.endpoint, key.worker_id)
        keys = self._ranks_of.get(instance)
        if keys is not None:
            keys.remove(key)
            if not keys:
                del self._ranks_of[instance]

    def group_stats(self) -> list[GroupStats]:
        """Load mean/std over the live workers that reported load, per component endpoint."""
        # Snapshots: /metrics renders in a thread while the event loop keeps adding workers and groups.
        groups = list(self.groups.items())
        loads: dict[GroupKey, list[float]] = {group: [] for group, _ in groups}
        live: dict[GroupKey, int] = {group: 0 for group, _ in groups}
        for key, state in list(self.workers.items()):
            group = GroupKey(key.component, key.endpoint)
            if group not in live:  # a group born after the snapshot: next scrape
                continue
            live[group] += 1
            if state.load is not None:
                loads[group].append(float(state.load.kv_stats.kv_active_blocks))
            elif state.active_load is not None and state.active_load.kv_used_blocks is not None:
                loads[group].append(float(state.active_load.kv_used_blocks))
        stats = []
        for group, totals in groups:
            mean_std = load_mean_std(loads[group])
            stats.append(
                GroupStats(
                    key=group,
                    live_workers=live[group],
                    load_avg=mean_std[0] if mean_std else None,
                    load_std=mean_std[1] if mean_std else None,
                    hit_rate_percent=hit_rate_percent(totals.overlap_blocks, totals.isl_blocks),
                    totals=totals,
                )
            )
        return stats
