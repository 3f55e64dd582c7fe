"""`llm_aggregator_hit_rate_journal_*`: progress and holes in the hit-rate history, real JetStream, real aggregator.

Holes are made the way production makes them: a stream whose retention (here `max_msgs`)
dropped events before the aggregator read them, and a stream deleted and recreated while
the aggregator was stopped (its sequence restarts at 1: below the snapshot's, or already past it).
"""

from __future__ import annotations

import asyncio
import json
import signal

import nats
import pytest
from nats.js import api

from aggregator.edges.hit_rate_journal import stream_subjects
from fleet_demo.nats_server import NatsServer

from ..support import samples, scrape, wait_until

SUBJECT = "namespace.dynamo.component.backend.kv-hit-rate"


@pytest.fixture
def jetstream_server():
    with NatsServer(jetstream=True) as server:
        yield server


def journal(url: str) -> dict[str, float]:
    families = scrape(url)
    prefix = "llm_aggregator_hit_rate_journal"

    def one(name, sample=None, labels=()):
        return samples(families, f"{prefix}_{name}", f"{prefix}_{sample}" if sample else None).get(labels)

    isl = samples(families, "llm_fleet_kv_hit_rate_isl_blocks", "llm_fleet_kv_hit_rate_isl_blocks_total")
    return {
        "applied": one("applied", "applied_total"),
        "duplicates": one("duplicates_skipped", "duplicates_skipped_total"),
        "last_sequence": one("last_sequence"),
        "snapshot_sequence": one("snapshot_sequence"),
        "retention_gaps": one("gaps", "gaps_total", (("reason", "retention"),)),
        "reset_gaps": one("gaps", "gaps_total", (("reason", "stream_reset"),)),
        "lost": one("lost_events", "lost_events_total"),
        "isl": sum(isl.values()),
    }


def stream_ops(url: str, *, create: dict | None = None, delete: bool = False, publish: list[int] = ()) -> None:
    """Create/delete the HITRATE stream and publish events with isl_blocks from `publish` (stored: acked)."""
    async def run():
        nc = await nats.connect(url)
        js = nc.jetstream()
        if delete:
            await js.delete_stream("HITRATE")
        if create is not None:
            await js.add_stream(api.StreamConfig(name="HITRATE", subjects=stream_subjects("dynamo"), **create))
        for isl in publish:
            await js.publish(SUBJECT, json.dumps({"worker_id": 1, "isl_blocks": isl, "overlap_blocks": 0}).encode())
        await nc.close()

    asyncio.run(run())


def with_snapshot(tmp_path, interval: str = "3600") -> list[str]:
    return ["--hit-rate-stream", "HITRATE", "--hit-rate-snapshot", str(tmp_path / "snap.json"),
            "--hit-rate-snapshot-interval", interval, "--stale-after", "600"]


def consume_then_stop(processes, url: str, extra: list[str], events: list[int], signum=signal.SIGTERM) -> None:
    """An aggregator takes `events` into its snapshot file, then is stopped by `signum`."""
    first = processes.aggregator(url, *extra)
    wait_until(lambda: "consuming hit-rate events" in first.output(), 15, what="stream consumer")
    stream_ops(url, publish=events)
    # SIGTERM writes a final snapshot; SIGKILL does not, so wait for the periodic one.
    measure = "applied" if signum == signal.SIGTERM else "snapshot_sequence"
    wait_until(lambda: journal(first.url)[measure] == len(events), 15, what=f"{len(events)} events in {measure}")
    first.signal(signum)
    status = first.popen.wait(15)
    assert signum != signal.SIGTERM or status == 0


