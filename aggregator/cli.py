"""Command-line flags with environment-variable defaults, validated at start.

One way to configure: every setting is a flag; its default comes from an environment
variable (Dynamo's name where Dynamo had one, AGGREGATOR_* otherwise), and an invalid
value, from either source, stops the program with one line naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import os

import fleet_protocol as protocol
from aggregator.component_metrics import DEFAULT_PREFIXES, check_prefix
from fleet_runtime.flags import (
    OneLineParser,
    bounded,
    choice,
    env_flag,
    ip_address,
    label_value,
    nats_token,
    nats_urls,
    port,
)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="aggregator",
        description="Aggregates LLM worker metrics from NATS and exports them for Prometheus.",
    )
    env_flag(parser, "--nats-url", "NATS_SERVER", "nats://localhost:4222", nats_urls,
             "NATS server URL(s), comma-separated")
    env_flag(parser, "--namespace", "DYN_NAMESPACE", protocol.DEFAULT_NAMESPACE, nats_token, "Dynamo namespace")
    env_flag(parser, "--component", "AGGREGATOR_COMPONENT", protocol.DEFAULT_COMPONENT, nats_token,
             "component label for namespace-level subjects (namespace.{ns}.kv_metrics, .kv-hit-rate)")
    env_flag(parser, "--endpoint", "AGGREGATOR_ENDPOINT", protocol.DEFAULT_ENDPOINT, label_value,
             "endpoint label for hit-rate events of workers that never reported load")
    env_flag(parser, "--host", "AGGREGATOR_HOST", "0.0.0.0", ip_address, "HTTP bind address")
    env_flag(parser, "--port", "AGGREGATOR_PORT", 9091, port, "HTTP port for /metrics, /health, /live")
    env_flag(parser, "--stale-after", "AGGREGATOR_STALE_AFTER", 10.0, bounded(float, 0.1, 86400.0),
             "seconds of silence after which a worker and all its series are dropped")
    env_flag(parser, "--max-message-bytes", "AGGREGATOR_MAX_MESSAGE_BYTES", 256 * 1024,
             bounded(int, 256, 64 * 1024 * 1024), "larger messages are rejected (reason=oversized)")
    env_flag(parser, "--max-workers", "AGGREGATOR_MAX_WORKERS", 100_000, bounded(int, 1, 10_000_000),
             "live workers kept at most; new ones past it are refused (reason=worker_limit)")
    env_flag(parser, "--max-groups", "AGGREGATOR_MAX_GROUPS", 10_000, bounded(int, 1, 1_000_000),
             "component/endpoint pairs kept at most (their totals outlive their workers); past it the pair "
             "idle longest (no live worker) is evicted for a new one (llm_aggregator_groups_evicted_total), "
             "which is refused (reason=group_limit) only while every pair has a live worker")
    env_flag(parser, "--pending-msgs-limit", "AGGREGATOR_PENDING_MSGS_LIMIT", 512 * 1024,
             bounded(int, 1, 100_000_000), "per-subscription NATS buffer, messages; past it NATS drops (counted)")
    add_scrape_flags(parser)
    env_flag(parser, "--pending-bytes-limit", "AGGREGATOR_PENDING_BYTES_LIMIT", 128 * 1024 * 1024,
             bounded(int, 1024, 64 * 1024**3), "per-subscription NATS buffer, bytes; past it NATS drops (counted)")
    env_flag(parser, "--nats-ping-interval", "AGGREGATOR_NATS_PING_INTERVAL", 5.0, bounded(float, 0.2, 600.0),
             "seconds between pings; 2 unanswered pings mark a frozen server as disconnected")
    env_flag(parser, "--web-config-file", "AGGREGATOR_WEB_CONFIG_FILE", None, str,
             "exporter-toolkit web config (YAML): TLS and basic auth for the HTTP endpoint")
    _http_limit_flags(parser)
    from aggregator.edges import (
        hit_rate_journal,  # they import this module
        nats_auth,
    )

    nats_auth.add_flags(parser)
    hit_rate_journal.add_flags(parser)
    _component_metrics_flags(parser)
    env_flag(parser, "--gpu-hostname-label", "AGGREGATOR_GPU_HOSTNAME_LABEL", "Hostname",
             choice(("Hostname", "hostname")),
             "name of the node label on DCGM_FI_* series: dcgm-exporter's released 'Hostname', "
             "or 'hostname' as on its main branch since PR #655 (joins with Slurm's label)")
    return parser


def _http_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's limits, as Prometheus's exporters have them (Go's net/http timeouts,
    Prometheus's --web.max-connections, node_exporter's --web.max-requests)."""
    group = parser.add_argument_group("HTTP limits")
    env_flag(group, "--http-max-connections", "AGGREGATOR_HTTP_MAX_CONNECTIONS", 512, bounded(int, 1, 1_000_000),
             "open HTTP connections at most; past it no new one is accepted until one closes "
             "(keep it below the open-files limit, ulimit -n)")
    env_flag(group, "--http-header-timeout", "AGGREGATOR_HTTP_HEADER_TIMEOUT", 5.0, bounded(float, 0.1, 3600.0),
             "seconds a new connection has to send a complete request header (and to finish a TLS "
             "handshake); then it is closed")
    env_flag(group, "--http-idle-timeout", "AGGREGATOR_HTTP_IDLE_TIMEOUT", 90.0, bounded(float, 0.1, 86400.0),
             "seconds a keep-alive connection may wait for its next request after a response; then it is "
             "closed (above Prometheus's scrape interval, so it keeps its connection)")
    env_flag(group, "--http-write-timeout", "AGGREGATOR_HTTP_WRITE_TIMEOUT", 30.0, bounded(float, 0.1, 3600.0),
             "seconds a /metrics scrape may take, render and transfer; past it the connection is closed "
             "(a client that stops reading holds neither a slot nor memory longer)")
    env_flag(group, "--http-max-scrapes", "AGGREGATOR_HTTP_MAX_SCRAPES", 40, bounded(int, 1, 100_000),
             "/metrics scrapes in flight at most; past it 503 with Retry-After at once")


