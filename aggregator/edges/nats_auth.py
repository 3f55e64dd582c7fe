"""NATS credentials and TLS for the aggregator: flags with env defaults, checked at start, never logged.

Every method nats-server offers to a client is supported: user/password, token, an
NKey seed file, a `.creds` file (JWT + NKey seed, as `nsc` writes it) and TLS with a CA
and an optional client certificate (mutual TLS). Secrets can be given in the
environment rather than on the command line, where `ps` would show them; the password
and token also accept `@/path/to/file` so they can come from a mounted secret.

Nothing here logs: `describe()` says which methods are configured, without the secrets,
and `redact_url()` strips credentials from a URL before it is logged or shown in /health.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from fleet_runtime.flags import env_flag
from fleet_runtime.redaction import redact_url

__all__ = ["add_flags", "check", "connect_options", "describe", "redact_url", "tls_context"]


def _secret(value: str) -> str:
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
    path = Path(value)
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ValueError(f"cannot read {value}: {error.strerror}") from None
    return value


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NATS authentication and TLS")
    env_flag(group, "--nats-user", "NATS_USER", None, str, "NATS user name")
    env_flag(group, "--nats-password", "NATS_PASSWORD", None, _secret,
             "NATS password (or @FILE); prefer the env variable to the flag")
    env_flag(group, "--nats-token", "NATS_TOKEN", None, _secret, "NATS auth token (or @FILE)")
    env_flag(group, "--nats-nkey-seed", "NATS_NKEY_SEED_FILE", None, _readable_file, "file holding an NKey user seed")
    env_flag(group, "--nats-creds", "NATS_CREDS", None, _readable_file, "NATS .creds file (user JWT + NKey seed)")
    env_flag(group, "--nats-tls-ca", "NATS_TLS_CA", None, _readable_file, "CA bundle to verify the NATS server")
    env_flag(group, "--nats-tls-cert", "NATS_TLS_CERT", None, _readable_file, "client certificate for mutual TLS")
    env_flag(group, "--nats-tls-key", "NATS_TLS_KEY", None, _readable_file, "client private key for mutual TLS")


def check(args: argparse.Namespace) -> str | None:
    """One line describing an inconsistent combination, or None."""
    if (args.nats_user is None) != (args.nats_password is None):
        return "--nats-user and --nats-password go together"
    if (args.nats_tls_cert is None) != (args.nats_tls_key is None):
        return "--nats-tls-cert and --nats-tls-key go together"
    methods = [m for m in ("user", "token", "nkey", "creds") if m in describe(args)]
    if len(methods) > 1:
        return f"choose one NATS authentication method, got {', '.join(methods)}"
    try:
        connect_options(args)
    except (ssl.SSLError, OSError, ValueError) as error:
        return f"NATS TLS: {error}"
    return None


def describe(args: argparse.Namespace) -> list[str]:
    """The methods configured, for the start-up log line (no secrets)."""
    methods = []
    if args.nats_user is not None:
        methods.append("user")
    if args.nats_token is not None:
        methods.append("token")
    if args.nats_nkey_seed is not None:
        methods.append("nkey")
    if args.nats_creds is not None:
        methods.append("creds")
    if args.nats_tls_ca is not None or args.nats_tls_cert is not None:
        methods.append("tls")
    return methods


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def connect_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for `nats.connect`."""
    options: dict = {}
    if args.nats_user is not None:
        options["user"] = args.nats_user
        options["password"] = args.nats_password
    if args.nats_token is not None:
        options["token"] = args.nats_token
    if args.nats_nkey_seed is not None:
        options["nkeys_seed"] = args.nats_nkey_seed
    if args.nats_creds is not None:
        options["user_credentials"] = args.nats_creds
    if args.nats_tls_ca is not None or args.nats_tls_cert is not None:
        options["tls"] = tls_context(args.nats_tls_ca, args.nats_tls_cert, args.nats_tls_key)
    return options
