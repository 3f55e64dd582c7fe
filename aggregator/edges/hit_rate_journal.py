"""Cumulative KV hit-rate history that survives an aggregator SIGKILL (opt-in: --hit-rate-stream).

Core NATS is at-most-once and the sums live in memory, so a killed aggregator would
restart every `llm_*kv_hit_rate_*_blocks_total` counter at 0. With `--hit-rate-stream`
the hit-rate events are read from a JetStream stream instead of a core subscription
(the stream captures them while the aggregator is down, too), and the sums are
rebuilt on start:

    state on start = snapshot (sums + the stream sequence they include)
                     + every stream event after that sequence, replayed in order.

Why not "durable consumer, ack after apply": an ack says the event was applied to
*memory*; after a SIGKILL that memory is gone and the server will not redeliver an acked
event, so the sums would still be lost. Whatever is acknowledged must be persisted with
it, atomically. So the position that matters is the last stream sequence *inside the
snapshot*, written in the same file as the sums (write to a temporary file, fsync,
rename). The consumer is an ordered (ephemeral, flow-controlled) consumer that starts at
that sequence + 1; nats-py recreates it from the last sequence seen after a reconnect or
a missed heartbeat, and events at or below the applied sequence are skipped, so nothing
is applied twice. Without `--hit-rate-snapshot` the whole stream is replayed at start:
exact while the stream still holds every event (its retention, `--hit-rate-stream-max-age`,
bounds the history and the replay time).

In a NATS cluster the stream the aggregator creates gets `--hit-rate-stream-replicas` copies
(R3: any one node may die, the stream keeps a quorum and every acknowledged event). The
consumer itself is ephemeral and lives on one node: when that node dies its heartbeats stop,
and nats-py recreates it on a surviving one from the last sequence seen (after two missed
heartbeats, 4 s, retried until the cluster has elected the stream's new leader); the
sequence check below keeps anything from being applied twice (tests/integration/test_nats_cluster.py).

Replayed events refresh their workers' last-seen time, so a worker that died while the
aggregator was down shows as live for up to `--stale-after` after the restart.

History can still have holes that no restart logic can fill, and they are exported
(`llm_aggregator_hit_rate_journal_*`) rather than only logged: events that left the stream
(retention, a purge) before they were applied show as a jump in the stream sequence, counted
per event in `lost_events_total` and per hole in `gaps_total{reason="retention"}`; a stream
recreated since the snapshot (its creation time differs from the one the snapshot recorded,
or, for a snapshot without one, its last sequence is below the snapshot's) is a
`gaps_total{reason="stream_reset"}` whose size cannot be known: the new stream is then read
from its start. Sequence jumps mean loss only
when the stream captures nothing but the hit-rate subjects (true of the stream this module
creates); on a wider stream they are not counted (logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog
from nats.js import api
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge

import fleet_protocol as protocol
from aggregator.config import JournalConfig
from aggregator.ingest.pipeline import JOURNAL, Ingest
from aggregator.state.fleet import Fleet, GroupKey, WorkerKey

log = structlog.get_logger("aggregator.hit_rate_journal")

SNAPSHOT_VERSION = 1


class Snapshot(msgspec.Struct):
    version: int
    stream: str
    last_seq: int
    written_at: float  # wall clock
    # [component, endpoint, worker_id, dp_rank, isl_blocks, overlap_blocks, last_seen (wall clock)]
    workers: list[tuple[str, str, int, int, int, int, float]]
    # [component, endpoint, isl_blocks, overlap_blocks, expired]
    groups: list[tuple[str, str, int, int, int]]
    # When the stream whose sequence `last_seq` is was created (ISO 8601): a stream deleted and
    # recreated restarts its sequence at 1, and may pass `last_seq` again before the next start.
    stream_created: str | None = None


def stream_subjects(namespace: str) -> list[str]:
    return [protocol.namespace_subject(namespace, protocol.KV_HIT_RATE),
            protocol.component_subject(namespace, "*", protocol.KV_HIT_RATE)]


def take_snapshot(fleet: Fleet, stream: str, last_seq: int, *, wall: float, monotonic: float,
                  stream_created: str | None = None) -> Snapshot:
    """The hit-rate part of the fleet state, consistent with `last_seq` (pure)."""
    offset = wall - monotonic
    workers = [(k.component, k.endpoint, k.worker_id, k.dp_rank, s.isl_blocks, s.overlap_blocks, s.last_seen + offset)
               for k, s in fleet.workers.items() if s.isl_blocks or s.overlap_blocks]
    groups = [(g.component, g.endpoint, t.isl_blocks, t.overlap_blocks, t.expired) for g, t in fleet.groups.items()]
    return Snapshot(SNAPSHOT_VERSION, stream, last_seq, wall, workers, groups, stream_created)


def restore(fleet: Fleet, snapshot: Snapshot, *, wall: float, monotonic: float) -> None:
    """Put the snapshot's sums back into an empty fleet (pure)."""
    for component, endpoint, isl, overlap, expired in snapshot.groups:
        fleet.restore_group(GroupKey(component, endpoint), isl, overlap, expired)
    for component, endpoint, worker_id, rank, isl, overlap, seen in sorted(snapshot.workers, key=lambda w: w[6]):
        last_seen = monotonic - max(0.0, wall - seen)
        fleet.restore_hit_rate(WorkerKey(component, endpoint, worker_id, rank), isl, overlap, last_seen)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


