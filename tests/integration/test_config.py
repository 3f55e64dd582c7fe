"""Settings as frozen dataclasses checked when built, and the command lines that build them."""

from __future__ import annotations

import dataclasses
import math

import pytest

from aggregator import cli
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
)
from fleet_demo.config import DemoConfig
from fleet_protocol import MAX_LABEL_LENGTH
from fleet_runtime.config_checks import field_named
from mock_worker import cli as mock_worker_cli
from mock_worker.config import MockWorkerConfig

ALL_ENV = [flag.env for flag in (*cli.FLAGS, *mock_worker_cli.FLAGS) if flag.env] + ["AGGREGATOR_SCRAPE"]


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch):
    for name in ALL_ENV:
        monkeypatch.delenv(name, raising=False)


# --- each bad value is refused at construction, naming its field ---------------------------

INVALID = [
    (NatsConfig, {"urls": ()}, "urls"),
    (NatsConfig, {"urls": "nats://a:4222"}, "urls"),  # a string, not a tuple of them
    (NatsConfig, {"urls": ("http://a:4222",)}, "urls"),
    (NatsConfig, {"urls": ("nats://a:99999",)}, "urls"),
    (NatsConfig, {"user": "", "password": "p"}, "user"),
    (NatsConfig, {"user": "u"}, "password"),
    (NatsConfig, {"password": "p"}, "user"),
    (NatsConfig, {"token": ""}, "token"),
    (NatsConfig, {"nkey_seed_file": ""}, "nkey_seed_file"),
    (NatsConfig, {"tls_cert": "c.pem"}, "tls_key"),
    (NatsConfig, {"tls_key": "k.pem"}, "tls_cert"),
    (NatsConfig, {"user": "u", "password": "p", "token": "t"}, "token"),
    (NatsConfig, {"nkey_seed_file": "a", "creds_file": "b"}, "creds_file"),
    (NatsConfig, {"ping_interval": 0.1}, "ping_interval"),
    (NatsConfig, {"ping_interval": math.nan}, "ping_interval"),
    (NatsConfig, {"pending_msgs_limit": 0}, "pending_msgs_limit"),
    (NatsConfig, {"pending_msgs_limit": 1.5}, "pending_msgs_limit"),
    (NatsConfig, {"pending_bytes_limit": 1023}, "pending_bytes_limit"),
    (LimitsConfig, {"stale_after": 0.0}, "stale_after"),
    (LimitsConfig, {"stale_after": math.inf}, "stale_after"),
    (LimitsConfig, {"stale_after": "10"}, "stale_after"),
    (LimitsConfig, {"max_message_bytes": 255}, "max_message_bytes"),
    (LimitsConfig, {"max_workers": 0}, "max_workers"),
    (LimitsConfig, {"max_groups": True}, "max_groups"),
    (ComponentMetricsConfig, {"prefixes": ()}, "prefixes"),
    (ComponentMetricsConfig, {"prefixes": ("llm_",)}, "prefixes"),
    (ComponentMetricsConfig, {"prefixes": ("dynamo_", "9x")}, "prefixes"),
    (ComponentMetricsConfig, {"max_bytes": 1023}, "max_bytes"),
    (ComponentMetricsConfig, {"max_series_per_worker": 0}, "max_series_per_worker"),
    (ComponentMetricsConfig, {"max_series": 0}, "max_series"),
    (HttpConfig, {"host": "localhost"}, "host"),
    (HttpConfig, {"port": 65536}, "port"),
    (HttpConfig, {"port": -1}, "port"),
    (HttpConfig, {"port": "9091"}, "port"),
    (HttpConfig, {"web_config_file": ""}, "web_config_file"),
    (JournalConfig, {"stream": "a.b"}, "stream"),
    (JournalConfig, {"stream": ""}, "stream"),
    (JournalConfig, {"stream": "s", "snapshot_path": ""}, "snapshot_path"),
    (JournalConfig, {"stream": "s", "snapshot_interval": 0.0}, "snapshot_interval"),
    (JournalConfig, {"stream": "s", "stream_max_age": 59.0}, "stream_max_age"),
    (ScrapeTarget, {"component": "back.end", "endpoint": "generate"}, "component"),
    (ScrapeTarget, {"component": "backend", "endpoint": ""}, "endpoint"),
    (PullConfig, {"targets": (("backend", "generate"),)}, "targets"),
    (PullConfig, {"poll_interval": 0.01}, "poll_interval"),
    (PullConfig, {"scrape_timeout": 0.001}, "scrape_timeout"),
    (PullConfig, {"poll_interval": 1.0, "scrape_timeout": 1.0}, "scrape_timeout"),
    (AggregatorConfig, {"namespace": "a.b"}, "namespace"),
    (AggregatorConfig, {"component": ""}, "component"),
    (AggregatorConfig, {"endpoint": "x" * (MAX_LABEL_LENGTH + 1)}, "endpoint"),
    (AggregatorConfig, {"gpu_hostname_label": "host"}, "gpu_hostname_label"),
    (AggregatorConfig, {"nats": None}, "nats"),
    (AggregatorConfig, {"limits": NatsConfig()}, "limits"),
    (AggregatorConfig, {"journal": "stream"}, "journal"),
    (AggregatorConfig, {"pull": PullConfig((ScrapeTarget("a", "b"),), poll_interval=10.0)}, "pull.poll_interval"),
    (AggregatorConfig, {"pull": PullConfig((ScrapeTarget("a", "b"), ScrapeTarget("A", "b")))}, "pull.targets"),
    (MockWorkerConfig, {"nats_urls": ("nats://",)}, "nats_urls"),
    (MockWorkerConfig, {"workers": 0}, "workers"),
    (MockWorkerConfig, {"dp_ranks": 65}, "dp_ranks"),
    (MockWorkerConfig, {"mode": "pull", "dp_ranks": 2}, "dp_ranks"),
    (MockWorkerConfig, {"shape": "round"}, "shape"),
    (MockWorkerConfig, {"gpu": "tpu"}, "gpu"),
    (MockWorkerConfig, {"seed": 1.5}, "seed"),
    (MockWorkerConfig, {"component_metrics": 1}, "component_metrics"),
    (MockWorkerConfig, {"duration": -1.0}, "duration"),
    (DemoConfig, {"workers": 10_001}, "workers"),
    (DemoConfig, {"interval": 0.0}, "interval"),
    (DemoConfig, {"port": 70000}, "port"),
]


