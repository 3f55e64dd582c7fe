"""The aggregator's settings: typed, frozen, one dataclass per concern, checked when built.

`aggregator.cli` builds an `AggregatorConfig` from flags and environment variables; the
demo and tests build one directly. Every field is checked at construction, as nats-py's
`micro.ServiceConfig` does, and a bad value raises `ConfigError` naming the field. Only
values are checked here (no file is opened): whether a file can be read, or a TLS context
built from it, is for whoever opens it.

The bottom layer of the aggregator: it imports nothing from the rest of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import fleet_protocol as protocol
from fleet_protocol.names import LABEL_NAME, METRIC_NAME
from fleet_protocol.partitions import partition
from fleet_protocol.service_stats import service_name
from fleet_runtime.config_checks import (
    Check,
    ConfigError,
    check_fields,
    checked,
    each,
    ip_address,
    label_value,
    nats_token,
    nats_url,
    one_of,
    optional,
    port_number,
    redact_url,
    shown,
    text,
    within,
)

__all__ = [
    "DEFAULT_PREFIXES",
    "GPU_HOSTNAME_LABELS",
    "RESERVED_PREFIXES",
    "AggregatorConfig",
    "ComponentMetricsConfig",
    "ConfigError",
    "DiscoveryConfig",
    "HttpConfig",
    "JournalConfig",
    "LimitsConfig",
    "NatsConfig",
    "PullConfig",
    "PushGatewayConfig",
    "RemoteWriteConfig",
    "ScrapeTarget",
    "ZmqConfig",
    "ShardConfig",
    "check_prefix",
    "check_stream_name",
    "etcd_url",
    "is_pem",
    "without_credentials",
    "zmq_broker_xpub",
    "zmq_endpoint",
]

# Names of the node label on DCGM_FI_* series: dcgm-exporter's released one, and its main branch's since PR #655.
GPU_HOSTNAME_LABELS: Final = ("Hostname", "hostname")

DEFAULT_PREFIXES: Final = ("dynamo_component_", "dynamo_frontend_")
# The aggregator's own families (FleetCollector, Telemetry, ProcessCollector, PlatformCollector).
RESERVED_PREFIXES: Final = ("llm_", "process_", "python_")


def check_prefix(prefix: str) -> str:
    """An allowed prefix of workers' metric names: a valid name start that cannot reach the aggregator's own names."""
    if not isinstance(prefix, str) or not METRIC_NAME.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not the start of a Prometheus metric name")
    for reserved in RESERVED_PREFIXES:
        if prefix.startswith(reserved) or reserved.startswith(prefix):
            raise ValueError(f"{prefix!r} would admit the aggregator's own {reserved}* series")
    return prefix


def check_stream_name(value: str) -> str:
    # JetStream stream names: no whitespace, '.', '*', '>', path separators.
    if not isinstance(value, str) or not value or len(value) > 64 or any(c in value for c in " \t\r\n.*>/\\"):
        raise ValueError(f"{value!r} is not a JetStream stream name")
    return value


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """The NATS connection: servers, one authentication method at most, TLS, keep-alive and buffers.

    Files are paths (read by nats-py when connecting). `repr()` never shows the password,
    the token or credentials inside a URL.
    """

    urls: tuple[str, ...] = field(default=("nats://localhost:4222",),
                                  metadata=checked(each(nats_url, what="NATS URL")))
    user: str | None = field(default=None, metadata=checked(optional(text)))
    password: str | None = field(default=None, metadata=checked(optional(text)))
    token: str | None = field(default=None, metadata=checked(optional(text)))
    nkey_seed_file: str | None = field(default=None, metadata=checked(optional(text)))
    creds_file: str | None = field(default=None, metadata=checked(optional(text)))
    tls_ca: str | None = field(default=None, metadata=checked(optional(text)))
    tls_cert: str | None = field(default=None, metadata=checked(optional(text)))
    tls_key: str | None = field(default=None, metadata=checked(optional(text)))
    # 2 unanswered pings mark a frozen server as disconnected.
    ping_interval: float = field(default=5.0, metadata=checked(within(0.2, 600.0)))
    # Per subscription; past them NATS drops messages (counted).
    pending_msgs_limit: int = field(default=512 * 1024, metadata=checked(within(1, 100_000_000)))
    pending_bytes_limit: int = field(default=128 * 1024 * 1024, metadata=checked(within(1024, 64 * 1024**3)))

    def __post_init__(self) -> None:
        check_fields(self)
        for one, other in (("user", "password"), ("password", "user"), ("tls_cert", "tls_key"),
                           ("tls_key", "tls_cert")):
            if getattr(self, one) is not None and getattr(self, other) is None:
                raise ConfigError(other, "needed with {0}", (one,))
        methods = self.auth_fields
        if len(methods) > 1:
            raise ConfigError(methods[1], "cannot be combined with {0}: choose one NATS authentication method",
                              (methods[0],))

    @property
    def auth_fields(self) -> list[str]:
        """The fields of the authentication methods configured (user and password count as one)."""
        return [name for name in ("user", "token", "nkey_seed_file", "creds_file") if getattr(self, name) is not None]

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def __repr__(self) -> str:
        return _repr_hiding(self, _nats_field_shown)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What one worker, or the whole fleet, may make the aggregator hold."""

    # Seconds of silence after which a worker and all its series are dropped.
    stale_after: float = field(default=10.0, metadata=checked(within(0.1, 86400.0)))
    max_message_bytes: int = field(default=256 * 1024, metadata=checked(within(256, 64 * 1024 * 1024)))
    max_workers: int = field(default=100_000, metadata=checked(within(1, 10_000_000)))
    # component/endpoint pairs (their totals outlive their workers)
    max_groups: int = field(default=10_000, metadata=checked(within(1, 1_000_000)))
    # KV block hashes held to count Dynamo 1.x workers' cached blocks from their kv-events (~90 bytes each):
    # per worker rank, and in all. A block past either is not tracked and the count marked unreliable.
    max_cached_blocks_per_worker: int = field(default=262_144, metadata=checked(within(0, 100_000_000)))
    max_cached_blocks: int = field(default=2_097_152, metadata=checked(within(0, 1_000_000_000)))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True)