GAP_REASONS = ("retention", "stream_reset")


class JournalTelemetry:
    """`llm_aggregator_hit_rate_journal_*`: progress through the stream and the holes found in it."""

    def __init__(self, registry: CollectorRegistry, journal: HitRateJournal) -> None:
        prefix = "llm_aggregator_hit_rate_journal"
        self.applied = Counter(f"{prefix}_applied", "Hit-rate stream events taken in order and handed to "
                               "ingest (a malformed one is counted in llm_aggregator_messages_rejected_total)",
                               registry=registry)
        self.duplicates = Counter(f"{prefix}_duplicates_skipped",
                                  "Stream events skipped as already in the sums (replayed after a consumer reset)",
                                  registry=registry)
        gaps = Counter(f"{prefix}_gaps", "Holes found in the hit-rate history: events gone from the stream before "
                       "they were applied (retention) or a stream recreated behind the snapshot (stream_reset)",
                       ["reason"], registry=registry)
        self.gaps = {reason: gaps.labels(reason) for reason in GAP_REASONS}
        self.lost = Counter(f"{prefix}_lost_events",
                            "Stream sequences skipped because their events were gone (retention, purge); "
                            "a stream_reset gap adds nothing here, its size is unknown", registry=registry)
        Gauge(f"{prefix}_last_sequence", "Last stream sequence included in the hit-rate sums",
              registry=registry).set_function(lambda: journal.last_seq)
        Gauge(f"{prefix}_snapshot_sequence", "Last stream sequence included in the snapshot file written",
              registry=registry).set_function(lambda: journal.written_seq)


