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
    DiscoveryConfig,
    HttpConfig,
    JournalConfig,
    LimitsConfig,
    NatsConfig,
    PullConfig,
    PushGatewayConfig,
    RemoteWriteConfig,
    ScrapeTarget,
    ShardConfig,
    ZmqConfig,
    is_pem,
    zmq_broker_xpub,
)
from aggregator.edges import etcd_gateway, nats_auth, web_config
from fleet_runtime.config_checks import check_field, field_named
from fleet_runtime.flags import (
    Flag,
    OneLineParser,
    comma_list,
    config_error,
    field_flags,
    nats_url_list,
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
    "discovery": DiscoveryConfig,
    "push_gateway": PushGatewayConfig,
    "remote_write": RemoteWriteConfig,
    "zmq": ZmqConfig,
    "shard": ShardConfig,
}
# Sections that are off (None) unless their first field's flag is given: {section: that field}.
OPTIONAL_SECTIONS: Mapping[str, str] = {
    "journal": "stream", "discovery": "backend", "push_gateway": "url", "remote_write": "url",
}

NATS_AUTH = "NATS authentication and TLS"
HTTP_LIMITS = "HTTP limits"
JOURNAL = "hit-rate history across restarts (JetStream)"
DISCOVERY = "Dynamo's discovery store (worker instances, model cards, event channels)"
ETCD_AUTH = "etcd authentication and TLS (Dynamo's ETCD_AUTH_* variables: set the workers' values)"
ZMQ = "Dynamo's ZMQ event plane (its default since 1.3)"
PUSH = "push where nothing can scrape (Pushgateway, remote write)"
SHARDING = "sharding: several aggregators split the fleet by component (docs/sharding.md)"


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
        # Neither the path nor the content is quoted: a password may itself begin with '@'.
        try:
            value = Path(value[1:]).read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read the @FILE given: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError("the @FILE given is not UTF-8 text") from None
    if not value:
        raise ValueError("must not be empty")
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


def _optional_text(value: str) -> str | None:
    return value or None  # an empty variable means none


def _pem_or_file(value: str) -> str | None:
    """PEM text, as Dynamo's workers take ETCD_AUTH_CA/_CLIENT_CERT/_CLIENT_KEY, or a readable file's path."""
    if not value.strip():
        return None  # an empty variable means none
    if is_pem(value):
        return value
    if "\n" in value or len(value) > 4096:
        raise ValueError("is neither PEM text (-----BEGIN ...) nor a file's path")  # not quoted: it may be a key
    return _readable_file(value)


def _optional_token(value: str) -> str | None:
    return value.strip() or None  # an empty variable means none


def _discovery_backend(value: str) -> str | None:
    return value.strip().lower() or None  # unset or empty: discovery off


def _etcd_endpoints(value: str) -> tuple[str, ...]:
    # Dynamo's etcd client takes `host:port` as http://host:port.
    return tuple(url if "://" in url else f"http://{url}" for url in comma_list(value))


def dynamo_file_kv(environ: Mapping[str, str] = os.environ) -> str:
    """Where Dynamo's file backend lives without DYN_FILE_KV: its temporary directory's dynamo_store_kv."""
    return os.path.join(environ.get("TMPDIR") or "/tmp", "dynamo_store_kv")


