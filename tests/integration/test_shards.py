"""Shards split the fleet by component with no overlap and no gap, and their partials add up.

Real nats-server, real aggregator processes (M shards and one unsharded aggregator over the
same fleet, the reference), real mock workers publishing on several components, scrapes
parsed with prometheus_client. The split is nats-server's own partition function, so the
same fleet is also split by a real nats-server's `{{partition()}}` mapping, in front of the
aggregators as a leaf node (`--shard-subject-prefix`).
"""

from __future__ import annotations

import asyncio
import math
import random
from fractions import Fraction
from pathlib import Path

import nats
import pytest
from prometheus_client import CollectorRegistry

from aggregator.collectors.fleet_partials import FleetPartialsCollector
from aggregator.config import ConfigError, ShardConfig
from aggregator.ingest.shard_filter import ShardFilter
from aggregator.state.fleet import Fleet
from fleet_demo.nats_server import NatsServer, free_port
from fleet_protocol import ForwardPassMetrics, KvHitRateEvent, KvStats, LoadEvent, WorkerStats
from fleet_protocol.partitions import partition, partition_key
from fleet_runtime.nats_settle import settle

from ..support import ROOT, mock_worker, render_families, samples, scrape, wait_until

# Components chosen so that both M=2 and M=3 give every shard at least one (asserted below).
COMPONENTS = ("backend", "decode", "x1", "router")
WORKERS = 3
SHARD_LEAF_CONF = ROOT / "deploy" / "nats-server" / "shard-router.conf"


def worker_keys(families: dict) -> set[tuple]:
    """Every worker the aggregator holds, whatever it sent: one last-seen series each."""
    return set(samples(families, "llm_worker_last_seen_timestamp_seconds"))


def group_values(families: dict, name: str, sample_name: str | None = None) -> dict[tuple, float]:
    return samples(families, name, sample_name)


def summed(shards: list[dict], name: str, sample_name: str | None = None) -> dict[tuple, float]:
    total: dict[tuple, float] = {}
    for families in shards:
        for labels, value in group_values(families, name, sample_name).items():
            total[labels] = total.get(labels, 0.0) + value
    return total


# --- the partition function is nats-server's ------------------------------------------------

def test_partition_is_nats_servers_partition_mapping(tmp_path):
    names = [f"c{i}" for i in range(60)] + ["backend", "prefill", "decode", "x-y_z", "é"]
    config = tmp_path / "partition.conf"
    config.write_text("mappings = {\n"
                      + "".join(f'  "m{m}.*": "p{m}.{{{{partition({m},1)}}}}.{{{{wildcard(1)}}}}"\n' for m in (2, 3, 7))
                      + "}\n")

    async def partitions() -> dict[tuple[int, str], int]:
        found: dict[tuple[int, str], int] = {}
        nc = await nats.connect(server.url)

        async def got(msg) -> None:
            _, index, name = msg.subject.split(".", 2)
            found[(int(msg.subject[1:].split(".")[0]), name)] = int(index)

        await nc.subscribe("p2.>", cb=got)
        await nc.subscribe("p3.>", cb=got)
        await nc.subscribe("p7.>", cb=got)
        await settle(nc)
        for m in (2, 3, 7):
            for name in names:
                await nc.publish(f"m{m}.{name}", b"")
        await nc.flush()
        for _ in range(100):
            if len(found) == 3 * len(names):
                break
            await asyncio.sleep(0.05)
        await nc.close()
        return found

    with NatsServer(config=str(config)) as server:
        found = asyncio.run(partitions())
    assert found == {(m, name): partition(name, m) for m in (2, 3, 7) for name in names}
    assert {found[(3, name)] for name in names} == {0, 1, 2}  # a function that can fail: all partitions used


def test_partition_key_is_the_component_token_or_the_default_component():
    assert partition_key("namespace.ns.component.prefill.kv_metrics", "backend") == "prefill"
    assert partition_key("namespace.ns.component.prefill.endpoint.generate.kv_metrics", "backend") == "prefill"
    assert partition_key("namespace.ns.kv-hit-rate", "backend") == "backend"
    assert partition_key("namespace.ns.kv_metrics", "decode") == "decode"