@pytest.mark.parametrize("kind,values,field", INVALID,
                         ids=[f"{kind.__name__}-{field}-{i}" for i, (kind, _, field) in enumerate(INVALID)])
def test_a_bad_value_is_refused_at_construction_naming_its_field(kind, values, field):
    with pytest.raises(ConfigError) as error:
        kind(**values)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")
    assert isinstance(error.value, ValueError)  # what nats-py's ServiceConfig raises, too


@pytest.mark.parametrize("kind", [AggregatorConfig, NatsConfig, LimitsConfig, ComponentMetricsConfig, HttpConfig,
                                  PullConfig, MockWorkerConfig, DemoConfig])
def test_defaults_are_valid_and_configs_are_frozen_and_slotted(kind):
    config = kind()
    name = dataclasses.fields(kind)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, getattr(config, name))
    assert not hasattr(config, "__dict__")


def test_a_problem_names_other_fields_as_its_reader_knows_them():
    with pytest.raises(ConfigError) as error:
        PullConfig(poll_interval=2.0, scrape_timeout=3.0)
    assert str(error.value) == "scrape_timeout: 3 must be below poll_interval 2"
    assert error.value.explain(lambda field: f"<{field}>") == "3 must be below <poll_interval> 2"
    inside = error.value.within("pull")
    assert (inside.field, inside.related) == ("pull.scrape_timeout", ("pull.poll_interval",))


def test_pull_timeout_defaults_to_most_of_the_interval():
    assert PullConfig(poll_interval=2.0).timeout == 1.6
    assert PullConfig(poll_interval=2.0, scrape_timeout=0.5).timeout == 0.5


