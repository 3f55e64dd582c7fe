"""Dynamo's file discovery backend (`DYN_DISCOVERY_BACKEND=file`, directory `DYN_FILE_KV`), read by scanning.

Dynamo keeps one file per key, `<dir>/v1/<bucket>/<the rest of the key, percent-encoded>`.
It writes an entry into a temporary file (`.tmp_*`) renamed over the old one, so a new
version is a new inode; its keep-alive only sets the file's mtime (about every 3.3 s); a
clean shutdown deletes the files; a killed worker's files stay, their mtime frozen, and
Dynamo's own processes treat an entry not kept alive for 10 s as gone. So does this
reader: a file older than `file_ttl` is deleted from the view even though it is still there.

Why a scan every `file_scan_interval` (1 s) and not filesystem events (watchfiles, inotify):
- a killed worker's entry goes by time passing, not by any event on its file, so a periodic
  look at every mtime is needed whatever else is done;
- the keep-alive touches every file every 3.3 s, so events would wake the reader for every
  file anyway;
- inotify sees no change made on another host of a shared volume (NFS, a Kubernetes or
  Docker volume), which is where several hosts' workers share one directory; watchfiles
  itself falls back to polling there;
- no dependency added.
A scan costs one `stat` per file of the namespace; a file is read only when its inode or
size changed, and at most `max_entry_bytes` of it. Files of other namespaces are skipped by
name, unread. Scans run in a thread, so a slow filesystem does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import structlog

import fleet_protocol as protocol
from aggregator.collectors.discovery_telemetry import UNREADABLE, DiscoveryTelemetry
from aggregator.config import DiscoveryConfig
from aggregator.edges.discovery_store import (
    LAST_RETRY_S,
    Backoff,
    DiscoveryView,
    DiscoveryWatcher,
    wait_or_stop,
)
from fleet_protocol import BUCKETS, OVERSIZED, DiscoveryEntry, MessageRejected
from fleet_protocol.discovery import KEY_ROOT

log = structlog.get_logger("aggregator.discovery")

Identity = tuple[int, int, int]  # (device, inode, size): one version of a file's content


class _Observed(NamedTuple):
    """One file of the namespace as a scan found it; its content only when its identity is new."""

    bucket: str
    name: str
    identity: Identity
    mtime: float
    data: bytes | None
    problem: tuple[str, str] | None  # (reason, detail) when its content could not be had


class _Scan(NamedTuple):
    files: list[_Observed]
    over_limit: int  # new files left untracked: max_entries files are tracked already


@dataclass(slots=True)
class _Known:
    """What the reader knows of one file: the version it decoded, and its key."""

    identity: Identity
    key: str | None  # None: a name no key is written as
    entry: DiscoveryEntry | None  # None: the version could not be used (counted once)


class FileDiscovery(DiscoveryWatcher):
    backend = "file"

    def __init__(self, config: DiscoveryConfig, view: DiscoveryView, telemetry: DiscoveryTelemetry, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(view, telemetry, config.file_kv)
        self.root = Path(config.file_kv)
        self.ttl = config.file_ttl
        self.interval = config.file_scan_interval
        self.max_entry_bytes = config.max_entry_bytes
        self.max_files = config.max_entries
        self._clock = clock  # wall clock: mtimes are
        self._known: dict[tuple[str, str], _Known] = {}
        # File names of the namespace's keys start with these (the key's rest after v1/{bucket}/, encoded).
        self._name_prefixes = {bucket: protocol.file_name(prefix.removeprefix(f"{KEY_ROOT}/{bucket}/"))
                               for bucket, prefix in view.prefixes.items()}
        self._over_limit = False

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.interval, max(self.interval, LAST_RETRY_S))
        log.info("reading Dynamo's discovery store", backend=self.backend, directory=str(self.root),
                 namespace=self.view.namespace, ttl=self.ttl, scan_interval=self.interval)
        while not stop.is_set():
            try:
                scan = await asyncio.to_thread(self._scan)
                self.apply(scan, self._clock())
            except OSError as error:
                self._failed(UNREADABLE, f"{error.filename or self.root}: {error.strerror or error}")
                await backoff.wait(stop)
                continue
            except Exception as error:  # noqa: BLE001 - a bug here must not end discovery for good
                self._bug(error)
                await backoff.wait(stop)
                continue
            if not self.connected:
                self.view.snapshot_complete()
                self._listed()
            backoff.reset()
            await wait_or_stop(stop, self.interval)

    # In a thread: only reads the filesystem and `_known` (changed on the loop between scans only).

    def _scan(self) -> _Scan:
        if not stat.S_ISDIR(os.stat(self.root).st_mode):
            raise NotADirectoryError(20, "not a directory", str(self.root))
        found: list[_Observed] = []
        room = self.max_files - len(self._known)
        over_limit = 0
        for bucket in BUCKETS:
            directory = self.root / KEY_ROOT / bucket
            prefix = self._name_prefixes[bucket]
            try:
                listing = os.scandir(directory)
            except FileNotFoundError:
                continue  # created by the first worker that registers in this bucket
            with listing:
                for item in listing:
                    name = item.name
                    if not name.startswith(prefix):
                        continue  # another namespace's, or a temporary file (.tmp_*)
                    known = self._known.get((bucket, name))
                    if known is None and room <= 0:
                        over_limit += 1
                        continue
                    observed = self._observe(bucket, name, item, known)
                    if observed is not None:
                        found.append(observed)
                        room -= known is None
        return _Scan(found, over_limit)

    def _observe(self, bucket: str, name: str, item: os.DirEntry, known: _Known | None) -> _Observed | None:
        try:
            status = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None  # deleted since the listing
        except OSError as error:
            return _Observed(bucket, name, (0, 0, -1), 0.0, None, (UNREADABLE, error.strerror or str(error)))
        if not stat.S_ISREG(status.st_mode):
            return None  # Dynamo writes only files here
        identity = (status.st_dev, status.st_ino, status.st_size)
        if known is not None and known.identity == identity:
            return _Observed(bucket, name, identity, status.st_mtime, None, None)
        if status.st_size > self.max_entry_bytes:
            return _Observed(bucket, name, identity, status.st_mtime, None,
                             (OVERSIZED, f"{status.st_size} bytes > limit {self.max_entry_bytes}"))
        try:
            with open(item.path, "rb") as file:
                opened = os.fstat(file.fileno())  # the version read, should a rename have come in between
                data = file.read(self.max_entry_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as error:
            return _Observed(bucket, name, identity, status.st_mtime, None, (UNREADABLE, error.strerror or str(error)))
        identity = (opened.st_dev, opened.st_ino, opened.st_size)
        return _Observed(bucket, name, identity, opened.st_mtime, data, None)

    # On the event loop.

    def apply(self, scan: _Scan, now: float) -> None:
        """Bring the view to what a scan found at wall-clock time `now`."""
        present = set()
        for observed in scan.files:
            file = (observed.bucket, observed.name)
            present.add(file)
            known = self._known.get(file)
            if known is None or known.identity != observed.identity:
                known = self._known[file] = self._decode(observed)
            if known.key is None:
                continue
            if known.entry is None:
                self.view.remove(known.key)  # a bad version replaced a good one
            elif now - observed.mtime <= self.ttl:
                self.view.offer(known.key, known.entry)
            elif self.view.remove(known.key):
                self._expired(known.key, now - observed.mtime)
        for file in [file for file in self._known if file not in present]:
            gone = self._known.pop(file)
            if gone.key is not None:
                self.view.remove(gone.key)
        if scan.over_limit and not self._over_limit:
            self.view.reject(str(self.root), "entry_limit",
                             f"{scan.over_limit} more files than the {self.max_files} tracked")
        self._over_limit = scan.over_limit > 0

    def _decode(self, observed: _Observed) -> _Known:
        try:
            key = protocol.key_of_file(observed.bucket, observed.name)
        except MessageRejected as error:
            self.view.reject(f"{observed.bucket}/{observed.name}", error.reason, error.detail)
            return _Known(observed.identity, None, None)
        if not self.view.wants(key):
            return _Known(observed.identity, None, None)  # a component's own channel: not read
        if observed.problem is not None:
            self.view.reject(key, *observed.problem)
            return _Known(observed.identity, key, None)
        assert observed.data is not None
        return _Known(observed.identity, key, self.view.decode(key, observed.data))

    def _expired(self, key: str, age: float) -> None:
        self.telemetry.expired.inc()
        log.info("discovery entry expired: its keep-alive stopped (a killed worker)", key=key[:256],
                 age_s=round(age, 1), rate_limit="expired")
