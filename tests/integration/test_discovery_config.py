"""The discovery section of the aggregator's config: Dynamo's own variables, checked like every other setting."""

from __future__ import annotations

import dataclasses

import pytest

from aggregator import cli
from aggregator.config import ConfigError, DiscoveryConfig

DISCOVERY_ENV = ["DYN_DISCOVERY_BACKEND", "DYN_FILE_KV", "ETCD_ENDPOINTS", "TMPDIR",
                 *(flag.env for flag in cli.FLAGS if flag.field.startswith("discovery.") and flag.env)]


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch):
    for name in DISCOVERY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("values,field", [
    ({"backend": "kubernetes"}, "backend"),
    ({"backend": ""}, "backend"),
    ({"backend": "file", "file_kv": ""}, "file_kv"),
    ({"backend": "etcd", "etcd_endpoints": ()}, "etcd_endpoints"),
    ({"backend": "etcd", "etcd_endpoints": "http://a:2379"}, "etcd_endpoints"),  # a string, not a tuple
    ({"backend": "etcd", "etcd_endpoints": ("nats://a:2379",)}, "etcd_endpoints"),
    ({"backend": "etcd", "etcd_endpoints": ("http://a:99999",)}, "etcd_endpoints"),
    ({"backend": "etcd", "etcd_endpoints": ("http://a:2379/v3",)}, "etcd_endpoints"),
    ({"backend": "etcd", "etcd_endpoints": ("http://user:secret@a:2379",)}, "etcd_endpoints"),
    ({"backend": "file", "file_ttl": 3.0}, "file_ttl"),  # below Dynamo's keep-alive period
    ({"backend": "file", "file_ttl": float("nan")}, "file_ttl"),
    ({"backend": "file", "file_scan_interval": 0.0}, "file_scan_interval"),
    ({"backend": "file", "file_ttl": 5.0, "file_scan_interval": 5.0}, "file_scan_interval"),
    ({"backend": "file", "max_entry_bytes": 1023}, "max_entry_bytes"),
    ({"backend": "file", "max_entries": 0}, "max_entries"),
])
def test_a_bad_value_is_refused_naming_its_field(values, field):
    with pytest.raises(ConfigError) as error:
        DiscoveryConfig(**values)
    assert error.value.field == field
    assert "secret" not in str(error.value)


def test_the_defaults_are_dynamos_and_the_config_is_frozen():
    config = DiscoveryConfig("etcd")
    assert (config.file_kv, config.etcd_endpoints, config.file_ttl) == (
        "/tmp/dynamo_store_kv", ("http://localhost:2379",), 10.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend = "file"  # type: ignore[misc]
    assert not hasattr(config, "__dict__")


def test_discovery_is_off_unless_a_backend_is_named(monkeypatch):
    assert cli.parse_config([]).discovery is None
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "")
    monkeypatch.setenv("DYN_FILE_KV", "/srv/kv")  # set for Dynamo's workers: nothing tried without a backend
    assert cli.parse_config([]).discovery is None


def test_dynamos_variables_configure_it(monkeypatch):
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "etcd")
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://10.0.0.1:2379,etcd-2:2379")
    config = cli.parse_config([]).discovery
    assert config == DiscoveryConfig("etcd", etcd_endpoints=("http://10.0.0.1:2379", "http://etcd-2:2379"))
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "FILE")
    monkeypatch.setenv("DYN_FILE_KV", "/srv/kv")
    assert cli.parse_config([]).discovery == DiscoveryConfig("file", file_kv="/srv/kv",
                                                             etcd_endpoints=config.etcd_endpoints)
    assert cli.parse_config(["--discovery-file-kv", "/other"]).discovery.file_kv == "/other"


def test_the_file_backend_defaults_to_dynamos_temporary_directory(monkeypatch):
    assert cli.parse_config(["--discovery-backend", "file"]).discovery.file_kv == "/tmp/dynamo_store_kv"
    monkeypatch.setenv("TMPDIR", "/scratch")
    assert cli.parse_config(["--discovery-backend", "file"]).discovery.file_kv == "/scratch/dynamo_store_kv"
    monkeypatch.setenv("DYN_FILE_KV", "")  # empty: the default too
    assert cli.parse_config(["--discovery-backend", "file"]).discovery.file_kv == "/scratch/dynamo_store_kv"


@pytest.mark.parametrize("argv,env,line", [
    ([], {"DYN_DISCOVERY_BACKEND": "kubernetes"},
     "argument --discovery-backend: 'kubernetes' is not one of file, etcd (env DYN_DISCOVERY_BACKEND)"),
    (["--discovery-backend", "etcd"], {"ETCD_ENDPOINTS": "http://user:secret@etcd:2379"},
     "argument --etcd-endpoints: 'http://***@etcd:2379' holds credentials; give etcd's user and password apart "
     "(ETCD_AUTH_USERNAME, ETCD_AUTH_PASSWORD) (env ETCD_ENDPOINTS)"),
    (["--discovery-backend", "file", "--discovery-file-scan-interval", "12"], {},
     "argument --discovery-file-scan-interval: 12 must be below --discovery-file-ttl 10, or live entries would "
     "expire between scans (env AGGREGATOR_DISCOVERY_FILE_SCAN_INTERVAL)"),
    ([], {"AGGREGATOR_DISCOVERY_MAX_ENTRIES": "0"},  # checked even while discovery is off
     "argument --discovery-max-entries: 0 is outside 1..10000000 (env AGGREGATOR_DISCOVERY_MAX_ENTRIES)"),
])
def test_a_bad_setting_is_one_line_naming_the_flag_and_variable(argv, env, line, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"aggregator: error: {line}\n"