def test_events_lost_to_retention_are_counted_as_a_gap(jetstream_server, processes):
    url = jetstream_server.url
    # Retention of 5 messages: of events 1..8 (isl 1..8), 1-3 are gone before any aggregator reads them.
    stream_ops(url, create={"max_msgs": 5}, publish=list(range(1, 9)))
    aggregator = processes.aggregator(url, "--hit-rate-stream", "HITRATE", "--stale-after", "600")
    want = {"applied": 5, "duplicates": 0, "last_sequence": 8, "snapshot_sequence": 0, "retention_gaps": 1,
            "reset_gaps": 0, "lost": 3, "isl": 4 + 5 + 6 + 7 + 8}
    wait_until(lambda: journal(aggregator.url) == want, 15, what=f"journal metrics {want}")
    assert "hit-rate events were gone from the stream before they were applied" in aggregator.output()

    stream_ops(url, publish=[100, 200])  # consecutive again: no new gap
    want.update(applied=7, last_sequence=10, isl=want["isl"] + 300)
    wait_until(lambda: journal(aggregator.url) == want, 15, what=f"journal metrics {want}")


def test_a_stream_recreated_behind_the_snapshot_is_counted_as_a_reset(jetstream_server, processes, tmp_path):
    url = jetstream_server.url
    extra = with_snapshot(tmp_path)
    consume_then_stop(processes, url, extra, [1, 2, 3, 4, 5, 6])  # final snapshot: sequence 6

    # Deleted and recreated while no aggregator ran: its sequence restarts at 1.
    stream_ops(url, delete=True, create={}, publish=[10, 20])
    second = processes.aggregator(url, *extra)
    want = {"applied": 2, "duplicates": 0, "last_sequence": 2, "snapshot_sequence": 0, "retention_gaps": 0,
            "reset_gaps": 1, "lost": 0, "isl": 21 + 30}  # snapshot sums + the new stream's events
    wait_until(lambda: journal(second.url) == want, 15, what=f"journal metrics {want}")
    assert "hit-rate stream was recreated since the snapshot" in second.output()

    # The file is rewritten for the new stream at shutdown, so a third start sees no reset.
    second.signal(signal.SIGTERM)
    assert second.popen.wait(15) == 0
    third = processes.aggregator(url, *extra)
    want.update(applied=0, reset_gaps=0, snapshot_sequence=2)
    wait_until(lambda: journal(third.url) == want, 15, what=f"journal metrics {want}")


def test_a_stream_recreated_and_refilled_past_the_snapshot_is_read_from_its_start(jetstream_server, processes,
                                                                                  tmp_path):
    url = jetstream_server.url
    extra = with_snapshot(tmp_path)
    consume_then_stop(processes, url, extra, [1, 2, 3])  # final snapshot: sequence 3 of the first stream

    # Recreated while no aggregator ran and refilled past sequence 3: a sequence check alone would
    # take events 1-3 of the new stream for ones already applied, and skip them.
    stream_ops(url, delete=True, create={}, publish=[10, 20, 30, 40, 50])
    second = processes.aggregator(url, *extra)
    want = {"applied": 5, "duplicates": 0, "last_sequence": 5, "snapshot_sequence": 0, "retention_gaps": 0,
            "reset_gaps": 1, "lost": 0, "isl": 6 + 150}
    wait_until(lambda: journal(second.url) == want, 15, what=f"journal metrics {want}")
    assert "hit-rate stream was recreated since the snapshot" in second.output()


def test_a_stream_gone_while_stopped_is_recreated_and_counted_as_a_reset(jetstream_server, processes, tmp_path):
    url = jetstream_server.url
    extra = with_snapshot(tmp_path, interval="0.2")
    consume_then_stop(processes, url, extra, [1, 2], signal.SIGKILL)  # periodic snapshot: sequence 2

    stream_ops(url, delete=True)  # nobody recreates it: the aggregator will
    second = processes.aggregator(url, *extra)
    wait_until(lambda: "hit-rate stream created" in second.output(), 15, what="stream recreated")
    stream_ops(url, publish=[7])
    want = {"applied": 1, "duplicates": 0, "last_sequence": 1, "snapshot_sequence": 1, "retention_gaps": 0,
            "reset_gaps": 1, "lost": 0, "isl": 3 + 7}
    wait_until(lambda: journal(second.url) == want, 15, what=f"journal metrics {want}")
    # The snapshot now names the new stream: a restart finds no reset.
    second.signal(signal.SIGKILL)
    second.popen.wait(15)
    third = processes.aggregator(url, *extra)
    want.update(applied=0, reset_gaps=0)
    wait_until(lambda: journal(third.url) == want, 15, what=f"journal metrics {want}")
