"""Real Dynamo 1.x workers (ai-dynamo-runtime, the `dynamo` test extra) and a real etcd, for the conformance tests.

`DynamoWorker` runs tests/dynamo_worker.py in a child process and drives it with JSON
commands; `EtcdServer` runs Debian's etcd on loopback and reads it through etcd's own JSON
gateway, with TLS (and client certificates) and with etcd's auth when asked. Only loopback: every worker gets `DYN_EVENT_PLANE_HOST`, `DYN_TCP_RPC_HOST`,
`DYN_TCP_RESPONSE_STREAM_HOST` = 127.0.0.1 and `DYN_SYSTEM_PORT` = -1 (Dynamo binds other
addresses by default). Each process is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_demo.nats_server import free_port, terminate

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
COMMAND_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
ETCD_BINARY = "etcd"


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker is started, in Dynamo's own environment variables."""

    discovery: str = "file"  # DYN_DISCOVERY_BACKEND: file | etcd
    event_plane: str | None = "nats"  # DYN_EVENT_PLANE; None = Dynamo's default (zmq)
    request_plane: str = "tcp"  # DYN_REQUEST_PLANE: tcp | nats
    nats_url: str | None = None  # NATS_SERVER
    file_kv: str | None = None  # DYN_FILE_KV
    etcd_url: str | None = None  # ETCD_ENDPOINTS
    endpoint: str = "dynamo.backend.generate"
    block_size: int = 16
    serve: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("DYN_", "NATS_", "ETCD_"))}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "DYN_EVENT_PLANE_HOST": LOOPBACK,
            "DYN_TCP_RPC_HOST": LOOPBACK,
            "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
            "DYN_SYSTEM_PORT": "-1",
            "DYN_DISCOVERY_BACKEND": self.discovery,
            "DYN_REQUEST_PLANE": self.request_plane,
            "TEST_DYNAMO_ENDPOINT": self.endpoint,
            "TEST_DYNAMO_BLOCK_SIZE": str(self.block_size),
            "TEST_DYNAMO_SERVE": "1" if self.serve else "0",
        })
        if self.event_plane is not None:
            env["DYN_EVENT_PLANE"] = self.event_plane
        if self.nats_url is not None:
            env["NATS_SERVER"] = self.nats_url
        if self.file_kv is not None:
            env["DYN_FILE_KV"] = self.file_kv
        if self.etcd_url is not None:
            env["ETCD_ENDPOINTS"] = self.etcd_url
        env.update(self.extra_env)
        return env


class WorkerFailed(AssertionError):
    pass