class ComponentMetricsConfig:
    """Workers' MetricsRegistry snapshots (namespace.{ns}.component.{c}.metrics), re-exported."""

    # Name prefixes a worker's metrics may use.
    prefixes: tuple[str, ...] = field(default=DEFAULT_PREFIXES, metadata=checked(each(check_prefix, what="prefix")))
    max_bytes: int = field(default=1024 * 1024, metadata=checked(within(1024, 64 * 1024 * 1024)))
    max_series_per_worker: int = field(default=5_000, metadata=checked(within(1, 10_000_000)))
    # Series of all workers' snapshots together.
    max_series: int = field(default=100_000, metadata=checked(within(1, 100_000_000)))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP endpoint: /metrics, /health, /live."""

    host: str = field(default="0.0.0.0", metadata=checked(ip_address))
    port: int = field(default=9091, metadata=checked(port_number))  # 0 picks a free one
    # exporter-toolkit web config (YAML): TLS and basic auth
    web_config_file: str | None = field(default=None, metadata=checked(optional(text)))
    # Limits as Prometheus's exporters have them (Go's net/http timeouts, --web.max-connections).
    max_connections: int = field(default=512, metadata=checked(within(1, 1_000_000)))
    header_timeout: float = field(default=5.0, metadata=checked(within(0.1, 3600.0)))
    idle_timeout: float = field(default=90.0, metadata=checked(within(0.1, 86400.0)))
    write_timeout: float = field(default=30.0, metadata=checked(within(0.1, 3600.0)))
    max_scrapes: int = field(default=40, metadata=checked(within(1, 100_000)))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """Hit-rate history across restarts: events read from a JetStream stream, sums kept in a snapshot file."""

    stream: str = field(metadata=checked(check_stream_name))  # created if missing
    # Without it the stream is replayed from its start.
    snapshot_path: str | None = field(default=None, metadata=checked(optional(text)))
    snapshot_interval: float = field(default=5.0, metadata=checked(within(0.1, 3600.0)))
    # Retention of a stream the aggregator creates.
    stream_max_age: float = field(default=7 * 86400.0, metadata=checked(within(60.0, 10 * 365 * 86400.0)))
    # Copies of a stream the aggregator creates, on that many nodes of a NATS cluster (JetStream's limit is 5);
    # a stream that exists is used as it is.
    stream_replicas: int = field(default=1, metadata=checked(within(1, 5)))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """`--scrape COMPONENT/ENDPOINT`: read `endpoint` of the workers of `component`."""

    component: str = field(metadata=checked(nats_token))
    endpoint: str = field(metadata=checked(nats_token))

    def __post_init__(self) -> None:
        check_fields(self)


def _targets(values: object) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, ScrapeTarget) for v in values):
        raise TypeError(f"{values!r} is not a tuple of ScrapeTarget")


MIN_POLL_INTERVAL: Final = 0.1


@dataclass(frozen=True, slots=True)
class PullConfig:
    """Pull mode: poll the NATS service stats of these components' workers, Dynamo-style."""

    targets: tuple[ScrapeTarget, ...] = field(default=(), metadata=checked(_targets))
    poll_interval: float = field(default=1.0, metadata=checked(within(MIN_POLL_INTERVAL, 3600.0)))
    # Seconds to collect stats replies; None means 0.8 x poll_interval.
    scrape_timeout: float | None = field(default=None, metadata=checked(optional(within(0.01, 3600.0))))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.timeout >= self.poll_interval:
            raise ConfigError("scrape_timeout",
                              f"{shown(self.timeout)} must be below {{0}} {shown(self.poll_interval)}",
                              ("poll_interval",))

    @property
    def timeout(self) -> float:
        """How long each poll collects replies."""
        if self.scrape_timeout is None:
            return round(0.8 * self.poll_interval, 6)
        return self.scrape_timeout


