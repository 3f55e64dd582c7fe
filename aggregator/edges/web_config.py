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
included, as exporter-toolkit does; probes send the header too. Checked passwords are
cached (bounded) because bcrypt is deliberately slow and Prometheus scrapes every few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml
from aiohttp import web

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


def basic_auth_middleware(users: dict[str, bytes]):
    """aiohttp middleware answering 401 unless the request carries a listed user's password."""
    verified: dict[tuple[str, bytes], bool] = {}

    def check(user: str, password: bytes) -> bool:
        hashed = users.get(user)
        if hashed is None:
            # Same cost as a real check, so a probe cannot tell which user names exist.
            bcrypt.checkpw(password, _DUMMY_HASH)
            return False
        return bcrypt.checkpw(password, hashed)

    @web.middleware
    async def middleware(request: web.Request, handler):
        header = request.headers.get("Authorization", "")
        user, password = _parse_basic(header)
        if user is not None:
            key = (user, _digest(password))
            ok = verified.get(key)
            if ok is None:
                ok = await asyncio.to_thread(check, user, password)
                if len(verified) >= _CACHE_LIMIT:
                    verified.clear()
                verified[key] = ok
            if ok:
                return await handler(request)
        return web.Response(status=401, text="Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="llm-aggregator"'})

    return middleware


_DUMMY_HASH = bcrypt.hashpw(b"unused", bcrypt.gensalt(rounds=10))


def _digest(password: bytes) -> bytes:
    # The cache holds a keyed hash, not the password itself.
    return hmac.new(_CACHE_KEY, password, "sha256").digest()


_CACHE_KEY = bcrypt.gensalt()


def _parse_basic(header: str) -> tuple[str | None, bytes]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None, b""
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None, b""
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None, b""
    return user.decode("utf-8", "replace"), password
