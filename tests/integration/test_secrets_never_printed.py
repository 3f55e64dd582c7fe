"""No secret is ever printed: every secret-bearing flag and variable, given an invalid value, is
refused with one line that does not quote it; a valid URL with credentials is not logged either.

Each case runs the real program (`python -m aggregator`, and `python -m mock_worker` for the
URL it shares) and searches all of its output for the secret.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleet_demo.nats_server import free_port

from ..support import ROOT, wait_until

# (case, command-line arguments, environment, the secret that must not appear)
INVALID = [
    ("url-port-flag", ["--nats-url", "nats://u:LeakPw01@127.0.0.1:99999"], {}, "LeakPw01"),
    ("url-port-env", [], {"NATS_SERVER": "nats://u:LeakPw02@127.0.0.1:99999"}, "LeakPw02"),
    ("url-scheme-flag", ["--nats-url", "http://u:LeakPw03@127.0.0.1:4222"], {}, "LeakPw03"),
    ("url-scheme-env", [], {"NATS_SERVER": "http://u:LeakPw04@127.0.0.1:4222"}, "LeakPw04"),
    # A password holding characters that defeat URL parsing: '/', ',' (the list separator), '@'.
    ("url-slash", ["--nats-url", "nats://u:Leak/Pw05@127.0.0.1:99999"], {}, "Leak/Pw05"),
    ("url-comma", ["--nats-url", "nats://u:LeakA,LeakB06@127.0.0.1:4222"], {}, "LeakA"),
    ("url-comma-tail", [], {"NATS_SERVER": "nats://u:LeakC,LeakD07@127.0.0.1:4222"}, "LeakD07"),
    ("url-at", ["--nats-url", "nats://u:Leak@Pw08@127.0.0.1:99999"], {}, "Pw08"),
    ("url-no-scheme", ["--nats-url", "u:LeakPw09@127.0.0.1:4222"], {}, "LeakPw09"),
    ("url-second", ["--nats-url", "nats://127.0.0.1:4222,nats://v:LeakPw10@127.0.0.1:99999"], {}, "LeakPw10"),
    ("url-equals-form", ["--nats-url=nats://u:LeakPw11@127.0.0.1:99999"], {}, "LeakPw11"),
    # A password or token that starts with '@' reads as a file name: the error must not quote it.
    ("password-flag", ["--nats-user", "u", "--nats-password", "@LeakPw12"], {}, "LeakPw12"),
    ("password-env", ["--nats-user", "u"], {"NATS_PASSWORD": "@LeakPw13"}, "LeakPw13"),
    ("token-flag", ["--nats-token", "@LeakTok14"], {}, "LeakTok14"),
    ("token-env", [], {"NATS_TOKEN": "@LeakTok15"}, "LeakTok15"),
    # Valid secrets in an invalid combination, and mistyped or ambiguous secret flags.
    ("password-without-user", ["--nats-password", "LeakPw16"], {}, "LeakPw16"),
    ("token-and-password", ["--nats-token", "LeakTok17", "--nats-user", "u"], {"NATS_PASSWORD": "LeakPw17"},
     "LeakTok17"),
    ("mistyped-flag", ["--nats-pasword", "LeakPw18"], {}, "LeakPw18"),
    ("mistyped-flag-equals", ["--nats-tokn=LeakTok19"], {}, "LeakTok19"),
    ("ambiguous-flag", ["--nats=LeakTok20"], {}, "LeakTok20"),
    # etcd's password and client key (Dynamo's ETCD_AUTH_PASSWORD, ETCD_AUTH_CLIENT_KEY: a key is PEM text).
    ("etcd-password-flag", ["--etcd-username", "u", "--etcd-password", "@LeakPw27"], {}, "LeakPw27"),
    ("etcd-password-env", ["--etcd-username", "u"], {"ETCD_AUTH_PASSWORD": "@LeakPw28"}, "LeakPw28"),
    ("etcd-password-without-user", ["--discovery-backend", "etcd"], {"ETCD_AUTH_PASSWORD": "LeakPw29"}, "LeakPw29"),
    ("etcd-key-not-pem", [], {"ETCD_AUTH_CLIENT_KEY": "LeakKey30\nLeakKey30"}, "LeakKey30"),
    ("etcd-key-bad-pem", ["--discovery-backend", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379"],
     {"ETCD_AUTH_CLIENT_CERT": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
      "ETCD_AUTH_CLIENT_KEY": "-----BEGIN PRIVATE KEY-----\nLeakKey31\n-----END PRIVATE KEY-----\n"}, "LeakKey31"),
]


def run(program: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "AGGREGATOR_", "ETCD_", "DYN_"))}
    return subprocess.run([sys.executable, "-m", program, *args], check=False, capture_output=True, text=True,
                          timeout=30, env={**clean, **env}, cwd=ROOT)


@pytest.mark.parametrize("case,args,env,secret", INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_secret_bearing_value_is_refused_without_printing_it(case, args, env, secret):
    result = run("aggregator", args, env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert secret not in output, output


@pytest.mark.parametrize("case,args,env,secret", [c for c in INVALID if c[0].startswith("url")],
                         ids=[c[0] for c in INVALID if c[0].startswith("url")])
def test_the_mock_worker_does_not_print_url_secrets_either(case, args, env, secret):
    result = run("mock_worker", args, env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert secret not in output, output


@pytest.mark.parametrize("content,secret", [
    ("basic_auth_users:\n  prometheus: LeakPw21\n", "LeakPw21"),  # a plaintext password where the hash goes
    ("basic_auth_users:\n  prometheus: '$2b$12$LeakPw22'\n", "LeakPw22"),  # a truncated hash
    ("basic_auth_users:\n  prometheus: \"LeakPw23\n", "LeakPw23"),  # unterminated quote: a YAML error
    ("basic_auth_users:\n  - LeakPw24\n", "LeakPw24"),  # a list, not a mapping
    ("basic_auth_users:\n  prometheus: LeakPw25\n  prometheus: x\n", "LeakPw25"),
    ("LeakPw26\n", "LeakPw26"),  # not a mapping at all
])
def test_a_web_config_error_does_not_print_the_credentials(tmp_path, content, secret):
    web = tmp_path / "web.yml"
    web.write_text(content)
    result = run("aggregator", ["--web-config-file", str(web)], {})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert secret not in output, output


def test_a_valid_url_with_credentials_is_not_logged_while_nats_is_unreachable(processes):
    aggregator = processes.aggregator(f"nats://u:LeakPw27@127.0.0.1:{free_port()}", ready=False)
    wait_until(lambda: "NATS" in aggregator.output().split("serving metrics", 1)[-1], 15, what="a NATS warning")
    assert aggregator.health() == 503
    assert "LeakPw27" not in aggregator.output()