def test_secrets_never_show_in_repr_or_errors():
    nats = NatsConfig(urls=("nats://alice:url-secret@a:4222",), user="alice", password="pw-secret")
    token = NatsConfig(token="token-secret")
    shown = repr(AggregatorConfig(nats=nats)) + repr(token)
    for secret in ("url-secret", "pw-secret", "token-secret"):
        assert secret not in shown
    assert "alice" in shown and "***" in shown  # what is set still shows
    with pytest.raises(ConfigError) as error:
        NatsConfig(urls=("nats://alice:url-secret@a:99999",))
    assert "url-secret" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        NatsConfig(user="alice", password=b"pw-secret")  # type: ignore[arg-type]
    assert "pw-secret" not in str(error.value)


def test_push_urls_never_show_their_credentials_and_their_labels_are_checked():
    config = AggregatorConfig(push_gateway=PushGatewayConfig("http://pusher:gw-secret@gw:9091"),
                              remote_write=RemoteWriteConfig("https://writer:rw-secret@mimir/api/v1/push"))
    shown = repr(config)
    assert "gw-secret" not in shown and "rw-secret" not in shown
    assert "http://***@gw:9091" in shown and "https://***@mimir/api/v1/push" in shown
    for bad, problem in (("ftp://gw", r"is not an http\(s\) URL"), ("http://u:gw-secret@gw:x", "has an invalid port"),
                         ("http://gw/?a=1", "must have no query")):
        with pytest.raises(ConfigError, match=problem) as error:
            PushGatewayConfig(bad)
        assert "gw-secret" not in str(error.value)
    for labels, problem in (((("job", "x"),), "'job' is reserved"), ((("a", "1"), ("a", "2")), "'a' given twice"),
                            ((("__name__", "x"),), "not a label name"), ((("a-b", "x"),), "not a label name"),
                            ((("a", ""),), "must be 1-")):
        with pytest.raises(ConfigError, match=problem):
            PushGatewayConfig("http://gw", grouping=labels)
    with pytest.raises(ConfigError, match="must be at least max_samples_per_send 2000"):
        RemoteWriteConfig("http://r", queue_samples=1999)


# --- the command line: every flag sets one config field -------------------------------------

def value_at(config: object, path: str) -> object:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def test_every_flag_sets_a_config_field_and_every_field_has_a_flag():
    assert len({flag.field for flag in cli.FLAGS}) == len(cli.FLAGS)
    for flag in cli.FLAGS:
        section, _, name = flag.field.rpartition(".")
        field_named(cli.SECTIONS[section], name)  # raises KeyError if the field does not exist
    sections = {name for name in cli.SECTIONS if name}
    fields = {f"{section}.{item.name}".lstrip(".") for section, kind in cli.SECTIONS.items()
              for item in dataclasses.fields(kind) if item.name not in sections}
    assert fields == set(cli.FIELD_FLAGS)
    # The same for the mock worker.
    assert {item.name for item in dataclasses.fields(MockWorkerConfig)} == set(mock_worker_cli.FIELD_FLAGS)


ON = ["--hit-rate-stream", "hits", "--scrape", "backend/generate",  # the optional sections, on
      "--discovery-backend", "file",
      "--push-gateway", "http://gateway:9091", "--remote-write", "http://receiver/api/v1/write"]


def on_without(name: str) -> list[str]:
    """ON, less the flag `name` and its value."""
    return [item for flag, value in zip(ON[::2], ON[1::2], strict=True) if flag != name for item in (flag, value)]


# Required when their section is on.
REQUIRED = {"--hit-rate-stream", "--discovery-backend", "--push-gateway", "--remote-write"}
WITH_DEFAULTS = [flag for flag in cli.FLAGS if flag.name not in REQUIRED]


@pytest.mark.parametrize("flag", WITH_DEFAULTS, ids=[flag.name for flag in WITH_DEFAULTS])
def test_each_flag_given_its_default_gives_the_config_default(flag):
    default = cli.default_of(flag)
    argv = ON + ([flag.name, str(default)] if default is not None else [])
    config = cli.parse_config(argv)
    section, _, name = flag.field.rpartition(".")
    expected = field_named(cli.SECTIONS[section], name).default
    assert value_at(config, flag.field) == (None if expected is dataclasses.MISSING else expected)


