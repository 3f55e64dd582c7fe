"""The aggregator killed (SIGKILL) or stopped (SIGTERM) and restarted: no hit-rate history lost.

Real nats-server with JetStream, the real aggregator process with --hit-rate-stream, events
published with a real client from a separate process while the aggregator is killed.
"""

from __future__ import annotations

import json
import signal
import sys

import msgspec
import pytest

from aggregator.edges.hit_rate_journal import Snapshot
from fleet_demo.nats_server import NatsServer

from ..support import Process, http_get, samples, scrape, wait_until

PUBLISHER = """
import asyncio, json, sys
import nats

async def main(url, start, count, pause):
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(start, start + count):
        worker = i % 5
        subject = ("namespace.dynamo.kv-hit-rate" if worker == 4
                   else f"namespace.dynamo.component.c{worker % 2}.kv-hit-rate")
        event = {"worker_id": worker, "isl_blocks": 10 + i % 7, "overlap_blocks": i % 7}
        await js.publish(subject, json.dumps(event).encode())  # acked by the stream: stored
        if pause:
            await asyncio.sleep(pause)
    await nc.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
"""


def expected_sums(count: int):
    workers: dict[tuple[str, str], list[int]] = {}
    groups: dict[str, list[int]] = {}
    for i in range(count):
        worker = i % 5
        component = "backend" if worker == 4 else f"c{worker % 2}"
        isl, overlap = 10 + i % 7, i % 7
        for table, key in ((workers, (component, str(worker))), (groups, component)):
            sums = table.setdefault(key, [0, 0])
            sums[0] += isl
            sums[1] += overlap
    return workers, groups


def exported_sums(url: str):
    families = scrape(url)
    isl = samples(families, "llm_kv_hit_rate_isl_blocks", "llm_kv_hit_rate_isl_blocks_total")
    overlap = samples(families, "llm_kv_hit_rate_overlap_blocks", "llm_kv_hit_rate_overlap_blocks_total")
    workers = {(dict(k)["component"], dict(k)["worker_id"]): [v, overlap[k]] for k, v in isl.items()}
    fleet_isl = samples(families, "llm_fleet_kv_hit_rate_isl_blocks", "llm_fleet_kv_hit_rate_isl_blocks_total")
    fleet_overlap = samples(families, "llm_fleet_kv_hit_rate_overlap_blocks",
                            "llm_fleet_kv_hit_rate_overlap_blocks_total")
    groups = {dict(k)["component"]: [v, fleet_overlap[k]] for k, v in fleet_isl.items()}
    return workers, groups


@pytest.fixture
def jetstream_server():
    with NatsServer(jetstream=True) as server:
        yield server


def publisher(url: str, start: int, count: int, pause: float) -> Process:
    return Process([sys.executable, "-c", PUBLISHER, url, str(start), str(count), str(pause)])


@pytest.mark.parametrize("with_snapshot", [True, False], ids=["snapshot+replay", "full-replay"])
def test_sigkill_mid_stream_loses_no_hit_rate_history(jetstream_server, processes, tmp_path, with_snapshot):
    url = jetstream_server.url
    snapshot = tmp_path / "hit-rate.json"
    extra = ["--hit-rate-stream", "HITRATE", "--stale-after", "600", "--hit-rate-snapshot-interval", "0.2"]
    if with_snapshot:
        extra += ["--hit-rate-snapshot", str(snapshot)]
    first = processes.aggregator(url, *extra)
    wait_until(lambda: "consuming hit-rate events" in first.output(), 15, what="stream consumer")

    total = 400
    sender = processes.add(publisher(url, 0, total, 0.002))
    # Kill it mid-way: some events applied (and, with a snapshot, some written), more still coming.
    wait_until(lambda: sum(v[0] for v in exported_sums(first.url)[1].values()) > 0, 15, what="first events")
    if with_snapshot:
        wait_until(lambda: snapshot.exists() and msgspec.json.decode(snapshot.read_bytes(), type=Snapshot).last_seq,
                   10, what="a snapshot with events written")
    first.signal(signal.SIGKILL)
    first.popen.wait(10)
    assert sender.popen.wait(60) == 0, sender.output()  # the rest was published while no aggregator ran
    if with_snapshot:
        written = msgspec.json.decode(snapshot.read_bytes(), type=Snapshot)
        assert 0 < written.last_seq < total  # killed mid-way: the restart must replay the rest

    second = processes.aggregator(url, *extra)
    want_workers, want_groups = expected_sums(total)
    wait_until(lambda: exported_sums(second.url) == (want_workers, want_groups), 30,
               what=f"sums of all {total} events after the restart")


def test_sigterm_drains_writes_final_state_and_closes_http(jetstream_server, processes, tmp_path):
    url = jetstream_server.url
    snapshot = tmp_path / "hit-rate.json"
    extra = ["--hit-rate-stream", "HITRATE", "--hit-rate-snapshot", str(snapshot),
             "--hit-rate-snapshot-interval", "3600", "--stale-after", "600"]
    aggregator = processes.aggregator(url, *extra)
    wait_until(lambda: "consuming hit-rate events" in aggregator.output(), 15, what="stream consumer")
    assert processes.add(publisher(url, 0, 50, 0)).popen.wait(30) == 0
    want = expected_sums(50)
    wait_until(lambda: exported_sums(aggregator.url) == want, 15, what="all 50 events applied")
    assert not snapshot.exists()  # the periodic snapshot is an hour away: only shutdown can write it

    aggregator.signal(signal.SIGTERM)
    assert aggregator.popen.wait(15) == 0
    assert msgspec.json.decode(snapshot.read_bytes(), type=Snapshot).last_seq == 50
    with pytest.raises(OSError):
        http_get(f"{aggregator.url}/live", timeout=2)
    output = aggregator.output()
    assert output.index("shutting down") < output.index("hit-rate snapshot written") < output.index("stopped")

    # The snapshot alone (no replay needed) restores the sums.
    restarted = processes.aggregator(url, *extra)
    wait_until(lambda: exported_sums(restarted.url) == want, 15, what="sums restored from the final snapshot")


def test_without_the_flag_hit_rate_events_come_from_core_nats(jetstream_server, processes):
    aggregator = processes.aggregator(jetstream_server.url)
    from ..support import publish

    publish(jetstream_server.url, [("namespace.dynamo.kv-hit-rate",
                                    json.dumps({"worker_id": 1, "isl_blocks": 4, "overlap_blocks": 1}).encode())])
    wait_until(lambda: exported_sums(aggregator.url)[1] == {"backend": [4, 1]}, 10, what="core NATS event")
    assert "consuming hit-rate events" not in aggregator.output()