def test_shard_config_is_checked():
    with pytest.raises(ConfigError) as error:
        ShardConfig(count=2, index=2)
    assert error.value.field == "index"
    with pytest.raises(ConfigError) as error:
        ShardConfig(count=0)
    assert error.value.field == "count"
    with pytest.raises(ConfigError) as error:
        ShardConfig(subject_prefix="shard")
    assert error.value.field == "subject_prefix"
    with pytest.raises(ConfigError) as error:
        ShardConfig(count=2, index=1, subject_prefix="a.b")
    assert error.value.field == "subject_prefix"


def test_a_pull_target_of_another_shard_is_refused():
    from aggregator.config import AggregatorConfig, PullConfig, ScrapeTarget

    other = 1 - partition("prefill", 2)
    with pytest.raises(ConfigError) as error:
        AggregatorConfig(pull=PullConfig((ScrapeTarget("prefill", "generate"),)), shard=ShardConfig(2, other))
    assert error.value.field == "pull.targets"
    AggregatorConfig(pull=PullConfig((ScrapeTarget("prefill", "generate"),)),
                     shard=ShardConfig(2, partition("prefill", 2)))


@pytest.mark.parametrize("count", [2, 3])
def test_every_subject_is_kept_by_exactly_one_shard(count):
    subjects = [f"namespace.ns.component.c{i}.kv_metrics" for i in range(200)]
    subjects += [f"namespace.ns.component.c{i}.endpoint.generate.kv_metrics" for i in range(200)]
    subjects += ["namespace.ns.kv-hit-rate", "namespace.ns.kv_metrics"]
    filters = [ShardFilter(ShardConfig(count, index), "backend") for index in range(count)]
    for subject in subjects:
        assert sum(f.keeps(subject) for f in filters) == 1, subject
    assert sum(f.skipped for f in filters) == (count - 1) * len(subjects)
    assert all(f.skipped < (count - 1) * len(subjects) for f in filters)  # each kept some


# --- the partials: exact sums, and what float64 does to them --------------------------------

def partial_fleet(loads: list[int], total: int = 1_000_000) -> Fleet:
    fleet = Fleet(stale_after=60.0, max_workers=len(loads) + 1)
    for worker_id, active in enumerate(loads):
        event = LoadEvent(worker_id=worker_id, data=ForwardPassMetrics(WorkerStats(1, 8), KvStats(active, total)))
        fleet.observe_load("backend", event, now=1.0)
    return fleet


def partials(fleet: Fleet) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(FleetPartialsCollector(fleet))
    families = render_families(registry)
    key = (("component", "backend"), ("endpoint", "generate"))
    return {name: samples(families, name)[key]
            for name in ("llm_load_workers", "llm_load_sum", "llm_load_sum_squares", "llm_kv_blocks_total_sum")}


def test_partials_are_the_exact_sums():
    loads = [0, 1, 5, 250, 7]
    values = partials(partial_fleet(loads, total=300))
    assert values == {"llm_load_workers": 5, "llm_load_sum": 263, "llm_load_sum_squares": 62_575,
                      "llm_kv_blocks_total_sum": 1500}
    # A worker seen only through a hit-rate event counts in llm_workers, not in the load partials.
    fleet = partial_fleet(loads, total=300)
    fleet.observe_hit_rate("backend", KvHitRateEvent(worker_id=99, isl_blocks=4, overlap_blocks=1), now=1.0)
    assert partials(fleet)["llm_load_workers"] == 5


def std_from_partials(n: float, s1: float, s2: float) -> float:
    """What deploy/prometheus/rules/fleet.rules.yml computes, in float64 as PromQL does."""
    mean = s1 / n
    return math.sqrt(max(s2 / n - mean * mean, 0.0))


@pytest.mark.parametrize("mean,spread,shards", [(50_000, 20_000, 1), (50_000, 500, 2), (400_000, 4_000, 4),
                                                (2_000, 2, 2)])