DISCOVERY_BACKENDS: Final = ("file", "etcd")
# Dynamo's own default for DYN_FILE_KV is `$TMPDIR/dynamo_store_kv` (cli.py resolves $TMPDIR).
DEFAULT_FILE_KV: Final = "/tmp/dynamo_store_kv"
DEFAULT_ETCD_ENDPOINTS: Final = ("http://localhost:2379",)


def etcd_url(url: str) -> str:
    """An etcd client URL as ETCD_ENDPOINTS lists them: http(s)://host:port, nothing after."""
    if not isinstance(url, str):
        raise TypeError(f"{url!r} is not an etcd URL like http://host:2379")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{redact_url(url)!r} is not an etcd URL like http://host:2379")
    if "@" in parts.netloc:
        # The JSON gateway takes no credentials in the URL; refused rather than sent in the clear.
        raise ValueError(f"{redact_url(url)!r} holds credentials; give etcd's user and password apart "
                         "(ETCD_AUTH_USERNAME, ETCD_AUTH_PASSWORD)")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return url


def is_pem(value: str) -> bool:
    """PEM text (`-----BEGIN ...`) rather than a file's path: Dynamo's workers take ETCD_AUTH_CA,
    ETCD_AUTH_CLIENT_CERT and ETCD_AUTH_CLIENT_KEY as the PEM itself."""
    return value.lstrip().startswith("-----BEGIN")


_ETCD_PAIRS: Final = (("etcd_username", "etcd_password"), ("etcd_password", "etcd_username"),
                      ("etcd_client_cert", "etcd_client_key"), ("etcd_client_key", "etcd_client_cert"))


