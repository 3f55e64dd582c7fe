"""Command-line flags with environment-variable defaults, turned into an `AggregatorConfig`.

The one module of the aggregator that knows argparse and the environment. Every setting is
a flag; its default comes from an environment variable (Dynamo's name where Dynamo had one,
AGGREGATOR_* otherwise), else from the config dataclass. Here a flag's text becomes a typed
value; whether that value can work is for `aggregator.config` to say, and an invalid value,
from either source, stops the program with one line naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from aggregator.config import (
    AggregatorConfig,
    ComponentMetricsConfig,
    ConfigError,
    HttpConfig,
    JournalConfig,
    LimitsConfig,
    NatsConfig,
    PullConfig,
    PushGatewayConfig,
    RemoteWriteConfig,
    ScrapeTarget,
)
from aggregator.edges import nats_auth, web_config
from fleet_runtime.config_checks import check_field, field_named
from fleet_runtime.flags import (
    Flag,
    OneLineParser,
    comma_list,
    config_error,
    field_flags,
)

# Where each flag's value lands: AggregatorConfig's field, or the field of one of its sections.
SECTIONS: Mapping[str, type] = {
    "": AggregatorConfig,
    "nats": NatsConfig,
    "http": HttpConfig,
    "limits": LimitsConfig,
    "component_metrics": ComponentMetricsConfig,
    "journal": JournalConfig,
    "pull": PullConfig,
    "push_gateway": PushGatewayConfig,
    "remote_write": RemoteWriteConfig,
}
# Sections that are off (None) unless their first field's flag is given: {section: that field}.
OPTIONAL_SECTIONS: Mapping[str, str] = {"journal": "stream", "push_gateway": "url", "remote_write": "url"}

NATS_AUTH = "NATS authentication and TLS"
JOURNAL = "hit-rate history across restarts (JetStream)"
PUSH = "push where nothing can scrape (Pushgateway, remote write)"


def default_of(flag: Flag) -> Any:
    """The default of the config field a flag sets, written as the flag would be."""
    section, _, name = flag.field.rpartition(".")
    default = field_named(SECTIONS[section], name).default
    if default is MISSING:
        return None
    if isinstance(default, tuple):
        return ",".join(default)
    return default


def _secret(value: str) -> str:
    """A password or token, or `@FILE` holding it (a mounted secret)."""
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return path.read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from None
    return value


def _readable_file(value: str) -> str:
    try:
        with Path(value).open("rb"):
            pass
    except OSError as error:
        raise ValueError(f"cannot read {value}: {error.strerror}") from None
    return value


def _optional_path(value: str) -> str | None:
    return value or None  # an empty variable means none


def _optional_url(value: str) -> str | None:
    return value or None  # an empty variable means off


def label_pairs(value: str) -> tuple[tuple[str, str], ...]:
    """`a=1, b=2` -> (("a", "1"), ("b", "2")): labels written in one flag or variable."""
    pairs = []
    for item in comma_list(value):
        name, equals, label = item.partition("=")
        if not equals:
            raise ValueError(f"{item!r} is not NAME=VALUE")
        pairs.append((name.strip(), label.strip()))
    return tuple(pairs)


def scrape_target(value: str) -> ScrapeTarget:
    component, slash, endpoint = value.strip().partition("/")
    if not slash:
        raise ValueError(f"{value!r} is not COMPONENT/ENDPOINT (e.g. backend/generate)")
    try:
        return ScrapeTarget(component, endpoint)
    except ConfigError as error:
        raise ValueError(error.explain()) from None


def _scrape_flag(value: str) -> ScrapeTarget:
    try:
        return scrape_target(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_SCRAPE_ENV = "AGGREGATOR_SCRAPE"

FLAGS: tuple[Flag, ...] = (
    Flag("--nats-url", "NATS_SERVER", "nats.urls", comma_list, "NATS server URL(s), comma-separated"),
    Flag("--namespace", "DYN_NAMESPACE", "namespace", str, "Dynamo namespace"),
    Flag("--component", "AGGREGATOR_COMPONENT", "component", str,
         "component label for namespace-level subjects (namespace.{ns}.kv_metrics, .kv-hit-rate)"),
    Flag("--endpoint", "AGGREGATOR_ENDPOINT", "endpoint", str,
         "endpoint label for hit-rate events of workers that never reported load"),
    Flag("--host", "AGGREGATOR_HOST", "http.host", str, "HTTP bind address"),
    Flag("--port", "AGGREGATOR_PORT", "http.port", int, "HTTP port for /metrics, /health, /live"),
    Flag("--stale-after", "AGGREGATOR_STALE_AFTER", "limits.stale_after", float,
         "seconds of silence after which a worker and all its series are dropped"),
    Flag("--max-message-bytes", "AGGREGATOR_MAX_MESSAGE_BYTES", "limits.max_message_bytes", int,
         "larger messages are rejected (reason=oversized)"),
    Flag("--max-workers", "AGGREGATOR_MAX_WORKERS", "limits.max_workers", int,
         "live workers kept at most; new ones past it are refused (reason=worker_limit)"),
    Flag("--max-groups", "AGGREGATOR_MAX_GROUPS", "limits.max_groups", int,
         "component/endpoint pairs kept at most (their totals outlive their workers); "
         "new ones past it are refused (reason=group_limit)"),
    Flag("--pending-msgs-limit", "AGGREGATOR_PENDING_MSGS_LIMIT", "nats.pending_msgs_limit", int,
         "per-subscription NATS buffer, messages; past it NATS drops (counted)"),
    # --scrape comes here (see build_parser)
    Flag("--poll-interval", "AGGREGATOR_POLL_INTERVAL", "pull.poll_interval", float,
         "seconds between stats requests in pull mode"),
    Flag("--scrape-timeout", "AGGREGATOR_SCRAPE_TIMEOUT", "pull.scrape_timeout", float,
         "seconds to collect stats replies, below --poll-interval; None means 0.8 x --poll-interval"),
    Flag("--pending-bytes-limit", "AGGREGATOR_PENDING_BYTES_LIMIT", "nats.pending_bytes_limit", int,
         "per-subscription NATS buffer, bytes; past it NATS drops (counted)"),
    Flag("--nats-ping-interval", "AGGREGATOR_NATS_PING_INTERVAL", "nats.ping_interval", float,
         "seconds between pings; 2 unanswered pings mark a frozen server as disconnected"),
    Flag("--web-config-file", "AGGREGATOR_WEB_CONFIG_FILE", "http.web_config_file", _optional_path,
         "exporter-toolkit web config (YAML): TLS and basic auth for the HTTP endpoint"),
    Flag("--nats-user", "NATS_USER", "nats.user", str, "NATS user name", NATS_AUTH),
    Flag("--nats-password", "NATS_PASSWORD", "nats.password", _secret,
         "NATS password (or @FILE); prefer the env variable to the flag", NATS_AUTH),
    Flag("--nats-token", "NATS_TOKEN", "nats.token", _secret, "NATS auth token (or @FILE)", NATS_AUTH),
    Flag("--nats-nkey-seed", "NATS_NKEY_SEED_FILE", "nats.nkey_seed_file", _readable_file,
         "file holding an NKey user seed", NATS_AUTH),
    Flag("--nats-creds", "NATS_CREDS", "nats.creds_file", _readable_file, "NATS .creds file (user JWT + NKey seed)",
         NATS_AUTH),
    Flag("--nats-tls-ca", "NATS_TLS_CA", "nats.tls_ca", _readable_file, "CA bundle to verify the NATS server",
         NATS_AUTH),
    Flag("--nats-tls-cert", "NATS_TLS_CERT", "nats.tls_cert", _readable_file, "client certificate for mutual TLS",
         NATS_AUTH),
    Flag("--nats-tls-key", "NATS_TLS_KEY", "nats.tls_key", _readable_file, "client private key for mutual TLS",
         NATS_AUTH),
    Flag("--hit-rate-stream", "AGGREGATOR_HIT_RATE_STREAM", "journal.stream", str,
         "read kv-hit-rate events from this JetStream stream (created if missing) instead of core NATS", JOURNAL),
    Flag("--hit-rate-snapshot", "AGGREGATOR_HIT_RATE_SNAPSHOT", "journal.snapshot_path", _optional_path,
         "file keeping the hit-rate sums and their stream sequence (else the stream is replayed from its start)",
         JOURNAL),
    Flag("--hit-rate-snapshot-interval", "AGGREGATOR_HIT_RATE_SNAPSHOT_INTERVAL", "journal.snapshot_interval", float,
         "seconds between snapshots (and one at shutdown)", JOURNAL),
    Flag("--hit-rate-stream-max-age", "AGGREGATOR_HIT_RATE_STREAM_MAX_AGE", "journal.stream_max_age", float,
         "retention of a stream the aggregator creates, seconds", JOURNAL),
    Flag("--hit-rate-stream-replicas", "AGGREGATOR_HIT_RATE_STREAM_REPLICAS", "journal.stream_replicas", int,
         "copies of a stream the aggregator creates, on that many nodes of a NATS cluster (3 survives the loss "
         "of one node); an existing stream is used as it is", JOURNAL),
    Flag("--push-gateway", "AGGREGATOR_PUSH_GATEWAY", "push_gateway.url", _optional_url,
         "push the exposition to this Prometheus Pushgateway every interval (PUT: the group is replaced); "
         "user:password@ in the URL becomes basic auth, prefer the env variable to the flag", PUSH),
    Flag("--push-gateway-job", "AGGREGATOR_PUSH_GATEWAY_JOB", "push_gateway.job", str,
         "the job label of the pushed group", PUSH),
    Flag("--push-gateway-grouping", "AGGREGATOR_PUSH_GATEWAY_GROUPING", "push_gateway.grouping", label_pairs,
         "more labels of the group's key, NAME=VALUE,...; give each aggregator its own (e.g. instance=a)", PUSH),
    Flag("--push-gateway-interval", "AGGREGATOR_PUSH_GATEWAY_INTERVAL", "push_gateway.interval", float,
         "seconds between pushes", PUSH),
    Flag("--push-gateway-timeout", "AGGREGATOR_PUSH_GATEWAY_TIMEOUT", "push_gateway.timeout", float,
         "seconds one push may take", PUSH),
    Flag("--remote-write", "AGGREGATOR_REMOTE_WRITE", "remote_write.url", _optional_url,
         "send the aggregator's series to this Prometheus remote-write receiver (1.0: protobuf + snappy) every "
         "interval; user:password@ in the URL becomes basic auth, prefer the env variable to the flag", PUSH),
    Flag("--remote-write-interval", "AGGREGATOR_REMOTE_WRITE_INTERVAL", "remote_write.interval", float,
         "seconds between samples of every series", PUSH),
    Flag("--remote-write-timeout", "AGGREGATOR_REMOTE_WRITE_TIMEOUT", "remote_write.timeout", float,
         "seconds one request may take", PUSH),
    Flag("--remote-write-labels", "AGGREGATOR_REMOTE_WRITE_LABELS", "remote_write.labels", label_pairs,
         "labels added to every series that lacks them, NAME=VALUE,... (as Prometheus's external_labels)", PUSH),
    Flag("--remote-write-max-samples-per-send", "AGGREGATOR_REMOTE_WRITE_MAX_SAMPLES_PER_SEND",
         "remote_write.max_samples_per_send", int, "samples in one request at most", PUSH),
    Flag("--remote-write-queue-samples", "AGGREGATOR_REMOTE_WRITE_QUEUE_SAMPLES", "remote_write.queue_samples", int,
         "samples waiting to be sent at most; past it the oldest are dropped (counted)", PUSH),
    Flag("--component-metrics-prefixes", "AGGREGATOR_COMPONENT_METRICS_PREFIXES", "component_metrics.prefixes",
         comma_list,
         "comma-separated name prefixes a worker's metrics may use; others are rejected (reason=bad_name)"),
    Flag("--component-metrics-max-bytes", "AGGREGATOR_COMPONENT_METRICS_MAX_BYTES", "component_metrics.max_bytes",
         int, "larger snapshots are rejected (reason=oversized)"),
    Flag("--component-metrics-max-series-per-worker", "AGGREGATOR_COMPONENT_METRICS_MAX_SERIES_PER_WORKER",
         "component_metrics.max_series_per_worker", int,
         "a snapshot with more series is rejected (reason=series_limit)"),
    Flag("--component-metrics-max-series", "AGGREGATOR_COMPONENT_METRICS_MAX_SERIES", "component_metrics.max_series",
         int, "series of all workers' snapshots together; a snapshot past it is rejected (reason=series_limit)"),
    Flag("--gpu-hostname-label", "AGGREGATOR_GPU_HOSTNAME_LABEL", "gpu_hostname_label", str,
         "name of the node label on DCGM_FI_* series: dcgm-exporter's released 'Hostname', "
         "or 'hostname' as on its main branch since PR #655 (joins with Slurm's label)"),
)

# Config field -> (flag, variable), to name them in an error.
FIELD_FLAGS: Mapping[str, tuple[str, str | None]] = {**field_flags(FLAGS), "pull.targets": ("--scrape", _SCRAPE_ENV)}


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="aggregator",
        description="Aggregates LLM worker metrics from NATS and exports them for Prometheus.",
    )
    groups: dict[str | None, Any] = {None: parser}
    for flag in FLAGS:
        if flag.name == "--poll-interval":
            # Repeatable, so its env default is applied after parsing (argparse would append flags to it).
            parser.add_argument(
                "--scrape", action="append", type=_scrape_flag, default=None, metavar="COMPONENT/ENDPOINT",
                help=f"poll the NATS service stats of this component's workers, Dynamo-style (repeatable; "
                     f"env {_SCRAPE_ENV}, comma-separated); default none",
            )
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        flag.add_to(groups[flag.group], default_of(flag))
    return parser


def parse_config(argv: list[str] | None = None) -> AggregatorConfig:
    """The configuration the command line and environment describe; a bad one exits with one line."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    targets = args["scrape"]
    if targets is None:
        targets = []
        for item in comma_list(os.environ.get(_SCRAPE_ENV, "")):
            try:
                targets.append(scrape_target(item))
            except ValueError as error:
                parser.error(f"argument --scrape: {error} (env {_SCRAPE_ENV})")
    try:
        config = config_from_values(args, tuple(targets))
    except ConfigError as error:
        config_error(parser, error, FIELD_FLAGS)
    # Files the config names, opened now so that a bad one stops the start in one line.
    problem = nats_auth.check(config.nats)
    if problem:
        parser.error(problem)
    if config.http.web_config_file is not None:
        try:
            web_config.load(config.http.web_config_file)
        except web_config.WebConfigError as error:
            parser.error(f"--web-config-file: {error}")
    return config