def test_std_from_exported_partials_is_within_the_stated_bound(mean, spread, shards):
    """100,000 workers of realistic KV sizes (an H200 holds up to ~10^6 blocks) over `shards` shards, summed
    in float64 as Prometheus does: the relative error of the std stays within (3M + 2) * 2^-53 *
    (1 + (avg/std)^2) (docs/sharding.md), and within 1e-9 where avg/std <= 1,000 and M <= 2."""
    rng = random.Random(mean + spread)
    loads = [max(0, int(rng.gauss(mean, spread))) for _ in range(100_000)]
    # Each shard exports its own exact sums, rounded to float64 once; Prometheus adds the floats.
    shard_values = [partials(partial_fleet(loads[index::shards])) for index in range(shards)]
    n, s1, s2 = (sum(v[name] for v in shard_values)
                 for name in ("llm_load_workers", "llm_load_sum", "llm_load_sum_squares"))
    if mean >= 300_000:
        assert s2 > 2**53  # beyond float64's exact integers: rounding happens
    exact_var = Fraction(sum(x * x for x in loads), len(loads)) - Fraction(sum(loads), len(loads)) ** 2
    exact_std = math.sqrt(exact_var)
    exact_mean = sum(loads) / len(loads)
    std = std_from_partials(n, s1, s2)
    bound = (3 * shards + 2) * 2**-53 * (1 + (exact_mean / exact_std) ** 2)
    assert abs(std - exact_std) / exact_std <= bound, (std, exact_std, bound)
    if exact_mean / exact_std <= 1_000 and shards <= 2:
        assert abs(std - exact_std) / exact_std <= 1e-9
    assert abs(s1 / n - exact_mean) / exact_mean <= 2 * shards * 2**-53


# --- real processes: M shards against one aggregator over the same fleet ---------------------

def start_fleet(processes, nats_url: str, *, hit_rate_on_namespace: bool = True) -> None:
    for number, component in enumerate(COMPONENTS):
        extra = ["--hit-rate-on-namespace"] if hit_rate_on_namespace and component == "backend" else []
        # Legacy 0.x JSON: the fleet statistics compared here include its hit-rate events.
        processes.add(mock_worker(nats_url, "--protocol", "legacy", "--component", component,
                                  "--workers", str(WORKERS), "--seed", str(number), "--interval", "0.2", "--freeze-after", "5",
                                  "--gpu-interval", "0.5", "--metrics-interval", "0.5", *extra))


def frozen_scrapes(urls: list[str], expected_workers: int) -> list[dict]:
    """Scrapes of every aggregator once the fleet stands still (two rounds alike)."""
    previous: list[dict] = []

    def settled():
        nonlocal previous
        rounds = [scrape(url) for url in urls]
        reference = rounds[-1]
        loaded = sum(group_values(reference, "llm_load_workers").values())
        stable = [{name: group_values(r, name) for name in ("llm_load_sum", "llm_load_sum_squares",
                                                               "llm_fleet_kv_hit_rate_isl_blocks")}
                  for r in rounds]
        same = stable == previous
        previous = stable
        return loaded == expected_workers and same and len(worker_keys(reference)) == expected_workers and rounds

    return wait_until(settled, 40, interval=0.7, what="every aggregator at the frozen fleet")


def check_split(shards: list[dict], whole: dict) -> None:
    keys = [worker_keys(families) for families in shards]
    everyone = worker_keys(whole)
    assert len(everyone) == len(COMPONENTS) * WORKERS
    assert all(keys), "a shard holds no worker: the split proves nothing"
    union = set().union(*keys)
    assert union == everyone, ("gap", everyone - union, "extra", union - everyone)
    assert sum(len(k) for k in keys) == len(everyone), "overlap: a worker is in two shards"
    # The partials add up to the whole fleet's, and the merged statistics are the whole fleet's.
    for name in ("llm_workers", "llm_load_workers", "llm_load_sum", "llm_load_sum_squares",
                 "llm_kv_blocks_total_sum"):
        assert summed(shards, name) == group_values(whole, name), name
    for name in ("llm_fleet_kv_hit_rate_isl_blocks", "llm_fleet_kv_hit_rate_overlap_blocks"):
        assert summed(shards, name, f"{name}_total") == group_values(whole, name, f"{name}_total"), name
    assert any(v > 0 for v in group_values(whole, "llm_fleet_kv_hit_rate_isl_blocks",
                                           "llm_fleet_kv_hit_rate_isl_blocks_total").values())
    n, s1, s2 = (summed(shards, name) for name in ("llm_load_workers", "llm_load_sum", "llm_load_sum_squares"))
    for group, average in group_values(whole, "llm_load_avg").items():
        assert math.isclose(s1[group] / n[group], average, rel_tol=1e-12)
        assert math.isclose(std_from_partials(n[group], s1[group], s2[group]),
                            group_values(whole, "llm_load_std")[group], rel_tol=1e-9, abs_tol=1e-9)


def skipped(families: dict) -> float:
    return samples(families, "llm_aggregator_shard_skipped_messages",
                   "llm_aggregator_shard_skipped_messages_total")[()]