def test_no_flags_give_the_default_config():
    assert cli.parse_config([]) == AggregatorConfig()
    config = cli.parse_config(ON)
    assert config.journal == JournalConfig("hits")
    assert config.pull == PullConfig((ScrapeTarget("backend", "generate"),))
    assert config.discovery == DiscoveryConfig("file", file_kv=cli.dynamo_file_kv())
    assert config.push_gateway == PushGatewayConfig("http://gateway:9091")
    assert config.remote_write == RemoteWriteConfig("http://receiver/api/v1/write")
    assert mock_worker_cli.parse_config([]) == MockWorkerConfig()
    from fleet_demo.__main__ import parse_config as demo_config

    assert demo_config([]) == DemoConfig()


PEM_KEY = "-----BEGIN PRIVATE KEY-----\nkey-secret\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def given(tmp_path):
    """A value other than the default for every flag: its text and the field value it must give."""
    readable = tmp_path / "file"
    readable.write_text("x")
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    path = str(readable)
    return {
        "--nats-url": ("nats://a:1, tls://b:2", ("nats://a:1", "tls://b:2")),
        "--namespace": ("ns-1", "ns-1"),
        "--component": ("prefill", "prefill"),
        "--endpoint": ("chat", "chat"),
        "--host": ("127.0.0.1", "127.0.0.1"),
        "--port": ("0", 0),
        "--stale-after": ("30", 30.0),
        "--max-message-bytes": ("1024", 1024),
        "--max-workers": ("7", 7),
        "--max-groups": ("8", 8),
        "--max-cached-blocks-per-worker": ("100", 100),
        "--max-cached-blocks": ("1000", 1000),
        "--pending-msgs-limit": ("9", 9),
        "--poll-interval": ("2.5", 2.5),
        "--scrape-timeout": ("0.25", 0.25),
        "--pending-bytes-limit": ("2048", 2048),
        "--nats-ping-interval": ("1.5", 1.5),
        "--web-config-file": ("/etc/web.yml", "/etc/web.yml"),
        "--http-max-connections": ("64", 64),
        "--http-header-timeout": ("2.5", 2.5),
        "--http-idle-timeout": ("30", 30.0),
        "--http-write-timeout": ("12", 12.0),
        "--http-max-scrapes": ("7", 7),
        "--nats-user": ("alice", "alice"),
        "--nats-password": (f"@{secret}", "from-file"),
        "--nats-token": ("tok", "tok"),
        "--nats-nkey-seed": (path, path),
        "--nats-creds": (path, path),
        "--nats-tls-ca": (path, path),
        "--nats-tls-cert": (path, path),
        "--nats-tls-key": (path, path),
        "--hit-rate-stream": ("other", "other"),
        "--hit-rate-snapshot": ("/var/lib/x.json", "/var/lib/x.json"),
        "--hit-rate-snapshot-interval": ("60", 60.0),
        "--hit-rate-stream-max-age": ("3600", 3600.0),
        "--hit-rate-stream-replicas": ("3", 3),
        "--push-gateway": ("https://u:p@gw:9091/prefix", "https://u:p@gw:9091/prefix"),
        "--push-gateway-job": ("fleet", "fleet"),
        "--push-gateway-grouping": ("instance=a, zone=eu-1", (("instance", "a"), ("zone", "eu-1"))),
        "--push-gateway-interval": ("15", 15.0),
        "--push-gateway-timeout": ("2", 2.0),
        "--remote-write": ("http://mimir:8080/api/v1/push", "http://mimir:8080/api/v1/push"),
        "--remote-write-interval": ("10", 10.0),
        "--remote-write-timeout": ("3", 3.0),
        "--remote-write-labels": ("replica=b", (("replica", "b"),)),
        "--remote-write-max-samples-per-send": ("500", 500),
        "--remote-write-queue-samples": ("5000", 5000),
        "--component-metrics-prefixes": ("a_, b_", ("a_", "b_")),
        "--component-metrics-max-bytes": ("4096", 4096),
        "--component-metrics-max-series-per-worker": ("10", 10),
        "--component-metrics-max-series": ("20", 20),
        "--gpu-hostname-label": ("hostname", "hostname"),
        "--discovery-backend": ("etcd", "etcd"),
        "--discovery-file-kv": ("/var/lib/dynamo", "/var/lib/dynamo"),
        "--etcd-endpoints": ("http://a:2379, b:2379", ("http://a:2379", "http://b:2379")),
        "--etcd-username": ("root", "root"),
        "--etcd-password": (f"@{secret}", "from-file"),
        "--etcd-ca": (path, path),
        "--etcd-client-cert": (path, path),
        "--etcd-client-key": (PEM_KEY, PEM_KEY),  # PEM text, as Dynamo's workers take it
        "--discovery-file-ttl": ("20", 20.0),
        "--discovery-file-scan-interval": ("0.5", 0.5),
        "--discovery-max-entry-bytes": ("4096", 4096),
        "--discovery-max-entries": ("50", 50),
        "--zmq-max-publishers": ("10", 10),
        "--zmq-receive-hwm": ("50", 50),
        "--zmq-broker-url": ("xsub=tcp://b:5555 , xpub=tcp://b:5556;tcp://c:5556",
                             ("tcp://b:5556", "tcp://c:5556")),
        "--shards": ("11", 11),  # ON's pull target, backend, is in partition 0 of 11 (shard 0, the default)
        "--shard": ("1", 1),
        "--shard-subject-prefix": ("shard", "shard"),
    }


