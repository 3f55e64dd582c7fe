"""Dynamo's file discovery backend (`DYN_DISCOVERY_BACKEND=file`, `DYN_FILE_KV=<dir>`), writing side.

    store = FileKvStore(os.environ["DYN_FILE_KV"])
    store.put(*instance_entry(worker))
    ...  # store.keep_alive() every FILE_KEEP_ALIVE_S, e.g. `await store.run_keep_alive(stop)`
    store.close()  # a clean stop: the entries go at once

One file per key, `<dir>/v1/<bucket>/<the rest of the key, percent-encoded>`, as Dynamo
1.6.1 names them. A file is written whole under a temporary name (`.tmp_` + 16 hex
digits, in the bucket's directory, the names Dynamo's readers skip) and renamed into
place, so a reader never sees half an entry. Dynamo's processes delete entries whose file
was not touched for 10 s: `keep_alive` touches every file this store wrote (about every
3.3 s, as Dynamo does), and writes again one that someone deleted meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

from fleet_protocol import FILE_KEEP_ALIVE_S, file_name
from fleet_protocol.discovery import KEY_ROOT

TEMP_FILE_PREFIX: Final = ".tmp_"


class FileKvStore:
    """The entries one process registers in a file-backend directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.owned: dict[Path, bytes] = {}

    def path_of(self, key: str) -> Path:
        """`v1/{bucket}/{rest}` -> `<root>/v1/{bucket}/{rest percent-encoded}`."""
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] != KEY_ROOT or not parts[1] or not parts[2]:
            raise ValueError(f"key {key!r} is not {KEY_ROOT}/<bucket>/<rest>")
        return self.root / KEY_ROOT / parts[1] / file_name(parts[2])

    def _write(self, path: Path, value: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            temp = path.parent / f"{TEMP_FILE_PREFIX}{secrets.randbits(64):016x}"
            try:
                with open(temp, "xb") as file:
                    file.write(value)
                break
            except FileExistsError:
                continue
        try:
            os.replace(temp, path)
        except OSError:
            temp.unlink(missing_ok=True)
            raise

    def put(self, key: str, value: bytes) -> Path:
        """Write (or replace) the entry of `key`; it is this store's until deleted."""
        path = self.path_of(key)
        self._write(path, value)
        self.owned[path] = value
        return path

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        self.owned.pop(path, None)
        path.unlink(missing_ok=True)

    def keep_alive(self) -> None:
        """Touch every entry written here, so no reader expires it; write again any that was deleted."""
        for path, value in list(self.owned.items()):
            try:
                os.utime(path)
            except FileNotFoundError:
                self._write(path, value)

    async def run_keep_alive(self, stop: asyncio.Event, period: float = FILE_KEEP_ALIVE_S) -> None:
        """`keep_alive` every `period` until `stop`; on the event loop, so never beside a put or a close."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if not stop.is_set():
                self.keep_alive()

    def close(self) -> None:
        """Delete every entry written here (a clean stop)."""
        for path in list(self.owned):
            path.unlink(missing_ok=True)
        self.owned.clear()