@pytest.mark.parametrize("count", [2, 3])
def test_m_shards_hold_every_worker_exactly_once(nats_server, processes, count):
    assert {partition(c, count) for c in COMPONENTS} == set(range(count))
    whole = processes.aggregator(nats_server.url)
    shards = [processes.aggregator(nats_server.url, "--shards", str(count), "--shard", str(index))
              for index in range(count)]
    start_fleet(processes, nats_server.url)
    *shard_scrapes, whole_scrape = frozen_scrapes([a.url for a in shards] + [whole.url], len(COMPONENTS) * WORKERS)
    check_split(shard_scrapes, whole_scrape)
    for index, families in enumerate(shard_scrapes):
        info = samples(families, "llm_aggregator_shard_info")
        assert info == {(("shard", str(index)), ("shards", str(count))): 1.0}
        assert skipped(families) > 0  # received the others' messages and dropped them
    assert samples(whole_scrape, "llm_aggregator_shard_info") == {(("shard", "0"), ("shards", "1")): 1.0}


def test_shards_split_a_dynamo_1_fleet_on_zmq_found_through_discovery(nats_server, processes, tmp_path):
    """Dynamo 1.x workers on their default event plane (ZMQ), in a file discovery store: each shard puts its
    own components' instances and model cards only, and subscribes to their ZMQ publishers only."""
    discovery = ("--discovery-backend", "file", "--discovery-file-kv", str(tmp_path),
                 "--discovery-file-scan-interval", "0.1")
    whole = processes.aggregator(nats_server.url, *discovery)
    shards = [processes.aggregator(nats_server.url, *discovery, "--shards", "2", "--shard", str(index))
              for index in (0, 1)]
    for number, component in enumerate(COMPONENTS):
        processes.add(mock_worker(nats_server.url, "--protocol", "dynamo-1", "--event-plane", "zmq",
                                  "--discovery-file-kv", str(tmp_path), "--component", component,
                                  "--workers", str(WORKERS), "--seed", str(number), "--interval", "0.2"))
    publishers_per_worker = 3  # kv_metrics, kv-events, forward-pass-metrics

    def publishers(families: dict) -> float:
        return samples(families, "llm_aggregator_zmq_publishers")[()]

    def everyone_everywhere():
        rounds = [scrape(a.url) for a in (*shards, whole)]
        *split, reference = rounds
        ranks = set(samples(reference, "llm_kv_blocks_total"))
        done = (len(worker_keys(reference)) == len(COMPONENTS) * WORKERS
                and publishers(reference) == publishers_per_worker * len(COMPONENTS) * WORKERS
                and set(samples(reference, "llm_kv_blocks_active")) == ranks
                and sum(publishers(f) for f in split) == publishers(reference)
                and all(set(samples(f, "llm_kv_blocks_active")) == set(samples(f, "llm_kv_blocks_total"))
                        for f in split))
        return done and rounds

    *split, reference = wait_until(everyone_everywhere, 30, interval=0.5,
                                   what="every worker, its capacity and its load over ZMQ, in the whole and the shards")
    keys = [worker_keys(families) for families in split]
    assert all(keys) and set().union(*keys) == worker_keys(reference)
    assert sum(len(k) for k in keys) == len(worker_keys(reference)), "overlap: a worker is in two shards"
    for index, families in enumerate(split):
        owned = {c for c in COMPONENTS if partition(c, 2) == index}
        assert {dict(labels)["component"] for labels in worker_keys(families)} == owned
        assert publishers(families) == publishers_per_worker * WORKERS * len(owned)
        assert skipped(families) > 0  # the other shard's entries and channels, passed over
    # Capacity comes from the model cards: the shards' totals add up to the whole fleet's.
    assert summed(split, "llm_kv_blocks_total_sum") == group_values(reference, "llm_kv_blocks_total_sum")
    assert summed(split, "llm_workers") == group_values(reference, "llm_workers")


@pytest.fixture
def hub_and_shard_router(tmp_path):
    """The fleet's nats-server, and deploy/nats-server/shard-router.conf running as its leaf node."""
    leaf_port = free_port()
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(f"leafnodes {{ host: 127.0.0.1, port: {leaf_port} }}\n")
    hub = NatsServer(config=str(hub_conf))
    text = SHARD_LEAF_CONF.read_text()
    remotes = '["nats-leaf://nats-1:7422", "nats-leaf://nats-2:7422", "nats-leaf://nats-3:7422"]'
    assert remotes in text
    router_conf = tmp_path / "shard-router.conf"
    # Ports from the command line (NatsServer's -p), the monitoring port and the hub on loopback.
    router_conf.write_text(text.replace(remotes, f'["nats-leaf://127.0.0.1:{leaf_port}"]')
                           .replace("http_port: 8222", f"http_port: {free_port()}"))
    router = NatsServer(config=str(router_conf))
    hub.start()
    try:
        router.start()
        try:
            yield hub, router
        finally:
            router.stop()
    finally:
        hub.stop()


