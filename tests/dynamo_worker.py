"""A real Dynamo 1.x worker (ai-dynamo-runtime), driven by JSON commands on stdin; run by tests/dynamo_runtime.py.

It does what a Dynamo engine adapter does, through Dynamo's own Python API and nothing
else: a `DistributedRuntime` configured by Dynamo's environment variables
(`DYN_DISCOVERY_BACKEND`, `DYN_REQUEST_PLANE`, `DYN_EVENT_PLANE`, `DYN_FILE_KV`,
`ETCD_ENDPOINTS`, `NATS_SERVER`), its endpoint served, a `WorkerMetricsPublisher`,
`KvEventPublisher`s, an `FpmDirectPublisher`, and `register_model` with a
`ModelRuntimeConfig`. Engine-format KV events (the only way to make the runtime publish
`cleared`) go through `KvEventPublisher`'s ZMQ relay, fed from an XPUB socket on loopback.

One command per stdin line, one JSON reply per stdout line (`{"ok": true, ...}` or
`{"ok": false, "error": ...}`); Dynamo's own logs go to stderr. EOF on stdin is a clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from dynamo.llm import (
    FpmDirectPublisher,
    KvEventPublisher,
    ModelInput,
    ModelRuntimeConfig,
    ModelType,
    WorkerMetricsPublisher,
    WorkerType,
    register_model,
)
from dynamo.runtime import DistributedRuntime

# How long the relay's ZMQ SUB may take to connect and subscribe (it connects lazily).
RELAY_SUBSCRIBE_TIMEOUT_S = 10.0
REGISTER_TIMEOUT_S = 30.0
RUNTIME_CONFIG_FIELDS = ("total_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "context_length",
                         "data_parallel_start_rank", "data_parallel_size", "enable_local_indexer")


def reply(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def handler(request: Any) -> Any:
    yield {"echo": request}


class Worker:
    def __init__(self, runtime: DistributedRuntime, path: str, block_size: int) -> None:
        self.runtime = runtime
        self.endpoint = runtime.endpoint(path)
        self.block_size = block_size
        self.load = WorkerMetricsPublisher()
        self.kv: dict[int, KvEventPublisher] = {}
        self.relays: dict[int, tuple[KvEventPublisher, Any]] = {}
        self.fpm: FpmDirectPublisher | None = None
        self.serving: asyncio.Future | None = None
        self.client: Any = None
        self.zmq_context: Any = None

    async def start(self, serve: bool) -> None:
        await self.load.create_endpoint(self.endpoint)
        if serve:
            # serve_endpoint's future resolves only at shutdown and registers the instance in the
            # background: ready only once Dynamo's own discovery client sees this instance.
            self.serving = asyncio.ensure_future(self.endpoint.serve_endpoint(handler))
            self.client = client = await self.endpoint.client()
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while self.endpoint.connection_id() not in client.instance_ids():
                if self.serving.done():
                    self.serving.result()  # raises what serving failed with
                if time.monotonic() > deadline:
                    raise TimeoutError("the endpoint instance did not appear in discovery")
                await asyncio.sleep(0.05)

    def kv_publisher(self, dp_rank: int) -> KvEventPublisher:
        if dp_rank not in self.kv:
            self.kv[dp_rank] = KvEventPublisher(self.endpoint, kv_block_size=self.block_size, dp_rank=dp_rank)
        return self.kv[dp_rank]

    async def relay(self, dp_rank: int) -> Any:
        """The XPUB socket an engine would publish its KV events on, once the relay has subscribed to it."""
        if dp_rank not in self.relays:
            import zmq

            if self.zmq_context is None:
                self.zmq_context = zmq.Context()
            socket = self.zmq_context.socket(zmq.XPUB)
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            publisher = KvEventPublisher(self.endpoint, kv_block_size=self.block_size, dp_rank=dp_rank,
                                         zmq_endpoint=f"tcp://127.0.0.1:{port}")
            deadline = time.monotonic() + RELAY_SUBSCRIBE_TIMEOUT_S
            while not socket.poll(50):
                if time.monotonic() > deadline:
                    raise TimeoutError("the KV event relay did not subscribe")
                await asyncio.sleep(0.05)
            socket.recv()  # the subscription message
            self.relays[dp_rank] = (publisher, socket)
        return self.relays[dp_rank][1]

    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "info":
            return {"worker_id": self.endpoint.connection_id()}
        if op == "publishers":
            # Made ahead of their first event, so that a ZMQ subscriber can connect before anything is sent.
            for dp_rank in args.get("kv_ranks", ()):
                self.kv_publisher(dp_rank)
            if args.get("fpm") and self.fpm is None:
                self.fpm = FpmDirectPublisher(self.endpoint, str(self.endpoint.connection_id()),
                                              dp_size=args.get("dp_size", 1))
            return {}
        if op == "load":
            self.load.publish(args.get("dp_rank"), args.get("active_decode_blocks"), args.get("kv_used_blocks"))
            return {}
        if op == "kv_stored":
            self.kv_publisher(args.get("dp_rank", 0)).publish_stored(
                args["token_ids"], args["num_block_tokens"], args["block_hashes"], parent_hash=args.get("parent_hash"))
            return {}
        if op == "kv_removed":
            self.kv_publisher(args.get("dp_rank", 0)).publish_removed(args["block_hashes"])
            return {}
        if op == "engine_kv":
            # One vLLM KVEventBatch: [timestamp, [event, ...], dp_rank], sent as [topic, seq, payload].
            import msgspec

            dp_rank = args.get("dp_rank", 0)
            socket = await self.relay(dp_rank)
            batch = [time.time(), args["events"], dp_rank]
            socket.send_multipart([b"", int(args.get("seq", 0)).to_bytes(8, "big"), msgspec.msgpack.encode(batch)])
            return {}
        if op == "fpm":
            if self.fpm is None:
                self.fpm = FpmDirectPublisher(self.endpoint, str(args.get("worker_id", self.endpoint.connection_id())),
                                              dp_size=args.get("dp_size", 1))
            fields = {key: value for key, value in args.items() if key not in ("worker_id", "dp_size")}
            self.fpm.publish(**fields)
            return {}
        if op == "call":
            # A request to this worker's own endpoint through Dynamo's request plane, as a frontend sends one.
            stream = await self.client.direct(args.get("request", {}), self.endpoint.connection_id())
            responses = [response.data() if hasattr(response, "data") else response async for response in stream]
            return {"responses": responses}
        if op == "register":
            config = ModelRuntimeConfig()
            for name in RUNTIME_CONFIG_FIELDS:
                if name in args:
                    setattr(config, name, args[name])
            await register_model(ModelInput.Tokens, ModelType.Completions, self.endpoint, args.get("model", "model"),
                                 args.get("model", "model"), worker_type=WorkerType.Aggregated,
                                 kv_cache_block_size=self.block_size, runtime_config=config, skip_model_assets=True)
            return {}
        raise ValueError(f"unknown command {op!r}")

    def close(self) -> None:
        for publisher in self.kv.values():
            publisher.shutdown()
        for publisher, socket in self.relays.values():
            publisher.shutdown()
            socket.close(linger=0)
        if self.fpm is not None:
            self.fpm.shutdown()
        if self.zmq_context is not None:
            self.zmq_context.term()


async def main() -> None:
    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"),
                                 os.environ.get("DYN_REQUEST_PLANE", "tcp"))
    worker = Worker(runtime, os.environ["TEST_DYNAMO_ENDPOINT"], int(os.environ.get("TEST_DYNAMO_BLOCK_SIZE", "16")))
    await worker.start(serve=os.environ.get("TEST_DYNAMO_SERVE", "1") == "1")
    reply(ok=True, ready=True, worker_id=worker.endpoint.connection_id(), pid=os.getpid())
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            reply(ok=True, **(await worker.handle(op, command)))
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
            reply(ok=False, error=f"{type(error).__name__}: {error}")
    worker.close()
    runtime.shutdown()
    if worker.serving is not None:
        with contextlib.suppress(Exception):  # shutdown is what is being observed, not the handler's fate
            await asyncio.wait_for(worker.serving, 10)
    reply(ok=True, exited=True)


if __name__ == "__main__":
    asyncio.run(main())
