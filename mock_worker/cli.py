"""`python -m mock_worker`'s flags with environment-variable defaults, turned into a MockWorkerConfig."""

from __future__ import annotations

from dataclasses import MISSING
from typing import Any

from fleet_runtime.config_checks import ConfigError, field_named
from fleet_runtime.flags import (
    Flag,
    OneLineParser,
    config_error,
    field_flags,
    nats_url_list,
)

from .config import MockWorkerConfig
from .fleet import SHAPES


def optional_path(value: str) -> str | None:
    """A directory; empty means none (an exported but empty variable)."""
    return value or None


FLAGS: tuple[Flag, ...] = (
    Flag("--nats-url", "NATS_SERVER", "nats_urls", nats_url_list, "NATS server URL(s)"),
    Flag("--namespace", "DYN_NAMESPACE", "namespace", str, "Dynamo namespace"),
    Flag("--component", "MOCK_WORKER_COMPONENT", "component", str, "component name"),
    Flag("--endpoint", "MOCK_WORKER_ENDPOINT", "endpoint", str, "endpoint name"),
    Flag("--workers", "MOCK_WORKER_COUNT", "workers", int, "simulated workers in this process"),
    Flag("--dp-ranks", "MOCK_WORKER_DP_RANKS", "dp_ranks", int, "data-parallel ranks per worker"),
    Flag("--interval", "MOCK_WORKER_INTERVAL", "interval", float,
         "seconds between stats messages (simulated time advances by the same amount)"),
    Flag("--seed", "MOCK_WORKER_SEED", "seed", int, "random seed; the same seed gives the same run"),
    # --shape and --hit-rate-on-namespace come here (see parser)
    Flag("--mode", "MOCK_WORKER_MODE", "mode", str,
         "push: publish kv_metrics; pull: serve it as NATS micro service stats, as Dynamo 0.x did "
         "(legacy only: needs --protocol legacy)"),
    Flag("--freeze-after", "MOCK_WORKER_FREEZE_AFTER", "freeze_after", int,
         "simulated steps after which the engines hold still and stop producing hit-rate events "
         "(0 = never); a fixed state to compare runs by"),
    Flag("--gpu", "MOCK_WORKER_GPU", "gpu", str,
         "GPU readings to publish on ...gpu_metrics: simulated (follow the simulated load), "
         "nvml (this host's GPUs through NVML; none found = empty reports with the reason), none"),
    Flag("--gpus-per-worker", "MOCK_WORKER_GPUS_PER_WORKER", "gpus_per_worker", int,
         "simulated GPUs per worker (per data-parallel rank)"),
    Flag("--gpu-interval", "MOCK_WORKER_GPU_INTERVAL", "gpu_interval", float,
         "seconds between GPU readings; keep it below the aggregator's --stale-after"),
    Flag("--duration", "MOCK_WORKER_DURATION", "duration", float,
         "stop after this many seconds (0 = run until interrupted)"),
    Flag("--metrics-interval", "MOCK_WORKER_METRICS_INTERVAL", "metrics_interval", float,
         "seconds between MetricsRegistry snapshots (namespace.{ns}.component.{c}.metrics)"),
    Flag("--protocol", "MOCK_WORKER_PROTOCOL", "protocol", str,
         "what the workers speak: dynamo-1 (Dynamo 1.x: ActiveLoad on kv_metrics, ForwardPassMetrics v1, "
         "kv-events, in MessagePack envelopes on the event plane) or legacy (Dynamo 0.1-0.5: JSON LoadEvent "
         "and kv-hit-rate events; --shape, --hit-rate-on-namespace and --mode pull need it); GPU readings and "
         "metric snapshots are the same in both"),
    Flag("--event-plane", "DYN_EVENT_PLANE", "event_plane", str,
         "dynamo-1's event plane: nats (namespace.{ns}.component.{c}.endpoint.{e}.{topic}) or zmq "
         "(a PUB socket per publisher, advertised in --discovery-file-kv)"),
    Flag("--event-plane-host", "DYN_EVENT_PLANE_HOST", "event_plane_host", str,
         "IP address the ZMQ publishers bind and advertise"),
    Flag("--discovery-file-kv", "DYN_FILE_KV", "discovery_file_kv", optional_path,
         "dynamo-1: Dynamo's file discovery directory, to register each worker, its model card "
         "(runtime_config) and its publishers in (removed on a clean stop); without it the workers still "
         "publish their load, but no capacity (Dynamo 1.x keeps total KV blocks and slots in discovery only: "
         "no llm_kv_blocks_total, no llm_requests_total_slots)"),
)

FIELD_FLAGS = {
    **field_flags(FLAGS),
    "shape": ("--shape", None),
    "hit_rate_on_namespace": ("--hit-rate-on-namespace", None),
    "component_metrics": ("--no-component-metrics", None),
}


def default_of(flag: Flag) -> Any:
    """The config field's default, written as the flag would be."""
    default = field_named(MockWorkerConfig, flag.field).default
    if default is MISSING:
        return None
    return ",".join(default) if isinstance(default, tuple) else default


def parser() -> OneLineParser:
    p = OneLineParser(prog="mock_worker", description="Simulated LLM inference workers publishing over NATS.")
    for flag in FLAGS:
        if flag.name == "--mode":
            shape = field_named(MockWorkerConfig, "shape").default
            p.add_argument("--shape", choices=SHAPES, default=shape,
                           help=f"legacy: ForwardPassMetrics shape to send (all three are Dynamo 0.x's); default {shape}")
            p.add_argument("--hit-rate-on-namespace", action="store_true",
                           help="legacy: publish hit-rate events on namespace.{ns}.kv-hit-rate as Dynamo 0.x's router did")
        flag.add_to(p, default_of(flag))
    p.add_argument("--no-component-metrics", dest="component_metrics", action="store_false",
                   help="serve no MetricsRegistry: no endpoint metrics, no snapshots, no status server")
    return p


def parse_config(argv: list[str] | None = None) -> MockWorkerConfig:
    """The configuration the command line and environment describe; a bad one exits with one line."""
    p = parser()
    args = vars(p.parse_args(argv))
    values = {flag.field: args[flag.dest] for flag in FLAGS}
    try:
        return MockWorkerConfig(**values, shape=args["shape"], hit_rate_on_namespace=args["hit_rate_on_namespace"],
                                component_metrics=args["component_metrics"])
    except ConfigError as error:
        config_error(p, error, FIELD_FLAGS)
