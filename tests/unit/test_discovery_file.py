"""The discovery edge on Dynamo's file backend, with real files in a real directory.

Files are written as Dynamo writes them (a temporary file renamed over the entry's), and a
dead worker's are aged with os.utime rather than waited for.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fleet_protocol as protocol
from aggregator.config import DiscoveryConfig
from fleet_protocol import InstanceEntry

from ..discovery_support import PUBLISHER, WORKER, running, worker_entries


def config(directory: Path, **changes) -> DiscoveryConfig:
    return DiscoveryConfig(backend="file", file_kv=str(directory), file_scan_interval=0.05, **changes)


def write(directory: Path, key: str, value: bytes) -> Path:
    """`value` at `key`, as Dynamo's FileStore writes it: a temporary file renamed over the entry's."""
    _, bucket, rest = key.split("/", 2)
    folder = directory / "v1" / bucket
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / protocol.file_name(rest)
    temporary = folder / f".tmp_{path.name[:20]}"
    temporary.write_bytes(value)
    os.replace(temporary, path)
    return path


def path_of(directory: Path, key: str) -> Path:
    _, bucket, rest = key.split("/", 2)
    return directory / "v1" / bucket / protocol.file_name(rest)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def write_all(directory: Path, entries: dict[str, protocol.DiscoveryEntry]) -> None:
    for key, entry in entries.items():
        write(directory, key, protocol.encode_discovery_entry(entry))


async def test_entries_appear_typed_then_change_then_go(tmp_path):
    entries = worker_entries()
    write_all(tmp_path, entries)
    async with running(config(tmp_path)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the first scan")
        assert run.sink.entries == entries  # every bucket, decoded to its type
        assert run.sink.changes[-1] == ("snapshot", "")
        assert run.watcher.state().health() == {"backend": "file", "connected": True, "entries": 4,
                                                "last_error": None}
        assert run.metric("llm_aggregator_discovery_connected") == 1
        for bucket in protocol.BUCKETS:
            assert run.metric("llm_aggregator_discovery_entries", bucket=bucket) == 1

        # A new version of the model card (Dynamo replaces the file): put again, with the new value.
        changed = worker_entries(total_kv_blocks=100)
        card_key = protocol.model_card_key("dynamo", "backend", "generate", WORKER)
        write(tmp_path, card_key, protocol.encode_discovery_entry(changed[card_key]))
        await run.until(lambda: run.sink.entries[card_key] == changed[card_key], "the changed card")
        assert run.sink.entries[card_key].card_json.runtime_config.total_kv_blocks == 100

        # A clean shutdown deletes the files: each entry deleted.
        for key in entries:
            path_of(tmp_path, key).unlink()
        await run.until(lambda: not run.sink.entries, "every entry deleted")
        assert sorted(key for kind, key in run.sink.changes if kind == "delete") == sorted(entries)
        assert run.metric("llm_aggregator_discovery_entries", bucket="instances") == 0
        assert run.sink.snapshots == 1  # a full listing once; then changes only


async def test_a_file_not_kept_alive_is_gone_though_it_stays(tmp_path):
    entries = worker_entries()
    write_all(tmp_path, entries)
    instance = protocol.instance_key("dynamo", "backend", "generate", WORKER)
    async with running(config(tmp_path, file_ttl=10.0)) as run:
        await run.until(lambda: len(run.sink.entries) == 4, "the worker's entries")
        # SIGKILL: the keep-alive stops and the mtime freezes; here it is set 11 s back.
        age(path_of(tmp_path, instance), 11)
        await run.until(lambda: instance not in run.sink.entries, "the stale instance deleted")
        assert path_of(tmp_path, instance).exists()
        assert len(run.sink.entries) == 3
        assert run.metric("llm_aggregator_discovery_expired_total") == 1
        # A keep-alive again (a frozen worker that resumed): back, the same entry.
        os.utime(path_of(tmp_path, instance))
        await run.until(lambda: instance in run.sink.entries, "the refreshed instance")
        assert run.sink.entries[instance] == entries[instance]
        assert run.metric("llm_aggregator_discovery_expired_total") == 1


async def test_a_file_just_inside_its_ttl_stays(tmp_path):
    entries = worker_entries()
    write_all(tmp_path, entries)
    for key in entries:
        age(path_of(tmp_path, key), 8)  # a worker whose keep-alive is late, not dead
    later = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
    async with running(config(tmp_path, file_ttl=10.0)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the first scan")
        assert run.sink.entries == entries
        write_all(tmp_path, later)  # proves scans went on
        await run.until(lambda: len(run.sink.entries) == 8, "the later worker")
        assert not [change for change in run.sink.changes if change[0] == "delete"]


async def test_other_namespaces_and_temporary_files_are_skipped_unread(tmp_path):
    write_all(tmp_path, worker_entries("other"))
    write_all(tmp_path, worker_entries("dynamo-2", worker=WORKER + 1))  # a name starting like ours
    ours = worker_entries()
    write_all(tmp_path, ours)
    (tmp_path / "v1" / "instances" / ".tmp_half_written").write_bytes(b'{"type":"Endp')
    async with running(config(tmp_path)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the first scan")
        assert run.sink.entries == ours
        assert sum(run.metric("llm_aggregator_discovery_errors_total", reason=reason) for reason in
                   protocol.REJECT_REASONS) == 0


async def test_malformed_entries_are_dropped_and_counted_once_each(tmp_path):
    good = worker_entries()
    write_all(tmp_path, good)
    instance_of = lambda worker: protocol.instance_key("dynamo", "backend", "generate", worker)  # noqa: E731
    write(tmp_path, instance_of(1), b"not json")
    write(tmp_path, instance_of(2), b'{"type":"Endpoint","namespace":"dynamo"}')  # missing fields
    write(tmp_path, instance_of(3), b'{"type":"Model","namespace":"dynamo"}')  # another bucket's type
    write(tmp_path, instance_of(4), protocol.encode_discovery_entry(  # the key's id is not the entry's
        InstanceEntry("dynamo", "backend", "generate", 5)))
    write(tmp_path, instance_of(6), protocol.encode_discovery_entry(  # the key's names are not the entry's
        InstanceEntry("dynamo", "prefill", "generate", 6)))
    write(tmp_path, instance_of(7), b" " * 2000)  # over max_entry_bytes
    (tmp_path / "v1" / "instances" / "dynamo%2Fbackend%2Fgenerate%2Fzz").write_bytes(b"{}")  # not a hex id
    (tmp_path / "v1" / "instances" / "dynamo%2Fbackend%2fgenerate%2F8").write_bytes(b"{}")  # a lower-case escape
    (tmp_path / "v1" / "instances" / "dynamo%2Fback-end%2Fgenerate%2F9").write_bytes(b"{}")  # '-' unescaped
    async with running(config(tmp_path, max_entry_bytes=1024)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the first scan")
        assert run.sink.entries == good
        expected = {"not_json": 1, "missing_field": 1, "wrong_type": 4, "inconsistent": 2, "oversized": 1}
        counted = {reason: run.metric("llm_aggregator_discovery_errors_total", reason=reason)
                   for reason in expected}
        assert counted == expected
        # Many scans later (a new worker seen proves they happened), still counted once each.
        later = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
        write_all(tmp_path, later)
        await run.until(lambda: len(run.sink.entries) == 8, "the later worker")
        assert {reason: run.metric("llm_aggregator_discovery_errors_total", reason=reason)
                for reason in expected} == expected
        assert run.watcher.state().connected and run.watcher.state().last_error is None

        # A good entry replaced by a bad version is gone: the store no longer holds what was put.
        key = instance_of(WORKER)
        write(tmp_path, key, b'{"type":"Endpoint"')
        await run.until(lambda: key not in run.sink.entries, "the broken entry deleted")
        assert run.metric("llm_aggregator_discovery_errors_total", reason="not_json") == 2


async def test_entries_past_the_limit_are_refused_and_counted(tmp_path):
    write_all(tmp_path, worker_entries())
    async with running(config(tmp_path, max_entries=3)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the first scan")
        assert len(run.sink.entries) == 3
        assert run.metric("llm_aggregator_discovery_errors_total", reason="entry_limit") == 1
        # One goes: the one left out takes its place.
        removed = next(iter(run.sink.entries))
        path_of(tmp_path, removed).unlink()
        await run.until(lambda: len(run.sink.entries) == 3 and removed not in run.sink.entries,
                        "the fourth entry in the freed place")


async def test_a_missing_directory_is_reported_and_retried_then_read(tmp_path):
    directory = tmp_path / "kv"
    async with running(config(directory)) as run:
        await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="unreadable"),
                        "the missing directory counted")
        state = run.watcher.state()
        assert not state.connected and not run.watcher.healthy
        assert state.last_error is not None and str(directory) in state.last_error
        assert run.sink.changes == []
        write_all(directory, worker_entries())
        await run.until(lambda: run.sink.snapshots == 1, "the directory read once it exists")
        assert len(run.sink.entries) == 4 and run.watcher.state().connected
        assert run.metric("llm_aggregator_discovery_connected") == 1


async def test_entries_that_went_while_the_directory_was_unreadable_are_deleted_on_return(tmp_path):
    directory = tmp_path / "kv"
    first = worker_entries()
    write_all(directory, first)
    async with running(config(directory)) as run:
        await run.until(lambda: len(run.sink.entries) == 4, "the first worker")
        away = tmp_path / "away"
        directory.rename(away)  # an unmounted volume: the last view stands meanwhile
        await run.until(lambda: not run.watcher.state().connected, "the directory reported unreadable")
        assert run.sink.entries == first
        for key in first:
            path_of(away, key).unlink()  # the worker stops while the reader cannot see
        second = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
        write_all(away, second)
        away.rename(directory)
        await run.until(lambda: run.sink.snapshots == 2, "the directory read again")
        assert run.sink.entries == second
        assert run.watcher.state().connected