@dataclass(frozen=True, slots=True, repr=False)
class DiscoveryConfig:
    """Dynamo's discovery store, read for worker instances, model cards and event channels.

    `backend` is Dynamo's `DYN_DISCOVERY_BACKEND`; the file backend reads `file_kv`
    (`DYN_FILE_KV`), etcd reads `etcd_endpoints` (`ETCD_ENDPOINTS`), authenticated as Dynamo's
    workers are (`ETCD_AUTH_*`): a user and password, and TLS with a CA and a client
    certificate, each PEM text or a file's path. `repr()` never shows the password nor PEM text.
    """

    backend: str = field(metadata=checked(one_of(DISCOVERY_BACKENDS)))
    file_kv: str = field(default=DEFAULT_FILE_KV, metadata=checked(text))
    etcd_endpoints: tuple[str, ...] = field(default=DEFAULT_ETCD_ENDPOINTS,
                                            metadata=checked(each(etcd_url, what="etcd URL")))
    # A file whose keep-alive stopped this long ago is a dead worker's (Dynamo's own FileStore TTL).
    file_ttl: float = field(default=float(protocol.FILE_ENTRY_TTL_S), metadata=checked(within(1.0, 3600.0)))
    # Seconds between two scans of the file backend's directory.
    file_scan_interval: float = field(default=1.0, metadata=checked(within(0.05, 60.0)))
    # Larger entries are dropped (reason=oversized).
    max_entry_bytes: int = field(default=256 * 1024, metadata=checked(within(1024, 64 * 1024 * 1024)))
    # Entries of the aggregator's namespace kept at most; past it new ones are dropped (reason=entry_limit).
    max_entries: int = field(default=100_000, metadata=checked(within(1, 10_000_000)))
    # etcd's user and password (`ETCD_AUTH_USERNAME`, `ETCD_AUTH_PASSWORD`), both or neither.
    etcd_username: str | None = field(default=None, metadata=checked(optional(text)))
    etcd_password: str | None = field(default=None, metadata=checked(optional(text)))
    # The CA of etcd's server certificate (`ETCD_AUTH_CA`); without it, the system's CAs verify https endpoints.
    etcd_ca: str | None = field(default=None, metadata=checked(optional(text)))
    # A client certificate and its key, for an etcd started with --client-cert-auth; both or neither.
    etcd_client_cert: str | None = field(default=None, metadata=checked(optional(text)))
    etcd_client_key: str | None = field(default=None, metadata=checked(optional(text)))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.file_scan_interval >= self.file_ttl:
            raise ConfigError("file_scan_interval", f"{shown(self.file_scan_interval)} must be below {{0}} "
                              f"{shown(self.file_ttl)}, or live entries would expire between scans", ("file_ttl",))
        if self.file_ttl <= protocol.FILE_KEEP_ALIVE_S:
            raise ConfigError("file_ttl", f"{shown(self.file_ttl)} must be above Dynamo's keep-alive period "
                              f"({protocol.FILE_KEEP_ALIVE_S:.1f}s), or live workers would expire")
        if self.backend != "etcd":
            return  # the etcd settings of a file-backend deployment are not used, so not a reason to stop
        for one, other in _ETCD_PAIRS:
            if getattr(self, one) is not None and getattr(self, other) is None:
                raise ConfigError(other, "needed with {0}", (one,))
        plain = [url for url in self.etcd_endpoints if not url.startswith("https://")]
        for name in ("etcd_ca", "etcd_client_cert"):
            if getattr(self, name) is not None and plain:
                # Refused rather than ignored: certificates given mean the store was meant to be reached over TLS.
                raise ConfigError(name, f"needs https:// endpoints in {{0}}, not {redact_url(plain[0])!r}",
                                  ("etcd_endpoints",))

    @property
    def etcd_tls(self) -> bool:
        return self.etcd_ca is not None or self.etcd_client_cert is not None

    def __repr__(self) -> str:
        return _repr_hiding(self, _discovery_field_shown)


