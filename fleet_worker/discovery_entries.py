"""The discovery entries a Dynamo 1.x worker registers, as the bytes Dynamo 1.6.1 writes them.

Readers decode them with `fleet_protocol.discovery`, which keeps only what it uses; these
structures keep every key the runtime writes, in its order, with its defaults, so a
Dynamo process reading the store finds what it expects (serde_json's compact form: the
same bytes for the same values). Each entry is checked by the protocol's own decoder
before it is handed out, so nothing is registered that a reader would reject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec
from msgspec import Struct

from fleet_protocol import (
    EVENT_SOURCES,
    NatsTransport,
    ZmqTransport,
    decode_keyed_entry,
    encode_event_segment,
    event_channel_key,
    instance_key,
    model_card_key,
)

ENDPOINT_SCOPE: Final = "endpoint"
_encoder: Final = msgspec.json.Encoder()
_MAX_ENTRY_BYTES: Final = 1 << 20


class _Endpoint(Struct, tag_field="type", tag="Endpoint"):
    component: str
    endpoint: str
    namespace: str
    instance_id: int
    transport: dict[str, str]
    device_type: str
    request_plane_codec: str


class _RuntimeConfig(Struct):
    total_kv_blocks: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    tool_call_arguments_format: str = "json_string"
    structural_tag_mode: str = "off"
    structural_tag_scope: str = "auto"
    structural_tag_schema: str = "auto"
    exclude_tools_when_tool_choice_none: bool = True
    data_parallel_start_rank: int = 0
    data_parallel_size: int = 1
    enable_local_indexer: bool = True
    enable_eagle: bool = False


class _Card(Struct):
    display_name: str
    slug: str
    model_info: None
    tokenizer: None
    context_length: int
    kv_cache_block_size: int
    migration_limit: int
    model_type: str
    model_input: str
    worker_type: str
    needs: list[str]
    runtime_config: _RuntimeConfig
    media_decoder: None
    media_fetcher: None


class _Model(Struct, tag_field="type", tag="Model"):
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    card_json: _Card


class _EndpointId(Struct):
    namespace: str
    component: str
    name: str


class _Scope(Struct):
    kind: str
    endpoint: _EndpointId


class _EventChannel(Struct, tag_field="type", tag="EventChannel"):
    scope: _Scope
    topic: str
    instance_id: int
    transport: NatsTransport | ZmqTransport


class _SourceWorker(Struct):
    worker_id: int
    dp_rank: int


class _SourceMetadata(Struct):
    kv_state_endpoint: _EndpointId
    worker: _SourceWorker
    publisher_id: int


class _EventSource(Struct, tag_field="type", tag="EventSource"):
    scope: _Scope
    topic: str
    publisher_id: int
    metadata: _SourceMetadata


@dataclass(frozen=True, slots=True)
class ModelCardValues:
    """What a worker says about its model and engine when it registers (`register_model` + `ModelRuntimeConfig`)."""

    name: str
    total_kv_blocks: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    data_parallel_size: int = 1
    data_parallel_start_rank: int = 0
    kv_cache_block_size: int = 0
    context_length: int = 0
    enable_local_indexer: bool = True
    model_type: str = "Completions"
    model_input: str = "Tokens"
    worker_type: str = "aggregated"


@dataclass(frozen=True, slots=True)
class WorkerEndpoint:
    """The endpoint a worker instance serves, and its instance id (its connection id, its worker_id)."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int

    @property
    def subject_prefix(self) -> str:
        """Where the worker's events go on NATS: `namespace.{ns}.component.{c}.endpoint.{e}`."""
        return (f"namespace.{encode_event_segment(self.namespace)}.component.{encode_event_segment(self.component)}"
                f".endpoint.{encode_event_segment(self.endpoint)}")

    @property
    def nats_request_subject(self) -> str:
        """The instance's request subject as Dynamo's `nats` request plane names it."""
        return f"{self.namespace}_{self.component}.{self.endpoint}-{self.instance_id:x}"

    def _id(self) -> _EndpointId:
        return _EndpointId(self.namespace, self.component, self.endpoint)


def _checked(key: str, value: bytes) -> tuple[str, bytes]:
    decode_keyed_entry(key, value, _MAX_ENTRY_BYTES)  # raises MessageRejected: a reader would drop it
    return key, value


def instance_entry(worker: WorkerEndpoint, transport: dict[str, str] | None = None,
                   device_type: str = "cuda") -> tuple[str, bytes]:
    """(key, value) of the served endpoint; `transport` defaults to the `nats` request plane's subject."""
    value = _Endpoint(worker.component, worker.endpoint, worker.namespace, worker.instance_id,
                      transport if transport is not None else {"nats_tcp": worker.nats_request_subject},
                      device_type, "msgpack")
    return _checked(instance_key(worker.namespace, worker.component, worker.endpoint, worker.instance_id),
                    _encoder.encode(value))


def model_entry(worker: WorkerEndpoint, card: ModelCardValues) -> tuple[str, bytes]:
    """(key, value) of the model card, with its runtime_config."""
    runtime = _RuntimeConfig(card.total_kv_blocks, card.max_num_seqs, card.max_num_batched_tokens,
                             data_parallel_start_rank=card.data_parallel_start_rank,
                             data_parallel_size=card.data_parallel_size,
                             enable_local_indexer=card.enable_local_indexer)
    value = _Model(worker.namespace, worker.component, worker.endpoint, worker.instance_id,
                   _Card(card.name, card.name, None, None, card.context_length, card.kv_cache_block_size, 0,
                         card.model_type, card.model_input, card.worker_type, [], runtime, None, None))
    return _checked(model_card_key(worker.namespace, worker.component, worker.endpoint, worker.instance_id),
                    _encoder.encode(value))


def event_channel_entry(worker: WorkerEndpoint, topic: str, publisher_id: int,
                        transport: NatsTransport | ZmqTransport) -> tuple[str, bytes]:
    """(key, value) saying where publisher `publisher_id` of `topic` can be received."""
    value = _EventChannel(_Scope(ENDPOINT_SCOPE, worker._id()), topic, publisher_id, transport)
    return _checked(event_channel_key(worker.namespace, worker.component, worker.endpoint, topic, publisher_id),
                    _encoder.encode(value))


def event_source_entry(worker: WorkerEndpoint, topic: str, publisher_id: int, dp_rank: int) -> tuple[str, bytes]:
    """(key, value) saying which worker and dp_rank a KV-event publisher speaks for."""
    value = _EventSource(_Scope(ENDPOINT_SCOPE, worker._id()), topic, publisher_id,
                         _SourceMetadata(worker._id(), _SourceWorker(worker.instance_id, dp_rank), publisher_id))
    return _checked(event_channel_key(worker.namespace, worker.component, worker.endpoint, topic, publisher_id,
                                      bucket=EVENT_SOURCES), _encoder.encode(value))

