"""NATS credentials and TLS for the aggregator's connection, from a NatsConfig; never logged.

Every method nats-server offers to a client is supported: user/password, token, an
NKey seed file, a `.creds` file (JWT + NKey seed, as `nsc` writes it) and TLS with a CA
and an optional client certificate (mutual TLS). Which combinations can work is checked
by `NatsConfig` itself; the files are opened here, when the TLS context is built, and by
nats-py when it connects.

Nothing here logs: `describe()` says which methods are configured, without the secrets,
and `redact_url()` strips credentials from a URL before it is logged or shown in /health.
"""

from __future__ import annotations

import ssl

from aggregator.config import NatsConfig
from fleet_runtime.redaction import redact_url

__all__ = ["check", "connect_options", "describe", "redact_url", "tls_context"]

_METHODS = {"user": "user", "token": "token", "nkey_seed_file": "nkey", "creds_file": "creds"}


def check(config: NatsConfig) -> str | None:
    """One line saying why the TLS files cannot make a context, or None."""
    try:
        connect_options(config)
    except (ssl.SSLError, OSError, ValueError) as error:
        return f"NATS TLS: {error}"
    return None


def describe(config: NatsConfig) -> list[str]:
    """The methods configured, for the start-up log line (no secrets)."""
    return [_METHODS[name] for name in config.auth_fields] + (["tls"] if config.tls else [])


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def connect_options(config: NatsConfig) -> dict:
    """Keyword arguments for `nats.connect`."""
    options: dict = {}
    if config.user is not None:
        options["user"] = config.user
        options["password"] = config.password
    if config.token is not None:
        options["token"] = config.token
    if config.nkey_seed_file is not None:
        options["nkeys_seed"] = config.nkey_seed_file
    if config.creds_file is not None:
        options["user_credentials"] = config.creds_file
    if config.tls:
        options["tls"] = tls_context(config.tls_ca, config.tls_cert, config.tls_key)
    return options