def http_url(url: str) -> str:
    """An http(s) URL with a host; credentials (user:password@) allowed, never shown in an error."""
    if not isinstance(url, str):
        raise TypeError("is not an http(s) URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{redact_url(url)!r} is not an http(s) URL like http://host:9091")
    try:
        _ = parts.port  # raises for a port outside 0-65535 or not a number
    except ValueError:
        raise ValueError(f"{redact_url(url)!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{redact_url(url)!r} must have no query or fragment")
    return url


def without_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user:password@, user, password); user and password are None when absent."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    password = unquote(parts.password) if parts.password is not None else ""
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.username), password


def label_pairs(*, reserved: tuple[str, ...] = ()) -> Check:
    """A tuple of (label name, value) pairs, names unique, none of `reserved` nor Prometheus's own `__*`."""

    def check(pairs: object) -> None:
        if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise TypeError(f"{pairs!r} is not a tuple of (name, value) pairs")
        seen: set[str] = set()
        for name, value in pairs:
            if not isinstance(name, str) or not LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"{name!r} is not a label name")
            if name in reserved:
                raise ValueError(f"{name!r} is reserved")
            if name in seen:
                raise ValueError(f"{name!r} given twice")
            seen.add(name)
            label_value(value)

    return check


def _repr_hiding(config: object, shown: Callable[[str, object], object]) -> str:
    """The dataclass's repr, each field's value as `shown(name, value)` gives it: secrets hidden."""
    values = (f"{item.name}={shown(item.name, getattr(config, item.name))!r}"
              for item in fields(config))  # type: ignore[arg-type]
    return f"{type(config).__name__}({', '.join(values)})"


def _nats_field_shown(name: str, value: Any) -> object:
    if name == "urls":
        return tuple(redact_url(url) for url in value)
    return "***" if name in ("password", "token") and value is not None else value


def _discovery_field_shown(name: str, value: Any) -> object:
    if name == "etcd_password" and value is not None:
        return "***"
    if name in ("etcd_ca", "etcd_client_cert", "etcd_client_key") and value is not None and is_pem(value):
        return "<PEM>"
    return value


def _url_field_shown(name: str, value: Any) -> object:
    return redact_url(value) if name == "url" else value


def _redacted_repr(config: object) -> str:
    """The dataclass's repr with the credentials of its `url` field hidden."""
    return _repr_hiding(config, _url_field_shown)


@dataclass(frozen=True, slots=True, repr=False)
class PushGatewayConfig:
    """`--push-gateway`: the exposition PUT to a Prometheus Pushgateway every interval, for where nothing scrapes."""

    url: str = field(metadata=checked(http_url))  # user:password@ becomes basic auth
    job: str = field(default="llm-aggregator", metadata=checked(label_value))
    # Further labels of the group's key (e.g. instance=...): one group per aggregator.
    grouping: tuple[tuple[str, str], ...] = field(default=(), metadata=checked(label_pairs(reserved=("job",))))
    interval: float = field(default=5.0, metadata=checked(within(0.1, 3600.0)))
    timeout: float = field(default=10.0, metadata=checked(within(0.1, 600.0)))

    def __post_init__(self) -> None:
        check_fields(self)

    def __repr__(self) -> str:
        return _redacted_repr(self)


