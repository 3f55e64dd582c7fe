"""TLS and basic auth for the HTTP endpoint, from a Prometheus exporter-toolkit web config file.

The same YAML that node_exporter and every exporter-toolkit exporter read with
`--web.config.file`, so one file and one set of habits serve the whole monitoring stack:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_ca_file: ca.crt            # optional
      client_auth_type: RequireAndVerifyClientCert   # optional; NoClientCert by default
      min_version: TLS12                # optional
    basic_auth_users:
      prometheus: $2b$12$...            # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

Relative paths are relative to the file. Unknown keys are an error (a typo must not
silently leave the endpoint open). Basic auth guards every path, /health and /live
included, as exporter-toolkit does; probes send the header too. Good credentials are
cached (bounded) because bcrypt is deliberately slow and Prometheus scrapes every few seconds;
how the check stands up to hostile clients is told in BasicAuth.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import re
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml
from aiohttp import web

from aggregator.collectors.http_telemetry import HttpTelemetry

_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CACHE_LIMIT = 1024
# `$2b$12$` + 22 characters of salt + 31 of hash, bcrypt's own base64 alphabet; costs 4-31.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


class WebConfigError(ValueError):
    pass


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"


def load(path: str) -> WebConfig:
    file = Path(path)
    try:
        document = yaml.safe_load(file.read_text()) or {}
    except OSError as error:
        raise WebConfigError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise WebConfigError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        # The first line only: the next ones quote the offending line of the file, which may hold a secret.
        raise WebConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise WebConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(document) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {sorted(unknown)}")
    config = WebConfig()
    tls = document.get("tls_server_config")
    if tls:
        config.ssl_context = _tls(tls, file.parent, path)
    users = document.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise WebConfigError(f"{path}: basic_auth_users must map user names to bcrypt hashes")
    for user, hashed in users.items():
        # Checked whole: a malformed hash made bcrypt raise at every request. The value is never
        # quoted (a plaintext password put where the hash goes is a common mistake).
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"{path}: basic_auth_users.{user} is not a bcrypt hash")
        config.users[str(user)] = hashed.encode()
    return config


def _tls(tls: dict, base: Path, path: str) -> ssl.SSLContext:
    if not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"{path}: unknown tls_server_config keys {sorted(unknown)}")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError(f"{path}: tls_server_config needs cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS.get(tls.get("min_version", "TLS12"), ssl.TLSVersion.TLSv1_2)
    try:
        context.load_cert_chain(base / tls["cert_file"], base / tls["key_file"])
        auth = tls.get("client_auth_type", "NoClientCert")
        if auth not in _CLIENT_AUTH:
            raise WebConfigError(f"{path}: client_auth_type must be one of {sorted(_CLIENT_AUTH)}")
        context.verify_mode = _CLIENT_AUTH[auth]
        if tls.get("client_ca_file"):
            context.load_verify_locations(base / tls["client_ca_file"])
        elif context.verify_mode != ssl.CERT_NONE:
            raise WebConfigError(f"{path}: client_auth_type {auth} needs client_ca_file")
    except (OSError, ssl.SSLError) as error:
        raise WebConfigError(f"{path}: TLS: {error}") from None
    return context


class BasicAuth:
    """Checks `Authorization: Basic` against the configured bcrypt hashes, hostile clients in mind.

    - Anything malformed (not base64, no colon, not UTF-8, any size aiohttp lets through) is a 401;
      nothing a client sends raises. A password is compared on its first 72 bytes, as bcrypt always
      did and exporter-toolkit's Go bcrypt does (bcrypt 5 raises on longer ones instead).
    - An unknown user costs the same as a known one: a bcrypt check against a dummy hash of the
      configured cost (the highest, if users' costs differ; give them one cost).
    - Checks run in their own threads, at most `concurrent_checks` at once, `waiting_limit` queued
      (past it, 503 at once): a flood of wrong passwords costs that many cores, never the render
      thread or the event loop. Good credentials are cached (keyed hashes), so an authorised
      Prometheus is checked once and then served without waiting behind the flood.
    """

    def __init__(self, users: dict[str, bytes], telemetry: HttpTelemetry | None = None, *,
                 concurrent_checks: int = 1, waiting_limit: int = 64) -> None:
        self.users = users
        self.telemetry = telemetry
        cost = max((int(hashed[4:6]) for hashed in users.values()), default=10)
        self.dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))
        self.waiting_limit = waiting_limit
        self._verified: set[bytes] = set()
        self._cache_key = os.urandom(32)
        self._checks = asyncio.Semaphore(concurrent_checks)
        self._waiting = 0
        self._executor = ThreadPoolExecutor(concurrent_checks, thread_name_prefix="bcrypt")

    def matches(self, credential: bytes) -> bool:
        """`user:password` against the configured hashes; the same bcrypt work whether the user exists or not."""
        user, _, password = credential.partition(b":")
        try:
            hashed = self.users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            hashed = None
        try:
            matched = bcrypt.checkpw(password[:72], self.dummy if hashed is None else hashed)
        except ValueError:  # e.g. a NUL byte, on a bcrypt that refuses them
            matched = False
        return matched and hashed is not None

    async def allows(self, credential: bytes) -> bool | None:
        """True or False; None when too many checks are already waiting."""
        key = hmac.new(self._cache_key, credential, "sha256").digest()  # the cache holds no password
        if key in self._verified:
            return True
        if self._waiting >= self.waiting_limit:
            return None
        self._waiting += 1
        try:
            async with self._checks:
                matched = await asyncio.get_running_loop().run_in_executor(self._executor, self.matches, credential)
        finally:
            self._waiting -= 1
        if matched:
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()
            self._verified.add(key)
        return matched

    def _refuse(self, reason: str) -> web.Response:
        if self.telemetry is not None:
            self.telemetry.refused[reason].inc()
        if reason == "auth_busy":
            return web.Response(status=503, text="Too many password checks in progress\n", headers={"Retry-After": "1"})
        return web.Response(status=401, text="Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="llm-aggregator"'})

    def middleware(self):
        @web.middleware
        async def basic_auth(request: web.Request, handler):
            credential = _credential(request.headers.get("Authorization", ""))
            if credential is None:
                return self._refuse("unauthorized")
            allowed = await self.allows(credential)
            if allowed is None:
                return self._refuse("auth_busy")
            if not allowed:
                return self._refuse("unauthorized")
            return await handler(request)

        return basic_auth


def basic_auth_middleware(users: dict[str, bytes], telemetry: HttpTelemetry | None = None):
    """aiohttp middleware answering 401 unless the request carries a listed user's password."""
    return BasicAuth(users, telemetry).middleware()


def _credential(header: str) -> bytes | None:
    """The decoded `user:password` of a Basic Authorization header, or None if it is not one."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:  # not base64, or not ASCII
        return None
    return decoded if b":" in decoded else None
