"""Dynamo 1.x's discovery store: its keys and its JSON entries (instances, model cards, event channels).

The same keys live in etcd (no prefix before `v1/`, each attached to the worker's lease,
whose id is the worker's instance id; TTL 30 s) and in the file backend (`DYN_FILE_KV`:
one file per key, `<dir>/v1/<bucket>/<rest of the key, percent-encoded>`, its mtime
refreshed by a keep-alive every ~3.3 s; Dynamo's own processes delete files not refreshed
for 10 s).

Keys of `instances` and `mdc` hold the names raw (`v1/instances/{ns}/{c}/{e}/{id:x}`), so a
name with `/` makes them ambiguous; the names in the entry itself are authoritative. A
reader should index its state by the whole key, which is all a deletion carries. Keys of
`event_channels` / `event_sources` hold the names as event-plane subject tokens.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

from .codec import decode
from .errors import INCONSISTENT, WRONG_TYPE, MessageRejected
from .event_plane import decode_event_segment, encode_event_segment
from .service_stats import parse_worker_id
from .values import MAX_LABEL_LENGTH, Count, Rank, WorkerId, check_worker_id

KEY_ROOT: Final = "v1"
INSTANCES: Final = "instances"
MODEL_CARDS: Final = "mdc"
EVENT_CHANNELS: Final = "event_channels"
EVENT_SOURCES: Final = "event_sources"
BUCKETS: Final = (INSTANCES, MODEL_CARDS, EVENT_CHANNELS, EVENT_SOURCES)
# Dynamo's timings (1.6.1, observed): etcd lease TTL, file-backend entry TTL and keep-alive period.
ETCD_LEASE_TTL_S: Final = 30
FILE_ENTRY_TTL_S: Final = 10
FILE_KEEP_ALIVE_S: Final = 10 / 3

Name = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL_LENGTH)]
Text = Annotated[str, Meta(max_length=1024)]
_NULL: Final = msgspec.Raw(b"null")


# Keys ------------------------------------------------------------------------------


class DiscoveryKey(Struct, frozen=True, gc=False):
    """What a key says. `instance_id` is the worker's id (instances, mdc) or the publisher's (event buckets).

    The names are None where the key is ambiguous (a name holding `/`).
    """

    bucket: str
    instance_id: int
    namespace: str | None = None
    component: str | None = None
    endpoint: str | None = None
    topic: str | None = None  # event buckets
    lora: str | None = None  # a model card of a LoRA adapter


def _hex_id(text: str, key: str) -> int:
    try:
        instance_id = parse_worker_id(text)
    except MessageRejected:
        instance_id = None
    if instance_id is None:
        raise MessageRejected(WRONG_TYPE, f"key {key[:256]!r} does not end in a 64-bit hex id")
    return instance_id


def parse_discovery_key(key: str) -> DiscoveryKey:
    """A key as etcd holds it (`v1/{bucket}/...`); rejects keys of other buckets or shapes."""
    root, _, rest = key.partition("/")
    bucket, _, path = rest.partition("/")
    if root != KEY_ROOT or bucket not in BUCKETS or not path:
        raise MessageRejected(WRONG_TYPE, f"key {key[:256]!r} is not in a known discovery bucket")
    parts = path.split("/")
    if bucket in (EVENT_CHANNELS, EVENT_SOURCES):
        if len(parts) == 7 and parts[0] == "namespace" and parts[2] == "component" and parts[4] == "topic":
            # A component's own channel (no worker endpoint): Dynamo's ZMQ brokers register so.
            return DiscoveryKey(bucket, _hex_id(parts[6], key), decode_event_segment(parts[1]),
                                decode_event_segment(parts[3]), None, decode_event_segment(parts[5]))
        if (len(parts) != 9 or parts[0] != "namespace" or parts[2] != "component" or parts[4] != "endpoint"
                or parts[6] != "topic"):
            raise MessageRejected(WRONG_TYPE, f"key {key[:256]!r} is not an endpoint- or component-scoped event key")
        return DiscoveryKey(bucket, _hex_id(parts[8], key), decode_event_segment(parts[1]),
                            decode_event_segment(parts[3]), decode_event_segment(parts[5]),
                            decode_event_segment(parts[7]))
    if len(parts) < 4:
        raise MessageRejected(WRONG_TYPE, f"key {key[:256]!r} has fewer than 4 parts after its bucket")
    if len(parts) == 4:
        return DiscoveryKey(bucket, _hex_id(parts[3], key), *_names(parts[:3], key))
    if bucket == INSTANCES:
        return DiscoveryKey(bucket, _hex_id(parts[-1], key))
    if len(parts) == 5:
        try:  # {ns}/{c}/{e}/{id:x}/{lora}
            return DiscoveryKey(bucket, _hex_id(parts[3], key), *_names(parts[:3], key), lora=_name(parts[4], key))
        except MessageRejected:
            pass
    raise MessageRejected(INCONSISTENT, f"key {key[:256]!r} is ambiguous: a name holds '/'")


def _name(text: str, key: str) -> str:
    if not text or len(text) > MAX_LABEL_LENGTH:
        raise MessageRejected(WRONG_TYPE, f"key {key[:256]!r} holds an empty or over-long name")
    return text


def _names(parts: list[str], key: str) -> tuple[str, str, str]:
    return _name(parts[0], key), _name(parts[1], key), _name(parts[2], key)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{KEY_ROOT}/{INSTANCES}/{namespace}/{component}/{endpoint}/{instance_id:x}"


def model_card_key(namespace: str, component: str, endpoint: str, instance_id: int, lora: str | None = None) -> str:
    key = f"{KEY_ROOT}/{MODEL_CARDS}/{namespace}/{component}/{endpoint}/{instance_id:x}"
    return key if lora is None else f"{key}/{lora}"


def event_channel_key(namespace: str, component: str, endpoint: str, topic: str, publisher_id: int,
                      bucket: str = EVENT_CHANNELS) -> str:
    return (f"{KEY_ROOT}/{bucket}/namespace/{encode_event_segment(namespace)}/component/"
            f"{encode_event_segment(component)}/endpoint/{encode_event_segment(endpoint)}/topic/"
            f"{encode_event_segment(topic)}/{publisher_id:x}")


ZMQ_BROKER_COMPONENT: Final = "zmq_broker"  # where Dynamo's ZMQ broker registers (`ZMQ_BROKER_NAMESPACE`)
ZMQ_BROKER_TOPIC: Final = "broker"


def component_channel_key(namespace: str, component: str, topic: str, instance_id: int) -> str:
    """The key of a component-scoped event channel: `v1/event_channels/namespace/{ns}/component/{c}/topic/{t}/{id:x}`."""
    return (f"{KEY_ROOT}/{EVENT_CHANNELS}/namespace/{encode_event_segment(namespace)}/component/"
            f"{encode_event_segment(component)}/topic/{encode_event_segment(topic)}/{instance_id:x}")


def zmq_broker_entry(namespace: str, instance_id: int, xsub: list[str], xpub: list[str]) -> tuple[str, EventChannelEntry]:
    """(key, entry) of a ZMQ broker as Dynamo's broker registers it in `namespace`."""
    scope = EventScope("component", namespace=namespace, component=ZMQ_BROKER_COMPONENT)
    entry = EventChannelEntry(scope, ZMQ_BROKER_TOPIC, instance_id, ZmqBrokerTransport(ZmqBrokerConfig(xsub, xpub)))
    return component_channel_key(namespace, ZMQ_BROKER_COMPONENT, ZMQ_BROKER_TOPIC, instance_id), entry