@dataclass(frozen=True, slots=True, repr=False)
class RemoteWriteConfig:
    """`--remote-write`: the aggregator's series sent by Prometheus remote write 1.0 every interval."""

    url: str = field(metadata=checked(http_url))  # user:password@ becomes basic auth
    interval: float = field(default=5.0, metadata=checked(within(0.1, 3600.0)))
    timeout: float = field(default=10.0, metadata=checked(within(0.1, 600.0)))
    # Added to every series that lacks them, as Prometheus's external_labels (e.g. replica=a for HA dedup).
    labels: tuple[tuple[str, str], ...] = field(default=(), metadata=checked(label_pairs()))
    max_samples_per_send: int = field(default=2000, metadata=checked(within(1, 1_000_000)))
    # Samples waiting to be sent at most; past it the oldest are dropped (counted).
    queue_samples: int = field(default=500_000, metadata=checked(within(1, 100_000_000)))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.queue_samples < self.max_samples_per_send:
            raise ConfigError("queue_samples", f"{self.queue_samples} must be at least {{0}} "
                              f"{self.max_samples_per_send}", ("max_samples_per_send",))

    def __repr__(self) -> str:
        return _redacted_repr(self)


def zmq_endpoint(value: object) -> str:
    """A ZMQ TCP endpoint to connect to, `tcp://host:port` (the only transport a Dynamo publisher advertises)."""
    if not isinstance(value, str):
        raise TypeError("must be a string")
    host, _, port = value.removeprefix("tcp://").rpartition(":")
    if not value.startswith("tcp://") or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value[:256]!r} is not tcp://host:port")
    return value


def zmq_broker_xpub(url: str) -> tuple[str, ...]:
    """The XPUB endpoints of Dynamo's `DYN_ZMQ_BROKER_URL` (`xsub=URL;URL , xpub=URL;URL`); () when empty.

    Parsed as Dynamo parses it: two comma-separated parts, `xsub=` and `xpub=`, each a `;` list
    that must not be empty. Subscribers use the xpub side only.
    """
    if not url.strip():
        return ()
    parts = [part.strip() for part in url.split(",")]
    if len(parts) != 2:
        raise ValueError("expected 'xsub=URL;... , xpub=URL;...'")
    sides: dict[str, tuple[str, ...]] = {}
    for part in parts:
        side, equals, urls = part.partition("=")
        if not equals or side.strip() not in ("xsub", "xpub"):
            raise ValueError(f"{part[:64]!r} does not start with xsub= or xpub=")
        sides[side.strip()] = tuple(item.strip() for item in urls.split(";") if item.strip())
    if not sides.get("xsub") or not sides.get("xpub"):
        raise ValueError("needs at least one xsub and one xpub endpoint")
    return tuple(zmq_endpoint(endpoint) for endpoint in sides["xpub"])


def _zmq_endpoints(value: object) -> None:
    if not isinstance(value, tuple):
        raise TypeError("must be a tuple")
    for item in value:
        zmq_endpoint(item)


@dataclass(frozen=True, slots=True)
class ZmqConfig:
    """Dynamo's ZMQ event plane (its default): publishers found in the discovery store, or a broker."""

    # ZMQ publishers (one per topic per worker process) subscribed to at most; 0 turns direct mode off.
    max_publishers: int = field(default=4096, metadata=checked(within(0, 1_000_000)))
    # Messages queued per connected publisher before ZMQ drops (counted as lost from the sequence gaps).
    receive_hwm: int = field(default=1000, metadata=checked(within(1, 10_000_000)))
    # Broker mode (`DYN_ZMQ_BROKER_URL`): the broker's XPUB endpoints, instead of (or beside) publishers.
    broker_xpub: tuple[str, ...] = field(default=(), metadata=checked(_zmq_endpoints))

    def __post_init__(self) -> None:
        check_fields(self)


MAX_SHARDS: Final = 1024


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """This aggregator's share of the fleet: the components whose subject token nats-server's
    partition function (`{{partition(count, ...)}}`, fleet_protocol.partitions) puts in `index`.

    Every subject is in exactly one of `count` partitions, so `count` aggregators, one per
    index, split the fleet with no overlap and no gap (docs/sharding.md). Each keeps its share
    of what it receives; with `subject_prefix`, nats-server has already split the component
    subjects (a mapping to `{prefix}.{partition}.namespace....`) and each receives its share only.
    """

    count: int = field(default=1, metadata=checked(within(1, MAX_SHARDS)))  # 1: the whole fleet
    index: int = field(default=0, metadata=checked(within(0, MAX_SHARDS - 1)))
    subject_prefix: str | None = field(default=None, metadata=checked(optional(nats_token)))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.index >= self.count:
            raise ConfigError("index", f"{self.index} must be below {{0}} {self.count}", ("count",))
        if self.subject_prefix is not None and self.count == 1:
            raise ConfigError("subject_prefix", "needs {0} above 1", ("count",))

    def owns(self, component_token: str) -> bool:
        return partition(component_token, self.count) == self.index