def _file_kv(value: str) -> str:
    return value or dynamo_file_kv()  # an empty variable means Dynamo's default


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
    Flag("--nats-url", "NATS_SERVER", "nats.urls", nats_url_list, "NATS server URL(s), comma-separated"),
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
         "component/endpoint pairs kept at most (their totals outlive their workers); past it the pair "
         "idle longest (no live worker) is evicted for a new one (llm_aggregator_groups_evicted_total), "
         "which is refused (reason=group_limit) only while every pair has a live worker"),
    Flag("--max-cached-blocks-per-worker", "AGGREGATOR_MAX_CACHED_BLOCKS_PER_WORKER",
         "limits.max_cached_blocks_per_worker", int,
         "KV blocks tracked per worker rank to count its cached blocks (Dynamo 1.x kv-events); past it the count "
         "is marked unreliable"),
    Flag("--max-cached-blocks", "AGGREGATOR_MAX_CACHED_BLOCKS", "limits.max_cached_blocks", int,
         "KV blocks tracked in all (~90 bytes each); past it counts are marked unreliable"),
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
    Flag("--http-max-connections", "AGGREGATOR_HTTP_MAX_CONNECTIONS", "http.max_connections", int,
         "open HTTP connections at most; past it no new one is accepted until one closes "
         "(keep it below the open-files limit, ulimit -n)", HTTP_LIMITS),
    Flag("--http-header-timeout", "AGGREGATOR_HTTP_HEADER_TIMEOUT", "http.header_timeout", float,
         "seconds a new connection has to send a complete request header (and to finish a TLS "
         "handshake); then it is closed", HTTP_LIMITS),
    Flag("--http-idle-timeout", "AGGREGATOR_HTTP_IDLE_TIMEOUT", "http.idle_timeout", float,
         "seconds a keep-alive connection may wait for its next request after a response; then it is "
         "closed (above Prometheus's scrape interval, so it keeps its connection)", HTTP_LIMITS),
    Flag("--http-write-timeout", "AGGREGATOR_HTTP_WRITE_TIMEOUT", "http.write_timeout", float,
         "seconds a /metrics scrape may take, render and transfer; past it the connection is closed "
         "(a client that stops reading holds neither a slot nor memory longer)", HTTP_LIMITS),
    Flag("--http-max-scrapes", "AGGREGATOR_HTTP_MAX_SCRAPES", "http.max_scrapes", int,
         "/metrics scrapes in flight at most; past it 503 with Retry-After at once", HTTP_LIMITS),
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
    Flag("--discovery-backend", "DYN_DISCOVERY_BACKEND", "discovery.backend", _discovery_backend,
         "read Dynamo's discovery store: file or etcd, as Dynamo's workers are configured; unset means off",
         DISCOVERY),
    Flag("--discovery-file-kv", "DYN_FILE_KV", "discovery.file_kv", _file_kv,
         "directory of Dynamo's file discovery backend (default: $TMPDIR/dynamo_store_kv, as Dynamo's)", DISCOVERY),
    Flag("--etcd-endpoints", "ETCD_ENDPOINTS", "discovery.etcd_endpoints", _etcd_endpoints,
         "etcd client URLs, comma-separated (http://host:2379), read through etcd's JSON gateway", DISCOVERY),
    Flag("--etcd-username", "ETCD_AUTH_USERNAME", "discovery.etcd_username", _optional_text,
         "etcd user: the aggregator authenticates and sends etcd's token with every request", ETCD_AUTH),
    Flag("--etcd-password", "ETCD_AUTH_PASSWORD", "discovery.etcd_password", _secret,
         "the etcd user's password (or @FILE); prefer the env variable to the flag", ETCD_AUTH),
    Flag("--etcd-ca", "ETCD_AUTH_CA", "discovery.etcd_ca", _pem_or_file,
         "CA certificate(s) that signed etcd's server certificate: PEM text, as Dynamo's workers take it, or a "
         "file; needs https:// endpoints (without it the system's CAs verify them)", ETCD_AUTH),
    Flag("--etcd-client-cert", "ETCD_AUTH_CLIENT_CERT", "discovery.etcd_client_cert", _pem_or_file,
         "client certificate for an etcd started with --client-cert-auth: PEM text or a file; needs https:// "
         "endpoints", ETCD_AUTH),
    Flag("--etcd-client-key", "ETCD_AUTH_CLIENT_KEY", "discovery.etcd_client_key", _pem_or_file,
         "the client certificate's private key, unencrypted: PEM text or a file; prefer the env variable to the "
         "flag", ETCD_AUTH),
    Flag("--discovery-file-ttl", "AGGREGATOR_DISCOVERY_FILE_TTL", "discovery.file_ttl", float,
         "seconds after its last keep-alive (the file's mtime) that a file entry counts as gone", DISCOVERY),
    Flag("--discovery-file-scan-interval", "AGGREGATOR_DISCOVERY_FILE_SCAN_INTERVAL", "discovery.file_scan_interval",
         float, "seconds between scans of the file backend's directory", DISCOVERY),
    Flag("--discovery-max-entry-bytes", "AGGREGATOR_DISCOVERY_MAX_ENTRY_BYTES", "discovery.max_entry_bytes", int,
         "larger discovery entries are dropped (reason=oversized)", DISCOVERY),
    Flag("--discovery-max-entries", "AGGREGATOR_DISCOVERY_MAX_ENTRIES", "discovery.max_entries", int,
         "discovery entries of the namespace kept at most; new ones past it are dropped (reason=entry_limit)",
         DISCOVERY),
    Flag("--zmq-max-publishers", "AGGREGATOR_ZMQ_MAX_PUBLISHERS", "zmq.max_publishers", int,
         "ZMQ event publishers found in the discovery store subscribed to at most (one per topic per worker "
         "process; a broker found there counts once per XPUB endpoint); past it new ones are refused (counted); "
         "0 turns the ZMQ event plane off", ZMQ),
    Flag("--zmq-receive-hwm", "AGGREGATOR_ZMQ_RECEIVE_HWM", "zmq.receive_hwm", int,
         "messages queued per ZMQ publisher before ZMQ drops them (counted as lost events)", ZMQ),
    Flag("--zmq-broker-url", "DYN_ZMQ_BROKER_URL", "zmq.broker_xpub", zmq_broker_xpub,
         "Dynamo's ZMQ broker, as its workers are told: 'xsub=URL;... , xpub=URL;...'; the aggregator "
         "subscribes at the xpub side(s). Unset: the brokers the discovery store lists (what workers with "
         "DYN_ZMQ_BROKER_ENABLED=true use), if any", ZMQ),
    Flag("--shards", "AGGREGATOR_SHARDS", "shard.count", int,
         "aggregators the fleet is split across, by component: each keeps the components that nats-server's "
         "partition function ({{partition(shards,component)}}) puts in its --shard; 1 means the whole fleet",
         SHARDING),
    Flag("--shard", "AGGREGATOR_SHARD", "shard.index", int, "which of the --shards this aggregator is, 0 to "
         "shards-1 (replicas of one shard share it)", SHARDING),
    Flag("--shard-subject-prefix", "AGGREGATOR_SHARD_SUBJECT_PREFIX", "shard.subject_prefix", _optional_token,
         "nats-server has split the component subjects already, mapping them to "
         "PREFIX.{partition}.namespace.... (docs/sharding.md): subscribe to this shard's partition only",
         SHARDING),
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
        default = dynamo_file_kv() if flag.field == "discovery.file_kv" else default_of(flag)
        flag.add_to(groups[flag.group], default)
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
    if config.discovery is not None and config.discovery.backend == "etcd":
        tls_problem = etcd_gateway.check(config.discovery)
        if tls_problem is not None:
            field, message = tls_problem
            config_error(parser, ConfigError(f"discovery.{field}", message), FIELD_FLAGS)
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
        shard=build("shard"),
        nats=build("nats"),
        http=build("http"),
        limits=build("limits"),
        component_metrics=build("component_metrics"),
        journal=build_optional("journal"),
        pull=pull if pull.targets else None,
        discovery=build_optional("discovery"),
        push_gateway=build_optional("push_gateway"),
        remote_write=build_optional("remote_write"),
        zmq=build("zmq"),
        **values[""],
    )
