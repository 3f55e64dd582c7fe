"""The discovery section of the aggregator's config: Dynamo's own variables, checked like every other setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aggregator import cli
from aggregator.config import ConfigError, DiscoveryConfig

from ..pki import write_pki
from .test_config import assert_refused_in_one_line

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
    # etcd's auth and TLS: pairs both or neither, certificates only with https:// endpoints.
    ({"backend": "etcd", "etcd_username": "root"}, "etcd_password"),
    ({"backend": "etcd", "etcd_password": "secret"}, "etcd_username"),
    ({"backend": "etcd", "etcd_username": "root", "etcd_password": ""}, "etcd_password"),
    ({"backend": "etcd", "etcd_endpoints": ("https://a:2379",), "etcd_client_cert": "/c"}, "etcd_client_key"),
    ({"backend": "etcd", "etcd_endpoints": ("https://a:2379",), "etcd_client_key": "/k"}, "etcd_client_cert"),
    ({"backend": "etcd", "etcd_ca": "/ca"}, "etcd_ca"),  # the default endpoint is http://
    ({"backend": "etcd", "etcd_endpoints": ("https://a:2379", "http://b:2379"), "etcd_client_cert": "/c",
      "etcd_client_key": "/k"}, "etcd_client_cert"),
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
    assert_refused_in_one_line(argv, env, line, monkeypatch, capsys)


ETCD_ENV = ["ETCD_AUTH_USERNAME", "ETCD_AUTH_PASSWORD", "ETCD_AUTH_CA", "ETCD_AUTH_CLIENT_CERT", "ETCD_AUTH_CLIENT_KEY"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


def test_dynamos_etcd_auth_variables_configure_it_as_pem_text_or_files(monkeypatch, pki):
    assert {flag.env for flag in cli.FLAGS if flag.field.startswith("discovery.etcd_")} >= set(ETCD_ENV)
    ca, cert, key = pki["ca"][0], *pki["client"]
    pem = {path: Path(path).read_text() for path in (ca, cert, key)}
    for name, value in zip(ETCD_ENV, ("root", "Pw-1", pem[ca], pem[cert], pem[key]), strict=True):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "etcd")
    monkeypatch.setenv("ETCD_ENDPOINTS", "https://etcd:2379")
    config = cli.parse_config([]).discovery
    assert config == DiscoveryConfig("etcd", etcd_endpoints=("https://etcd:2379",), etcd_username="root",
                                     etcd_password="Pw-1", etcd_ca=pem[ca], etcd_client_cert=pem[cert],
                                     etcd_client_key=pem[key])
    # Paths, and the password from a file, work as well.
    (pki["dir"] / "password").write_text("Pw-2\n")
    config = cli.parse_config(["--etcd-password", f"@{pki['dir'] / 'password'}", "--etcd-ca", ca,
                               "--etcd-client-cert", cert, "--etcd-client-key", key]).discovery
    assert (config.etcd_password, config.etcd_ca, config.etcd_client_cert, config.etcd_client_key) == (
        "Pw-2", ca, cert, key)
    shown = repr(config) + repr(cli.parse_config([]))
    assert "Pw-1" not in shown and "Pw-2" not in shown and "PRIVATE KEY" not in shown
    assert "etcd_password='***'" in shown and "etcd_client_key='<PEM>'" in shown and "etcd_username='root'" in shown


def test_the_etcd_settings_of_a_file_backend_are_not_checked_together():
    # Dynamo's workers with file discovery ignore them too: no reason to refuse to start.
    assert DiscoveryConfig("file", etcd_username="root", etcd_ca="/ca").etcd_password is None


@pytest.mark.parametrize("argv,env,line", [
    (["--discovery-backend", "etcd", "--etcd-username", "root"], {},
     "argument --etcd-password: needed with --etcd-username (env ETCD_AUTH_PASSWORD)"),
    (["--discovery-backend", "etcd"], {"ETCD_AUTH_CLIENT_CERT": "CERT"},
     "argument --etcd-client-key: needed with --etcd-client-cert (env ETCD_AUTH_CLIENT_KEY)"),
    (["--discovery-backend", "etcd"], {"ETCD_AUTH_CA": "CA"},
     "argument --etcd-ca: needs https:// endpoints in --etcd-endpoints, not 'http://localhost:2379' "
     "(env ETCD_AUTH_CA)"),
    ([], {"ETCD_AUTH_CA": "/nonexistent/ca.pem"},  # read even while discovery is off
     "argument --etcd-ca: cannot read /nonexistent/ca.pem: No such file or directory (env ETCD_AUTH_CA)"),
    ([], {"ETCD_AUTH_CLIENT_KEY": "key-secret\nline 2"},
     "argument --etcd-client-key: is neither PEM text (-----BEGIN ...) nor a file's path (env ETCD_AUTH_CLIENT_KEY)"),
    (["--discovery-backend", "etcd", "--etcd-endpoints", "https://etcd:2379"], {"ETCD_AUTH_CA": "GARBAGE"},
     "argument --etcd-ca: not a CA certificate: [X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found "
     "(env ETCD_AUTH_CA)"),
    (["--discovery-backend", "etcd", "--etcd-endpoints", "https://etcd:2379"],
     {"ETCD_AUTH_CLIENT_CERT": "CERT", "ETCD_AUTH_CLIENT_KEY": "-----BEGIN PRIVATE KEY-----\nkey-secret\n"},
     "argument --etcd-client-cert: not a certificate and its private key: [SSL] PEM lib (env ETCD_AUTH_CLIENT_CERT)"),
])
def test_a_bad_etcd_auth_setting_is_one_line_naming_the_flag_and_variable(argv, env, line, monkeypatch, capsys,
                                                                          tmp_path, pki):
    files = {"CA": pki["ca"][0], "CERT": pki["client"][0], "GARBAGE": str(tmp_path / "garbage")}
    (tmp_path / "garbage").write_text("not a certificate\n")
    for name, value in env.items():
        monkeypatch.setenv(name, files.get(value, value))
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert " (_ssl.c:" not in line  # OpenSSL's source line is left out of the comparison
    assert _without_ssl_source(err) == f"aggregator: error: {line}\n"
    assert "key-secret" not in err


def _without_ssl_source(text: str) -> str:
    start = text.find(" (_ssl.c:")
    return text if start < 0 else text[:start] + text[text.index(")", start) + 1:]