def _instance(kind: type) -> Check:
    def check(value: object) -> None:
        if not isinstance(value, kind):
            raise TypeError(f"{value!r} is not a {kind.__name__}")

    return check


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """Everything `python -m aggregator` is told. `journal`, `pull`, `discovery`, `push_gateway` and
    `remote_write` are None when off."""

    nats: NatsConfig = field(default_factory=NatsConfig, metadata=checked(_instance(NatsConfig)))
    http: HttpConfig = field(default_factory=HttpConfig, metadata=checked(_instance(HttpConfig)))
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata=checked(_instance(LimitsConfig)))
    component_metrics: ComponentMetricsConfig = field(default_factory=ComponentMetricsConfig,
                                                      metadata=checked(_instance(ComponentMetricsConfig)))
    journal: JournalConfig | None = field(default=None, metadata=checked(optional(_instance(JournalConfig))))
    pull: PullConfig | None = field(default=None, metadata=checked(optional(_instance(PullConfig))))
    discovery: DiscoveryConfig | None = field(default=None, metadata=checked(optional(_instance(DiscoveryConfig))))
    push_gateway: PushGatewayConfig | None = field(default=None,
                                                   metadata=checked(optional(_instance(PushGatewayConfig))))
    remote_write: RemoteWriteConfig | None = field(default=None,
                                                   metadata=checked(optional(_instance(RemoteWriteConfig))))
    zmq: ZmqConfig = field(default_factory=ZmqConfig, metadata=checked(_instance(ZmqConfig)))
    shard: ShardConfig = field(default_factory=ShardConfig, metadata=checked(_instance(ShardConfig)))
    namespace: str = field(default=protocol.DEFAULT_NAMESPACE, metadata=checked(nats_token))  # Dynamo namespace
    # Component label for namespace-level subjects (namespace.{ns}.kv_metrics, .kv-hit-rate).
    component: str = field(default=protocol.DEFAULT_COMPONENT, metadata=checked(nats_token))
    # Endpoint label for hit-rate events of workers that never reported load.
    endpoint: str = field(default=protocol.DEFAULT_ENDPOINT, metadata=checked(label_value))
    gpu_hostname_label: str = field(default=GPU_HOSTNAME_LABELS[0],
                                    metadata=checked(one_of(GPU_HOSTNAME_LABELS)))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.pull is None or not self.pull.targets:
            return
        if self.pull.poll_interval >= self.limits.stale_after:
            raise ConfigError("pull.poll_interval", f"{shown(self.pull.poll_interval)} must be below {{0}} "
                              f"{shown(self.limits.stale_after)}, or every scraped worker would expire between polls",
                              ("limits.stale_after",))
        components: dict[str, str] = {}
        for target in self.pull.targets:
            if not self.shard.owns(target.component):
                # Its owner would count the same workers: they would be in two shards.
                raise ConfigError("pull.targets", f"component {target.component!r} is in shard "
                                  f"{partition(target.component, self.shard.count)} of {self.shard.count}, "
                                  f"not in this one ({{0}} {self.shard.index})", ("shard.index",))
            service = service_name(self.namespace, target.component)
            other = components.setdefault(service, target.component)
            if other != target.component:
                # Their workers could not be told apart.
                raise ConfigError("pull.targets", f"components {other!r} and {target.component!r} are both "
                                  f"NATS service {service!r}")