# The file backend: every byte of the key after `v1/{bucket}/` that is not an ASCII letter
# or digit is written %XX (upper-case), `/` `-` `_` `%` included.

_FILE_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_HEX_DIGITS = frozenset("0123456789ABCDEF")


def file_name(key_rest: str) -> str:
    """The file name the file backend stores `v1/{bucket}/{key_rest}` under (in `<dir>/v1/{bucket}/`)."""
    return "".join(chr(byte) if byte in _FILE_SAFE else f"%{byte:02X}" for byte in key_rest.encode())


def key_of_file(bucket: str, name: str) -> str:
    """The key a file `<dir>/v1/{bucket}/{name}` holds; strict, so one key has exactly one file name."""
    raw = bytearray()
    index = 0
    while index < len(name):
        char = name[index]
        if char == "%":
            digits = name[index + 1:index + 3]
            if len(digits) != 2 or not set(digits) <= _HEX_DIGITS:
                raise MessageRejected(WRONG_TYPE, f"file name {name[:256]!r} has a broken escape")
            raw.append(int(digits, 16))
            index += 3
        elif char.isascii() and char.isalnum():
            raw.append(ord(char))
            index += 1
        else:
            raise MessageRejected(WRONG_TYPE, f"file name {name[:256]!r} holds an unescaped {char!r}")
    try:
        rest = raw.decode()
    except UnicodeDecodeError:
        raise MessageRejected(WRONG_TYPE, f"file name {name[:256]!r} is not UTF-8") from None
    if file_name(rest) != name:
        raise MessageRejected(WRONG_TYPE, f"file name {name[:256]!r} escapes a plain byte")
    return f"{KEY_ROOT}/{bucket}/{rest}"