# Flags that only make sense with another one.
PARTNERS = {"--nats-user": ["--nats-password", "p"], "--nats-password": ["--nats-user", "u"],
            "--nats-tls-cert": ["--nats-tls-key", "KEY"], "--nats-tls-key": ["--nats-tls-cert", "KEY"],
            # backend, ON's pull target, is in partition 1 of 2.
            "--shard": ["--shards", "2"], "--shard-subject-prefix": ["--shards", "2", "--shard", "1"]}


@pytest.mark.parametrize("source", ["flag", "env"])
def test_each_flag_and_its_variable_set_their_field(given, source, monkeypatch):
    assert set(given) == {flag.name for flag in cli.FLAGS}
    parser = cli.build_parser()
    for flag in cli.FLAGS:
        text, expected = given[flag.name]
        partner = [text if value == "KEY" else value for value in PARTNERS.get(flag.name, [])]
        base = on_without(flag.name)
        if source == "flag":
            args = parser.parse_args([*base, *partner, flag.name, text])
        else:
            monkeypatch.setenv(flag.env, text)
            args = cli.build_parser().parse_args([*base, *partner])
            monkeypatch.delenv(flag.env)
        config = cli.config_from_values(vars(args), (ScrapeTarget("backend", "generate"),))
        assert value_at(config, flag.field) == expected, flag.name


def test_an_empty_variable_names_no_file(monkeypatch):
    monkeypatch.setenv("AGGREGATOR_WEB_CONFIG_FILE", "")
    monkeypatch.setenv("AGGREGATOR_HIT_RATE_SNAPSHOT", "")
    config = cli.parse_config(ON)
    assert config.http.web_config_file is None and config.journal.snapshot_path is None


def test_scrape_targets_come_from_the_flag_or_the_variable(monkeypatch):
    both = (ScrapeTarget("backend", "generate"), ScrapeTarget("prefill", "generate"))
    assert cli.parse_config(["--scrape", "backend/generate", "--scrape", "prefill/generate"]).pull.targets == both
    monkeypatch.setenv("AGGREGATOR_SCRAPE", "backend/generate, prefill/generate")
    assert cli.parse_config([]).pull.targets == both