def prefixes(value: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in value.split(",") if p.strip())
    if not items:
        raise ValueError("no prefix given")
    return tuple(check_prefix(p) for p in items)


def _component_metrics_flags(parser: argparse.ArgumentParser) -> None:
    """Workers' MetricsRegistry snapshots (namespace.{ns}.component.{c}.metrics), re-exported."""
    env_flag(parser, "--component-metrics-prefixes", "AGGREGATOR_COMPONENT_METRICS_PREFIXES",
             ",".join(DEFAULT_PREFIXES), prefixes,
             "comma-separated name prefixes a worker's metrics may use; others are rejected (reason=bad_name)")
    env_flag(parser, "--component-metrics-max-bytes", "AGGREGATOR_COMPONENT_METRICS_MAX_BYTES", 1024 * 1024,
             bounded(int, 1024, 64 * 1024 * 1024), "larger snapshots are rejected (reason=oversized)")
    env_flag(parser, "--component-metrics-max-series-per-worker", "AGGREGATOR_COMPONENT_METRICS_MAX_SERIES_PER_WORKER",
             5_000, bounded(int, 1, 10_000_000), "a snapshot with more series is rejected (reason=series_limit)")
    env_flag(parser, "--component-metrics-max-series", "AGGREGATOR_COMPONENT_METRICS_MAX_SERIES", 100_000,
             bounded(int, 1, 100_000_000),
             "series of all workers' snapshots together; a snapshot past it is rejected (reason=series_limit)")


def parse_aggregator_args(argv: list[str] | None = None) -> argparse.Namespace:
    from aggregator.edges import nats_auth, web_config

    parser = build_parser()
    args = check_scrape_args(parser, parser.parse_args(argv))
    problem = nats_auth.check(args)
    if problem:
        parser.error(problem)
    args.web_config = web_config.WebConfig()
    if args.web_config_file:
        try:
            args.web_config = web_config.load(args.web_config_file)
        except web_config.WebConfigError as error:
            parser.error(f"--web-config-file: {error}")
    return args


# Pull mode (NATS service stats) ---------------------------------------------------------

MIN_POLL_INTERVAL = 0.1
_SCRAPE_ENV = "AGGREGATOR_SCRAPE"


def scrape_target(value: str):
    from aggregator.ingest.stats_replies import ScrapeTarget

    component, slash, endpoint = value.strip().partition("/")
    if not slash:
        raise ValueError(f"{value!r} is not COMPONENT/ENDPOINT (e.g. backend/generate)")
    return ScrapeTarget(nats_token(component), nats_token(endpoint))


def _scrape_flag(value: str):
    try:
        return scrape_target(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_scrape_flags(parser: argparse.ArgumentParser) -> None:
    # Repeatable, so the env default is applied after parsing (argparse would append flags to it).
    parser.add_argument(
        "--scrape", action="append", type=_scrape_flag, default=None, metavar="COMPONENT/ENDPOINT",
        help=f"poll the NATS service stats of this component's workers, Dynamo-style (repeatable; "
             f"env {_SCRAPE_ENV}, comma-separated); default none",
    )
    env_flag(parser, "--poll-interval", "AGGREGATOR_POLL_INTERVAL", 1.0, bounded(float, MIN_POLL_INTERVAL, 3600.0),
             "seconds between stats requests in pull mode")
    env_flag(parser, "--scrape-timeout", "AGGREGATOR_SCRAPE_TIMEOUT", None, bounded(float, 0.01, 3600.0),
             "seconds to collect stats replies, below --poll-interval; None means 0.8 x --poll-interval")


def check_scrape_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the env default of --scrape and check the pull-mode settings against each other."""
    from aggregator.ingest.stats_replies import plan_services

    if args.scrape is None:
        raw = os.environ.get(_SCRAPE_ENV, "")
        targets = []
        for item in (part for part in raw.split(",") if part.strip()):
            try:
                targets.append(scrape_target(item))
            except ValueError as error:
                parser.error(f"argument --scrape: {error} (env {_SCRAPE_ENV})")
        args.scrape = targets
    if args.scrape_timeout is None:
        args.scrape_timeout = round(0.8 * args.poll_interval, 6)
    if args.scrape_timeout >= args.poll_interval:
        parser.error(f"argument --scrape-timeout: {args.scrape_timeout} must be below --poll-interval "
                     f"{args.poll_interval}")
    if args.scrape and args.poll_interval >= args.stale_after:
        parser.error(f"argument --poll-interval: {args.poll_interval} must be below --stale-after "
                     f"{args.stale_after}, or every scraped worker would expire between polls")
    try:
        plan_services(args.namespace, args.scrape)
    except ValueError as error:
        parser.error(f"argument --scrape: {error}")
    return args