# Entries ---------------------------------------------------------------------------


class InstanceEntry(Struct, tag_field="type", tag="Endpoint", gc=False):
    """A served endpoint of one worker: while it exists, the worker is alive (its lease or keep-alive holds)."""

    namespace: Name
    component: Name
    endpoint: Name
    instance_id: WorkerId
    # {"tcp": "host:port/{id:x}/{ns}/{c}/{e}"} or {"nats_tcp": "{service}.{e}-{id:x}"}; kept raw.
    transport: msgspec.Raw = _NULL
    device_type: Text | None = None
    request_plane_codec: Text | None = None


class RuntimeConfig(Struct, gc=False):
    """The engine's capacity as registered (`ModelRuntimeConfig`); other keys ignored."""

    total_kv_blocks: Count | None = None
    max_num_seqs: Count | None = None
    max_num_batched_tokens: Count | None = None
    data_parallel_start_rank: Rank = 0
    data_parallel_size: Annotated[int, Meta(ge=1, le=65536)] = 1
    enable_local_indexer: bool = False


class ModelCard(Struct, gc=False):
    """The parts of a model deployment card (`card_json`) this reader uses."""

    display_name: Text = ""
    kv_cache_block_size: Count | None = None
    context_length: Count | None = None
    worker_type: Text | None = None
    runtime_config: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)


class ModelEntry(Struct, tag_field="type", tag="Model", gc=False):
    """A model registered on a worker's endpoint, with its runtime_config."""

    namespace: Name
    component: Name
    endpoint: Name
    instance_id: WorkerId
    card_json: ModelCard


class EndpointScope(Struct, gc=False):
    namespace: Name
    component: Name
    name: Name


class EventScope(Struct, omit_defaults=True, gc=False):
    """Dynamo's scope of an event channel: `endpoint` (a worker's publishers) or `component` (its
    `namespace` and `component` fields; Dynamo's ZMQ brokers register there, as component `zmq_broker`)."""

    kind: Text
    endpoint: EndpointScope | None = None
    namespace: Name | None = None
    component: Name | None = None


class NatsConfig(Struct, gc=False):
    subject_prefix: Annotated[str, Meta(min_length=1, max_length=1024)]


_Endpoint = Annotated[str, Meta(min_length=1, max_length=1024)]  # a ZMQ endpoint, tcp://ip:port


class ZmqConfig(Struct, gc=False):
    endpoint: _Endpoint  # of the publisher's PUB socket


# Endpoints a broker lists: a broker is one process, HA is a few of them.
MAX_BROKER_ENDPOINTS: Final = 16


