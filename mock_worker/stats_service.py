"""One simulated worker as a NATS micro service, named as a Dynamo worker's (pull mode).

Service `slugify("{ns}_{component}")` (every worker of the component runs an instance of
the same service, each answering `$SRV.STATS.{service}` once), one endpoint
`{endpoint}-{worker_id as hex}` in a group named like the service, so its subject is
`{service}.{endpoint}-{hex}`. Its stats `data` is the worker's current ForwardPassMetrics
in the nested shape, as Dynamo's `WorkerMetricsPublisher` returns it.

Requests on the endpoint are answered with a small JSON completion, so the endpoint is a
working one as in Dynamo's mock worker. Answering does not touch the engine or its
random generator, so serving requests never changes the simulated metrics of a seed.
"""

from __future__ import annotations

import json

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import EndpointStats, Service

from fleet_protocol.service_stats import endpoint_name, service_name
from fleet_runtime.nats_settle import settle

from .engine import SimulatedEngine

SERVICE_VERSION = "0.0.1"  # what Dynamo's services announced until mid-2025
MAX_COMPLETION_TOKENS = 256


def completion(worker_id: int, request_number: int, payload: bytes) -> dict:
    """The engine's answer to `{"prompt": str, "max_tokens": int}` (max_tokens optional)."""
    try:
        body = json.loads(payload or b"{}")
    except ValueError:
        raise ServiceError("400", "request is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("prompt", ""), str):
        raise ServiceError("400", 'expected {"prompt": str, "max_tokens": int}')
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_COMPLETION_TOKENS:
        raise ServiceError("400", f"max_tokens must be an integer in 1..{MAX_COMPLETION_TOKENS}")
    prompt_tokens = len(body.get("prompt", "").split())
    return {
        "id": f"cmpl-{worker_id:x}-{request_number}",
        "object": "text_completion",
        "worker_id": worker_id,
        "choices": [{"index": 0, "text": " token" * max_tokens, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                  "total_tokens": prompt_tokens + max_tokens},
    }


async def start_worker_service(
    nc: Client, *, namespace: str, component: str, endpoint: str, worker_id: int, engine: SimulatedEngine
) -> Service:
    service = service_name(namespace, component)

    def stats(_: EndpointStats) -> object:
        # Called synchronously inside nats.micro's STATS handler and sent with json.dumps;
        # raising here would make the whole instance silent, and engine.metrics() cannot fail.
        return msgspec.to_builtins(engine.metrics())

    requests = 0

    async def handle(request: Request) -> None:
        nonlocal requests
        requests += 1
        await request.respond(json.dumps(completion(worker_id, requests, request.data)).encode())

    instance = await add_service(
        nc, name=service, version=SERVICE_VERSION,
        description=f"Dynamo component {component} in namespace {namespace}", stats_handler=stats,
    )
    await instance.add_group(name=service).add_endpoint(name=endpoint_name(endpoint, worker_id), handler=handle)
    # Started means reachable: once the server has the subscriptions, a request on any other
    # connection finds this instance (without it, one sent right away could miss it).
    await settle(nc)
    return instance