def test_nats_server_splits_the_subjects_for_the_shards(hub_and_shard_router, processes):
    """deploy/nats-server/shard-router.conf: 2 partitions made by nats-server; each shard receives its
    own component subjects only (none to skip), namespace-level ones are kept by their owner."""
    hub, router = hub_and_shard_router
    assert "partition(2," in Path(router.config).read_text()
    whole = processes.aggregator(hub.url)
    shards = [processes.aggregator(router.url, "--shards", "2", "--shard", str(index),
                                   "--shard-subject-prefix", "shard") for index in range(2)]
    start_fleet(processes, hub.url, hit_rate_on_namespace=False)
    *shard_scrapes, whole_scrape = frozen_scrapes([a.url for a in shards] + [whole.url], len(COMPONENTS) * WORKERS)
    check_split(shard_scrapes, whole_scrape)
    assert [skipped(families) for families in shard_scrapes] == [0, 0]


def test_shards_reading_the_hit_rate_stream_keep_their_own_events(processes, tmp_path):
    """--hit-rate-stream: every shard reads the whole stream and sums its own components' events only."""
    import fleet_protocol as protocol

    from ..support import publish

    with NatsServer(jetstream=True) as server:
        shards = [processes.aggregator(server.url, "--shards", "2", "--shard", str(index), "--hit-rate-stream",
                                       "SHARDHITS", "--hit-rate-snapshot", str(tmp_path / f"shard-{index}.json"))
                  for index in range(2)]

        async def stream_exists() -> bool:
            nc = await nats.connect(server.url)
            try:
                await nc.jetstream().stream_info("SHARDHITS")
                return True
            finally:
                await nc.close()

        wait_until(lambda: asyncio.run(stream_exists()), 15, what="the hit-rate stream")
        events = []
        for number, component in enumerate(COMPONENTS):
            for worker in range(3):
                event = protocol.KvHitRateEvent(worker_id=1000 * number + worker, isl_blocks=10 + number,
                                                overlap_blocks=number)
                events.append((component, event, protocol.component_subject("dynamo", component,
                                                                            protocol.KV_HIT_RATE)))
        publish(server.url, [(subject, protocol.encode(event)) for _, event, subject in events])
        want = [sum(e.isl_blocks for c, e, _ in events if partition(c, 2) == index) for index in range(2)]
        assert all(want)

        def sums():
            found = [sum(group_values(scrape(a.url), "llm_fleet_kv_hit_rate_isl_blocks",
                                      "llm_fleet_kv_hit_rate_isl_blocks_total").values()) for a in shards]
            return found == want and found

        wait_until(sums, 20, what="each shard's hit-rate sums")
        for aggregator in shards:
            families = scrape(aggregator.url)
            applied = samples(families, "llm_aggregator_hit_rate_journal_applied",
                              "llm_aggregator_hit_rate_journal_applied_total")[()]
            assert applied == len(events)  # each read every event of the stream, in order
            keys = worker_keys(families)
            assert keys and all(partition(dict(k)["component"], 2) == shards.index(aggregator) for k in keys)


def test_a_scrape_of_the_partials_asks_no_collector_of_per_worker_series():
    """What a fleet-level Prometheus selects (`/metrics?name[]=`, bench/scale.py's PARTIAL_SERIES) is
    registered by collectors of group series only, so selecting it renders no worker's series."""
    from aggregator.collectors.fleet_kv import FleetCollector
    from aggregator.collectors.gpus import GpuCollector
    from aggregator.config import AggregatorConfig
    from aggregator.service import Aggregator
    from bench.scale import PARTIAL_SERIES

    registry = Aggregator(AggregatorConfig()).registry
    owners = [collector for collector, names in registry._collector_to_names.items()
              if set(PARTIAL_SERIES) & set(names)]
    assert {name for collector in owners for name in registry._collector_to_names[collector]} >= set(PARTIAL_SERIES)
    assert not [c for c in owners if isinstance(c, (FleetCollector, GpuCollector))]