class DynamoWorker:
    """One real Dynamo worker process; commands go over stdin, replies come back on stdout."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        fd, self.log_path = tempfile.mkstemp(prefix="dynamo-worker-", suffix=".log")
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "tests.dynamo_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=fd, env=settings.environment(), cwd=ROOT, text=True, bufsize=1,
            )
        finally:
            os.close(fd)
        self.replies: queue.Queue[dict | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ready = self._next_reply(START_TIMEOUT_S)
        self.worker_id: int = ready["worker_id"]
        self.pid: int = ready["pid"]

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not ours: a library writing to stdout
            if isinstance(message, dict) and "ok" in message:
                self.replies.put(message)
        self.replies.put(None)

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def _next_reply(self, timeout: float) -> dict:
        try:
            message = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise WorkerFailed(f"no reply from the Dynamo worker in {timeout}s:\n{self.output()[-4000:]}") from None
        if message is None:
            raise WorkerFailed(f"the Dynamo worker exited ({self.popen.poll()}):\n{self.output()[-4000:]}")
        if not message["ok"]:
            raise WorkerFailed(f"the Dynamo worker failed: {message['error']}\n{self.output()[-4000:]}")
        return message

    def command(self, op: str, **args: Any) -> dict:
        """Run one command in the worker; its reply (raises WorkerFailed on an error)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.popen.stdin.flush()
        return self._next_reply(COMMAND_TIMEOUT_S)

    def exit(self, timeout: float = 20.0) -> int:
        """A clean shutdown, as on SIGTERM in an engine adapter: the runtime's own shutdown."""
        if self.popen.poll() is None and self.popen.stdin is not None:
            self.popen.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.popen.stdin.flush()
            self._next_reply(timeout)
            self.popen.wait(timeout)
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL: the worker gets no chance to clean up."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(10)

    def stop(self) -> None:
        """EOF on stdin (a clean shutdown) if still running; SIGTERM, then SIGKILL, if that is not enough."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            terminate(self.popen, 5)
        self.reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class EtcdServer:
    """Debian's etcd (`apt-get install etcd-server`) on loopback, in a temporary data directory.

    `pki` (tests/pki.py's files) serves the client port over TLS with its server certificate;
    `client_cert_auth` then requires a client certificate signed by its CA (etcd's
    `--client-cert-auth`). `enable_auth` turns etcd's auth on (user root); this helper's own
    requests then authenticate as root, as its requests over TLS present pki's client certificate
    without a CommonName (the one etcd's gateway takes while its auth is on).
    """

    def __init__(self, *, pki: dict | None = None, client_cert_auth: bool = False,
                 auth_token_ttl: int | None = None) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()
        self.pki = pki
        self.client_cert_auth = client_cert_auth
        self.auth_token_ttl = auth_token_ttl  # etcd's --auth-token-ttl: seconds a simple token lives unused
        self.url = f"{'https' if pki else 'http'}://{LOOPBACK}:{self.client_port}"
        self.data_dir = tempfile.mkdtemp(prefix="etcd-")
        self.popen: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        self.root_password: str | None = None
        self._token: str | None = None
        self.ssl: ssl.SSLContext | None = None
        if pki is not None:
            self.ssl = ssl.create_default_context(cafile=pki["ca"][0])
            self.ssl.load_cert_chain(*pki["anonymous_client"])  # taken with etcd's auth on too

    @staticmethod
    def binary() -> str | None:
        return shutil.which(ETCD_BINARY)

    def start(self) -> None:
        binary = self.binary()
        assert binary is not None, "etcd not installed"
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        options = []
        if self.pki is not None:
            options += ["--cert-file", self.pki["server"][0], "--key-file", self.pki["server"][1]]
            if self.client_cert_auth:
                options += ["--client-cert-auth", "--trusted-ca-file", self.pki["ca"][0]]
        if self.auth_token_ttl is not None:
            options += ["--auth-token-ttl", str(self.auth_token_ttl)]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [binary, "--name", "test", "--data-dir", os.path.join(self.data_dir, "data"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", *options],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=self.ssl) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return
            except OSError:
                pass
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"etcd did not start:\n{Path(self.log_path).read_text(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.popen is not None:
            terminate(self.popen, 10)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def enable_auth(self, root_password: str) -> None:
        """etcd's auth on, through its gateway (as `etcdctl user add root` and `auth enable` do): user root,
        with the root role, may do anything; a request without a valid token is refused from now on."""
        self.call("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/enable", {})
        self.root_password = root_password

    def revoke_tokens(self) -> None:
        """Every token issued so far refused from now on: etcd's auth turned off and on again."""
        self.call("/v3/auth/disable", {})
        self._token = None  # a token sent while auth is off is refused (code 9) rather than ignored
        self._request("/v3/auth/enable", {}, None)

    def add_user(self, name: str, password: str) -> None:
        """A user with no role: authenticates, but may read no key."""
        self.call("/v3/auth/user/add", {"name": name, "password": password})

    def _request(self, path: str, body: dict, token: str | None) -> dict:
        headers = {"Authorization": token} if token else {}
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers=headers)
        with urllib.request.urlopen(request, timeout=5, context=self.ssl) as response:
            return json.loads(response.read())

    def call(self, path: str, body: dict) -> dict:
        """One request to etcd's JSON gateway; as root once auth is on (a token renewed once if refused)."""
        if self.root_password is None:
            return self._request(path, body, None)
        for attempt in (1, 2):
            if self._token is None:
                self._token = self._request("/v3/auth/authenticate",
                                            {"name": "root", "password": self.root_password}, None)["token"]
            try:
                return self._request(path, body, self._token)
            except urllib.error.HTTPError as error:
                if error.code != 401 or attempt == 2:
                    raise
                self._token = None  # expired, or etcd restarted since
        raise AssertionError("unreachable")


    def entries(self, prefix: str = "") -> dict[str, tuple[bytes, int]]:
        """{key: (value, lease id)} of every key under `prefix` (all keys when empty)."""
        start = prefix.encode() or b"\0"
        end = _prefix_end(prefix.encode()) if prefix else b"\0"
        body = {"key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()}
        found = {}
        for kv in self.call("/v3/kv/range", body).get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            found[key] = (base64.b64decode(kv.get("value", "")), int(kv.get("lease", 0)))
        return found

    def lease_ttl(self, lease: int) -> tuple[int, int]:
        """(granted TTL, remaining TTL) in seconds; remaining is -1 once the lease is gone."""
        answer = self.call("/v3/lease/timetolive", {"ID": lease})
        return int(answer.get("grantedTTL", 0)), int(answer.get("TTL", -1))


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"