class HitRateJournal:
    def __init__(self, config: JournalConfig, ingest: Ingest, registry: CollectorRegistry | None = None, *,
                 keeps: Callable[[str], bool] | None = None) -> None:
        """`keeps`: whether an event's subject is this shard's (ShardFilter.keeps); every one when None."""
        self.stream = config.stream
        self.snapshot_path = Path(config.snapshot_path) if config.snapshot_path is not None else None
        self.interval = config.snapshot_interval
        self.max_age = config.stream_max_age
        self.replicas = config.stream_replicas
        self.ingest = ingest
        self.keeps = keeps
        self.fleet = ingest.fleet
        self.feed = ingest.subject_feed(JOURNAL)
        self.subjects = stream_subjects(ingest.namespace)
        self.patterns = {protocol.namespace_subject(ingest.namespace, protocol.KV_HIT_RATE),
                         protocol.component_subject(ingest.namespace, "*", protocol.KV_HIT_RATE)}
        self.last_seq = 0
        self.written_seq = 0  # nothing applied, nothing to write
        self.stream_created: str | None = None  # of the stream last_seq counts in (from the snapshot, then NATS)
        self._rewrite = False  # the file names another stream: write even if nothing new is applied
        self.subscription = None
        # A sequence jump is a loss only if every stream sequence is a hit-rate event (see the module doc).
        self.jumps_are_losses = True
        self.telemetry = JournalTelemetry(registry if registry is not None else CollectorRegistry(), self)

    def load(self) -> None:
        """Read the snapshot, if any, into the (empty) fleet. A corrupt file stops the start."""
        if self.snapshot_path is None or not self.snapshot_path.exists():
            return
        snapshot = msgspec.json.decode(self.snapshot_path.read_bytes(), type=Snapshot)
        if snapshot.version != SNAPSHOT_VERSION or snapshot.stream != self.stream:
            raise ValueError(f"{self.snapshot_path} is for stream {snapshot.stream!r} (version {snapshot.version}), "
                             f"not {self.stream!r}")
        restore(self.fleet, snapshot, wall=time.time(), monotonic=time.monotonic())
        self.last_seq = self.written_seq = snapshot.last_seq
        self.stream_created = snapshot.stream_created
        log.info("hit-rate sums restored", snapshot=str(self.snapshot_path), last_seq=snapshot.last_seq,
                 workers=len(snapshot.workers), groups=len(snapshot.groups))

    def snapshot_bytes(self) -> bytes:
        return msgspec.json.encode(take_snapshot(self.fleet, self.stream, self.last_seq, wall=time.time(),
                                                 monotonic=time.monotonic(), stream_created=self.stream_created))

    async def write(self) -> None:
        if self.snapshot_path is None or (self.written_seq == self.last_seq and not self._rewrite):
            return
        seq, data = self.last_seq, self.snapshot_bytes()  # taken in one step: consistent with seq
        await asyncio.to_thread(write_atomically, self.snapshot_path, data)
        self.written_seq = seq
        self._rewrite = False

    async def _ensure_stream(self, js) -> None:
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            info = await js.add_stream(api.StreamConfig(
                name=self.stream, subjects=self.subjects, retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE, max_age=self.max_age, num_replicas=self.replicas))
            log.info("hit-rate stream created", stream=self.stream, subjects=self.subjects, max_age=self.max_age,
                     replicas=self.replicas)
        replicas = info.config.num_replicas or 1
        if replicas < self.replicas:
            # Not raised: the operator may have chosen it; only said, since one node's loss would now stop it.
            log.warning("hit-rate stream has fewer replicas than asked; the aggregator leaves an existing stream as "
                        "it is", stream=self.stream, replicas=replicas, asked=self.replicas)
        created = info.created.isoformat() if info.created is not None else None
        state = info.state
        recreated = created is not None and self.stream_created is not None and created != self.stream_created
        if self.last_seq and (recreated or state.last_seq < self.last_seq):
            log.warning("hit-rate stream was recreated since the snapshot; reading it from its start",
                        stream=self.stream, stream_created=created, snapshot_stream_created=self.stream_created,
                        stream_last_seq=state.last_seq, snapshot_seq=self.last_seq)
            self.last_seq = 0
            # The file's sequence and creation time belong to the old stream: write it again at the
            # next interval, so a restart before any new event does not count the same reset twice.
            self.written_seq = 0
            self._rewrite = True
            self.telemetry.gaps["stream_reset"].inc()
        elif state.first_seq > self.last_seq + 1 and state.messages:
            log.warning("hit-rate events older than the stream's retention are gone; history has a gap",
                        stream=self.stream, first_seq=state.first_seq, snapshot_seq=self.last_seq)
        self.stream_created = created
        extra = sorted(set(info.config.subjects or ()) - set(self.subjects))
        if extra:
            self.jumps_are_losses = False
            log.warning("hit-rate stream captures other subjects too; lost events cannot be counted",
                        stream=self.stream, other_subjects=extra)

    def _on_message(self):
        handle = self.feed.handle_subject
        keeps = self.keeps
        handled = 0
        telemetry = self.telemetry

        async def on_message(msg) -> None:
            nonlocal handled
            seq = msg.metadata.sequence.stream
            if seq <= self.last_seq:
                telemetry.duplicates.inc()
                return  # already in the sums (replayed after a consumer reset)
            if seq > self.last_seq + 1 and self.jumps_are_losses:
                telemetry.gaps["retention"].inc()
                telemetry.lost.inc(seq - self.last_seq - 1)
                log.warning("hit-rate events were gone from the stream before they were applied",
                            stream=self.stream, lost=seq - self.last_seq - 1, after_seq=self.last_seq)
            if keeps is None or keeps(msg.subject):  # another shard's event is in its sums, not in these
                handle(msg.subject, msg.data)
            self.last_seq = seq
            telemetry.applied.inc()
            handled += 1
            if handled % 64 == 0:
                await asyncio.sleep(0)  # let HTTP in during a long replay

        return on_message

    async def start(self, nc) -> None:
        js = nc.jetstream()
        await self._ensure_stream(js)
        config = api.ConsumerConfig(filter_subjects=self.subjects)
        if self.last_seq:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_seq + 1
        self.subscription = await js.subscribe(self.subjects[0], stream=self.stream, cb=self._on_message(),
                                               ordered_consumer=True, idle_heartbeat=2.0, config=config,
                                               pending_msgs_limit=64 * 1024)
        log.info("consuming hit-rate events", stream=self.stream, from_seq=self.last_seq + 1)

    async def run(self, subscriber, stop: asyncio.Event) -> None:
        """Start consuming once NATS is up, then snapshot every interval until `stop`."""
        while not subscriber.healthy and not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        while not stop.is_set() and self.subscription is None:
            try:
                await self.start(subscriber.nc)
            except Exception as error:  # noqa: BLE001 - JetStream not ready or not enabled: retry, say why
                log.warning("cannot consume the hit-rate stream; retrying", stream=self.stream,
                            error=str(error) or type(error).__name__)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            try:
                await self.write()
            except OSError as error:
                log.error("cannot write the hit-rate snapshot", path=str(self.snapshot_path), error=str(error))

    async def close(self) -> None:
        """Stop consuming, then write the final state (SIGTERM path)."""
        if self.subscription is not None:
            with contextlib.suppress(Exception):
                await self.subscription.unsubscribe()
        await self.write()
        log.info("hit-rate snapshot written", path=str(self.snapshot_path), last_seq=self.last_seq)