class ZmqBrokerConfig(Struct, gc=False):
    xsub_endpoints: Annotated[list[_Endpoint], Meta(max_length=MAX_BROKER_ENDPOINTS)]  # where publishers connect
    xpub_endpoints: Annotated[list[_Endpoint], Meta(min_length=1, max_length=MAX_BROKER_ENDPOINTS)]  # subscribers


class NatsTransport(Struct, tag_field="kind", tag="Nats", gc=False):
    config: NatsConfig


class ZmqTransport(Struct, tag_field="kind", tag="Zmq", gc=False):
    config: ZmqConfig


class ZmqBrokerTransport(Struct, tag_field="kind", tag="ZmqBroker", gc=False):
    config: ZmqBrokerConfig


class EventChannelEntry(Struct, tag_field="type", tag="EventChannel", gc=False):
    """One event publisher (one topic of one worker process) and where to receive it; or a ZMQ broker
    (component `zmq_broker`, transport `ZmqBroker`) that workers with `DYN_ZMQ_BROKER_ENABLED` publish through."""

    scope: EventScope
    topic: Name
    instance_id: WorkerId  # the publisher_id of its envelopes
    transport: NatsTransport | ZmqTransport | ZmqBrokerTransport


class SourceWorker(Struct, gc=False):
    worker_id: WorkerId
    dp_rank: Rank = 0


class SourceMetadata(Struct, gc=False):
    worker: SourceWorker | None = None
    publisher_id: WorkerId | None = None
    kv_state_endpoint: EndpointScope | None = None


class EventSourceEntry(Struct, tag_field="type", tag="EventSource", gc=False):
    """Which worker and dp_rank a KV-event publisher speaks for."""

    scope: EventScope
    topic: Name
    publisher_id: WorkerId
    metadata: SourceMetadata = msgspec.field(default_factory=SourceMetadata)


DiscoveryEntry = InstanceEntry | ModelEntry | EventChannelEntry | EventSourceEntry
_ENTRY_TYPES: Final = {INSTANCES: InstanceEntry, MODEL_CARDS: ModelEntry, EVENT_CHANNELS: EventChannelEntry,
                       EVENT_SOURCES: EventSourceEntry}
_decoders: Final = {bucket: msgspec.json.Decoder(kind) for bucket, kind in _ENTRY_TYPES.items()}
_any_decoder: Final = msgspec.json.Decoder(DiscoveryEntry)
_encoder: Final = msgspec.json.Encoder()


def _check_ids(entry: DiscoveryEntry) -> DiscoveryEntry:
    if isinstance(entry, (InstanceEntry, ModelEntry, EventChannelEntry)):
        check_worker_id(entry.instance_id)
    else:
        check_worker_id(entry.publisher_id)
        if entry.metadata.worker is not None:
            check_worker_id(entry.metadata.worker.worker_id)
    return entry


def decode_discovery_entry(value: bytes, max_bytes: int, bucket: str | None = None) -> DiscoveryEntry:
    """An entry of `bucket` (any bucket if None), told apart by its `type`; other types are rejected."""
    if bucket is None:
        decoder = _any_decoder
    elif bucket in _decoders:
        decoder = _decoders[bucket]
    else:
        raise MessageRejected(WRONG_TYPE, f"unknown discovery bucket {bucket[:64]!r}")
    return _check_ids(decode(decoder, value, max_bytes))


def decode_keyed_entry(key: str, value: bytes, max_bytes: int) -> tuple[DiscoveryKey, DiscoveryEntry]:
    """A key and its entry, checked against each other (the key's id is the entry's)."""
    parsed = parse_discovery_key(key)
    entry = decode_discovery_entry(value, max_bytes, parsed.bucket)
    entry_id = entry.publisher_id if isinstance(entry, EventSourceEntry) else entry.instance_id
    if entry_id != parsed.instance_id:
        raise MessageRejected(INCONSISTENT, f"key id {parsed.instance_id:x} != entry id {entry_id:x}")
    return parsed, entry


def encode_discovery_entry(entry: DiscoveryEntry) -> bytes:
    return _encoder.encode(entry)

