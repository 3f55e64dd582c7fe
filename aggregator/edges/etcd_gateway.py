"""etcd's v3 JSON gateway, spoken with aiohttp: TLS, the auth token, and what a refusal means.

TLS: one `ssl.SSLContext` built from the discovery config (the CA of etcd's server certificate,
and a client certificate for an etcd started with `--client-cert-auth`) is the session's, so
every request (range, watch, probe, authenticate) is made with it. Certificates and key are PEM
text, as Dynamo's workers take `ETCD_AUTH_CA`, `ETCD_AUTH_CLIENT_CERT` and `ETCD_AUTH_CLIENT_KEY`,
or a file's path.

Auth: etcd's user and password give a token (`POST /v3/auth/authenticate`), sent as
`Authorization: <token>` with every later request. A token is one member's (a simple token lives
in that member's memory: another member, or the same one restarted, does not know it) and it
expires: a simple token after `--auth-token-ttl` seconds unused (300 by default), a JWT on its own
schedule. etcd 3.4's gateway answers a request bearing an unknown or expired token with HTTP 401,
`{"code": 16, "message": "etcdserver: invalid auth token"}`, and a watch bearing one with a watch
canceled at once (`cancel_reason` "... code = Unauthenticated ..."). Either makes the reader
authenticate again and retry, once. Credentials refused (HTTP 400, code 3 "authentication failed,
invalid user ID or password"), a token refused right after it was issued, a user not allowed to
read (HTTP 403, code 7), a store asking for a user when none is configured (code 3 "user name is
empty"), or a client certificate with a CommonName while auth is on (etcd 3.4's gateway refuses
it outright, HTTP 400) is an `auth` failure, left to the caller's count and backoff. A member whose auth is off
answers authenticate with code 9: requests then go without a token, as etcd's Go client does.

Nothing here logs, and nothing it raises holds the password.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
import msgspec
from msgspec import Struct

from aggregator.collectors.discovery_telemetry import AUTH, TLS, UNREACHABLE
from aggregator.config import DiscoveryConfig, is_pem

__all__ = ["EtcdGateway", "EtcdUnavailable", "TokenRefused", "check", "describe", "read_bounded", "tls_context"]

AUTHENTICATE: Final = "/v3/auth/authenticate"
ANSWER_LIMIT: Final = 65536  # bytes of an authenticate or error answer read at most
_SHOWN: Final = 200  # characters of etcd's own message shown in an error
# gRPC status codes in the gateway's error answers.
_INVALID_ARGUMENT: Final = 3
_PERMISSION_DENIED: Final = 7
_FAILED_PRECONDITION: Final = 9  # "authentication is not enabled"
_UNAUTHENTICATED: Final = 16
# etcd's messages for a request with no user while auth is on, and for refused credentials.
_NO_USER: Final = "user name is empty"
_BAD_CREDENTIALS: Final = "authentication failed"
# etcd 3.4's gateway, while auth is on, refuses (HTTP 400, plain text) every request over a connection whose
# client certificate has a CommonName: gRPC clients are authenticated as that name, which it would ignore.
_COMMON_NAME: Final = "CommonName of client sending a request against gateway"


class EtcdUnavailable(Exception):
    """An endpoint did not answer, or answered with something other than what was asked.

    `reason` is the discovery error it counts as: unreachable, auth or tls.
    """

    def __init__(self, detail: str, reason: str = UNREACHABLE) -> None:
        super().__init__(detail)
        self.reason = reason


class TokenRefused(Exception):
    """etcd no longer takes the token sent (expired, another member's, revoked): get a new one."""


class _ErrorAnswer(Struct, gc=False):
    code: int = 0
    message: str = ""


class _Authenticated(Struct, gc=False):
    token: str = ""


_error_decoder: Final = msgspec.json.Decoder(_ErrorAnswer, strict=False)
_token_decoder: Final = msgspec.json.Decoder(_Authenticated, strict=False)


def tls_context(config: DiscoveryConfig) -> ssl.SSLContext | None:
    """The context for https endpoints; None (aiohttp's own: the system's CAs) when no certificate is given."""
    if not config.etcd_tls:
        return None
    context = _verifying(config.etcd_ca)
    if config.etcd_client_cert is not None and config.etcd_client_key is not None:
        _load_client_certificate(context, config.etcd_client_cert, config.etcd_client_key)
    return context


def _verifying(ca: str | None) -> ssl.SSLContext:
    """A client context that trusts `ca` alone, or the system's CAs when None."""
    if ca is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    elif is_pem(ca):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _no_passphrase() -> str:
    # Called only for an encrypted key; without it OpenSSL would ask on the terminal.
    raise ValueError("the client key is encrypted; give it unencrypted, as Dynamo's workers take it")


def _load_client_certificate(context: ssl.SSLContext, cert: str, key: str) -> None:
    if not is_pem(cert) and not is_pem(key):
        context.load_cert_chain(cert, key, password=_no_passphrase)
        return
    # OpenSSL loads a certificate chain from files only: PEM text goes through a private
    # directory (0700, files 0600) that is gone once it is loaded.
    with tempfile.TemporaryDirectory(prefix="aggregator-etcd-tls-") as directory:
        context.load_cert_chain(_as_file(directory, "cert.pem", cert), _as_file(directory, "key.pem", key),
                                password=_no_passphrase)


def _as_file(directory: str, name: str, value: str) -> str:
    if not is_pem(value):
        return value
    path = os.path.join(directory, name)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(value)
    return path


def check(config: DiscoveryConfig) -> tuple[str, str] | None:
    """(the field, why) when the TLS settings cannot make a context, else None; read now, so that a bad
    certificate stops the start rather than every attempt to read the store."""
    if not config.etcd_tls:
        return None
    try:
        context = _verifying(config.etcd_ca)
    except (ssl.SSLError, OSError, ValueError) as error:
        return "etcd_ca", f"not a CA certificate: {error}"
    if config.etcd_client_cert is not None and config.etcd_client_key is not None:
        try:
            _load_client_certificate(context, config.etcd_client_cert, config.etcd_client_key)
        except (ssl.SSLError, OSError, ValueError) as error:
            return "etcd_client_cert", f"not a certificate and its private key: {error}"
    return None


def describe(config: DiscoveryConfig) -> list[str]:
    """What protects the connection, for the start-up log line (no secrets)."""
    return ((["user"] if config.etcd_username is not None else []) + (["tls"] if config.etcd_tls else [])
            + (["client_cert"] if config.etcd_client_cert is not None else []))


class EtcdGateway:
    """Requests to etcd members' JSON gateways: over TLS when configured, with a token when a user is."""

    def __init__(self, config: DiscoveryConfig, request_timeout: float) -> None:
        self.ssl = tls_context(config)
        self.username = config.etcd_username
        self._password = config.etcd_password
        self.request_timeout = request_timeout
        self._token: tuple[str, str | None] | None = None  # (the endpoint, its token; None where auth is off)
        self.tokens_issued = 0

    @property
    def authenticates(self) -> bool:
        return self._password is not None

    def session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        """The session every request of this gateway goes through: its TLS context on every connection."""
        return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(
            ssl=self.ssl if self.ssl is not None else True))

    async def token(self, session: aiohttp.ClientSession, base: str) -> str | None:
        """The token to send to the member at `base`: the one held, else a new one; None without a user."""
        if self._password is None:
            return None
        if self._token is not None and self._token[0] == base:
            return self._token[1]
        status, data = await self._send(session, base + AUTHENTICATE,
                                        {"name": self.username, "password": self._password}, ANSWER_LIMIT, None)
        token: str | None
        if status == 200:
            try:
                token = _token_decoder.decode(data).token
            except msgspec.DecodeError as error:
                raise EtcdUnavailable(f"not an authenticate answer: {error}") from None
            if not token:
                raise EtcdUnavailable("no token in the authenticate answer")
        elif _error_of(data).code == _FAILED_PRECONDITION:
            token = None  # auth is off on this member: nothing to send
        else:
            raise self._refusal(status, data, f"user {self.username!r} not authenticated")
        self._token = (base, token)
        self.tokens_issued += 1
        return token

    def forget(self, token: str | None) -> None:
        """`token` was refused: the next request authenticates again."""
        if self._token is not None and self._token[1] == token:
            self._token = None

    async def post(self, session: aiohttp.ClientSession, base: str, path: str, body: dict, limit: int) -> bytes:
        """The answer of a 200; raises EtcdUnavailable (with its reason) for anything else."""
        renewed = False
        while True:
            token = await self.token(session, base)
            status, data = await self._send(session, base + path, body, limit, token)
            if status == 200:
                return data
            if not renewed and self._password is not None and _stale_token(status, data):
                self.forget(token)
                renewed = True
                continue
            raise self._refusal(status, data, f"HTTP {status}")

    @contextlib.asynccontextmanager
    async def stream(self, session: aiohttp.ClientSession, base: str, path: str, body: dict,
                     token: str | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming request (a watch) with `token`; the caller reads the answer, and its status."""
        async with session.post(base + path, json=body, headers=_headers(token)) as response:
            yield response

    def watch_refusal(self, cancel_reason: str) -> Exception | None:
        """What a watch canceled for `cancel_reason` means: TokenRefused (renew), an auth failure, or None."""
        if "code = Unauthenticated" in cancel_reason or (_NO_USER in cancel_reason and self._password is not None):
            return TokenRefused(self._scrubbed(cancel_reason[:_SHOWN]))
        if _NO_USER in cancel_reason:
            return EtcdUnavailable(_NO_USER_HINT, AUTH)
        if "code = PermissionDenied" in cancel_reason:
            return EtcdUnavailable(f"user {self.username!r} may not watch: {cancel_reason[:_SHOWN]}", AUTH)
        return None

    async def _send(self, session: aiohttp.ClientSession, url: str, body: dict, limit: int,
                    token: str | None) -> tuple[int, bytes]:
        try:
            async with session.post(url, json=body, headers=_headers(token),
                                    timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as response:
                return response.status, await read_bounded(response.content, limit)
        except aiohttp.ClientSSLError as error:
            raise EtcdUnavailable(f"TLS: {error}", TLS) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            if isinstance(error, ssl.SSLError) or isinstance(error.__cause__, ssl.SSLError):
                # An alert from etcd once the handshake is under way: TLS 1.3 refuses a missing or
                # untrusted client certificate after the client has finished its side.
                raise EtcdUnavailable(f"TLS: {error}", TLS) from None
            raise EtcdUnavailable(str(error) or type(error).__name__) from None

    def _refusal(self, status: int, data: bytes, what: str) -> EtcdUnavailable:
        error = _error_of(data)
        message = self._scrubbed((error.message or data.decode(errors="replace"))[:_SHOWN])
        if error.code == _UNAUTHENTICATED:
            return EtcdUnavailable(f"{what}: a token issued just before refused: {message}", AUTH)
        if error.code == _PERMISSION_DENIED:
            return EtcdUnavailable(f"{what}: user {self.username!r} may not read the keys: {message}", AUTH)
        if error.code == _INVALID_ARGUMENT and _NO_USER in message and self._password is None:
            return EtcdUnavailable(f"{what}: {_NO_USER_HINT}", AUTH)
        if error.code == _INVALID_ARGUMENT and _BAD_CREDENTIALS in message:
            return EtcdUnavailable(f"{what}: {message}", AUTH)
        if _COMMON_NAME in message:
            return EtcdUnavailable(f"{what}: etcd's gateway refuses a client certificate with a CommonName while "
                                   "etcd's auth is on: give one without, or none", AUTH)
        return EtcdUnavailable(f"{what}: {message}")

    def _scrubbed(self, text: str) -> str:
        # etcd does not echo a password; should one ever, it is not passed on.
        return text.replace(self._password, "***") if self._password else text


_NO_USER_HINT: Final = ("etcd requires a user: set ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD "
                        "(--etcd-username, --etcd-password)")


def _headers(token: str | None) -> dict[str, str] | None:
    return {"Authorization": token} if token else None


def _error_of(data: bytes) -> _ErrorAnswer:
    try:
        return _error_decoder.decode(data)
    except msgspec.DecodeError:
        return _ErrorAnswer()


def _stale_token(status: int, data: bytes) -> bool:
    """The answer to a token etcd no longer takes, or to none sent where auth has been turned on since."""
    error = _error_of(data)
    return status == 401 or error.code == _UNAUTHENTICATED or (
        error.code == _INVALID_ARGUMENT and _NO_USER in error.message)


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    chunks = []
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise EtcdUnavailable(f"a response over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