@pytest.mark.parametrize("argv,env,line", [
    (["--max-groups", "0"], {}, "argument --max-groups: 0 is outside 1..1000000 (env AGGREGATOR_MAX_GROUPS)"),
    ([], {"AGGREGATOR_HIT_RATE_SNAPSHOT_INTERVAL": "0.01"},
     "argument --hit-rate-snapshot-interval: 0.01 is outside 0.1..3600.0 (env AGGREGATOR_HIT_RATE_SNAPSHOT_INTERVAL)"),
    (["--nats-user", "u"], {}, "argument --nats-password: needed with --nats-user (env NATS_PASSWORD)"),
    (["--nats-token", "t", "--nats-user", "u", "--nats-password", "p"], {},
     ("argument --nats-token: cannot be combined with --nats-user: choose one NATS authentication method "
     "(env NATS_TOKEN)")),
    (["--scrape", "a/b", "--poll-interval", "3", "--stale-after", "2"], {},
     ("argument --poll-interval: 3 must be below --stale-after 2, or every scraped worker would expire between "
     "polls (env AGGREGATOR_POLL_INTERVAL)")),
])
def test_a_bad_config_is_one_line_naming_the_flag_and_variable(argv, env, line, monkeypatch, capsys):
    assert_refused_in_one_line(argv, env, line, monkeypatch, capsys)


def assert_refused_in_one_line(argv: list[str], env: dict[str, str], line: str, monkeypatch, capsys) -> None:
    """`python -m aggregator argv` with `env` exits 2 with exactly `line` on stderr."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"aggregator: error: {line}\n"


def test_the_mock_worker_reports_a_bad_config_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        mock_worker_cli.parse_config(["--protocol", "legacy", "--mode", "pull", "--dp-ranks", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("mock_worker: error: argument --dp-ranks: pull mode serves one "
                                       "ForwardPassMetrics per worker endpoint; use 1 (env MOCK_WORKER_DP_RANKS)\n")


# --- the service takes the config as it is --------------------------------------------------

def test_the_aggregator_uses_every_section_of_its_config(tmp_path):
    from aggregator.service import Aggregator

    config = AggregatorConfig(
        nats=NatsConfig(urls=("nats://127.0.0.1:1", "nats://127.0.0.1:2"), ping_interval=1.5,
                        pending_msgs_limit=11, pending_bytes_limit=2048),
        http=HttpConfig(host="127.0.0.1", port=0),
        limits=LimitsConfig(stale_after=30.0, max_message_bytes=1024, max_workers=7, max_groups=8,
                            max_cached_blocks_per_worker=5, max_cached_blocks=9),
        journal=JournalConfig("hits", snapshot_path=str(tmp_path / "hits.json"), snapshot_interval=2.0,
                              stream_max_age=120.0),
        pull=PullConfig((ScrapeTarget("prefill", "generate"),), poll_interval=3.0, scrape_timeout=0.5),
        namespace="ns", component="decode", endpoint="chat",
    )
    aggregator = Aggregator(config)
    assert aggregator.config is config
    assert (aggregator.fleet.stale_after, aggregator.fleet.max_workers, aggregator.fleet.max_groups,
            aggregator.fleet.default_endpoint) == (30.0, 7, 8, "chat")
    assert (aggregator.fleet.kv_blocks.max_per_worker, aggregator.fleet.kv_blocks.max_total) == (5, 9)
    assert (aggregator.ingest.namespace, aggregator.ingest.default_component,
            aggregator.ingest.max_message_bytes) == ("ns", "decode", 1024)
    subscriber = aggregator.subscriber
    assert subscriber.servers == ["nats://127.0.0.1:1", "nats://127.0.0.1:2"]
    assert (subscriber.ping_interval, subscriber.pending_msgs_limit, subscriber.pending_bytes_limit) == (1.5, 11, 2048)
    journal = aggregator.journal
    assert (journal.stream, journal.snapshot_path, journal.interval, journal.max_age) == \
        ("hits", tmp_path / "hits.json", 2.0, 120.0)
    scraper = aggregator.scraper
    assert [plan.service for plan in scraper.plans] == ["ns_prefill"]
    assert (scraper.poll_interval, scraper.timeout, scraper.max_message_bytes) == (3.0, 0.5, 1024)
    assert Aggregator(AggregatorConfig()).journal is None and Aggregator(AggregatorConfig()).scraper is None