def config_from_values(args: Mapping[str, Any], targets: tuple[ScrapeTarget, ...]) -> AggregatorConfig:
    """Build the config from parsed flags (by dest). Raises ConfigError naming the field."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for flag in FLAGS:
        section, _, name = flag.field.rpartition(".")
        values[section][name] = args[flag.dest]
    values["pull"]["targets"] = targets

    def build(section: str) -> Any:
        try:
            return SECTIONS[section](**values[section])
        except ConfigError as error:
            raise error.within(section) from None

    def build_optional(section: str) -> Any:
        """The section, or None when its first field is not given; its other fields are checked either way."""
        if values[section][OPTIONAL_SECTIONS[section]] is not None:
            return build(section)
        for name, value in values[section].items():
            if name == OPTIONAL_SECTIONS[section]:
                continue
            try:
                check_field(field_named(SECTIONS[section], name), value)
            except ConfigError as error:
                raise error.within(section) from None
        return None

    pull = build("pull")  # checked even when off: a bad flag is an error either way
    return AggregatorConfig(
        nats=build("nats"),
        http=build("http"),
        limits=build("limits"),
        component_metrics=build("component_metrics"),
        journal=build_optional("journal"),
        pull=pull if pull.targets else None,
        push_gateway=build_optional("push_gateway"),
        remote_write=build_optional("remote_write"),
        **values[""],
    )
