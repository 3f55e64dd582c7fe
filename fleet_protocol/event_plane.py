"""Dynamo 1.x's event plane: the envelope every event travels in, its NATS subjects and its ZMQ framing.

A publisher (one per topic per worker process) wraps each payload in an `EventEnvelope`,
a MessagePack map with named keys, and sends it either on core NATS, subject
`namespace.{ns}.component.{c}.endpoint.{e}.{topic}`, or on a ZMQ PUB socket as a
four-frame message. `publisher_id` is random per publisher (53 bits), `sequence` counts
that publisher's messages from 0: a gap is lost messages, a new id a new publisher. The
worker is named only inside the payload.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

from .errors import (
    INCONSISTENT,
    MISSING_FIELD,
    OUT_OF_RANGE,
    WRONG_TYPE,
    MessageRejected,
)
from .msgpack_codec import decode_msgpack, encode_msgpack
from .values import MAX_LABEL_LENGTH

# MessagePack has no integer wider than 64 bits, so `ge=0` is the whole u64 check.
U64 = Annotated[int, Meta(ge=0)]
MAX_TOPIC_LENGTH: Final = 64
Topic = Annotated[str, Meta(min_length=1, max_length=MAX_TOPIC_LENGTH)]

# The topics a worker publishes (Dynamo 1.x).
KV_METRICS_TOPIC: Final = "kv_metrics"  # ActiveLoad, on change only
FORWARD_PASS_METRICS_TOPIC: Final = "forward-pass-metrics"  # ForwardPassMetrics v1, per iteration + 1 s idle heartbeat
KV_EVENTS_TOPIC: Final = "kv-events"  # RouterEvent batches
EVENT_TOPICS: Final = (KV_METRICS_TOPIC, FORWARD_PASS_METRICS_TOPIC, KV_EVENTS_TOPIC)


class EventEnvelope(Struct, gc=False):
    """Dynamo's `EventEnvelope`; fields in rmp-serde's order, so re-encoding gives the runtime's bytes.

    Unknown keys (newer Dynamo adds `published_at_ns`) are ignored.
    """

    publisher_id: U64
    sequence: U64
    published_at: U64  # milliseconds since the Unix epoch
    topic: Topic
    payload: bytes  # the topic's payload, MessagePack again


_envelope_decoder = msgspec.msgpack.Decoder(EventEnvelope)


def decode_envelope(message: bytes, max_bytes: int) -> EventEnvelope:
    return decode_msgpack(_envelope_decoder, message, max_bytes)


def encode_envelope(envelope: EventEnvelope) -> bytes:
    return encode_msgpack(envelope)


# Subjects --------------------------------------------------------------------------
#
# Each name becomes one subject token: every byte of its UTF-8 outside [A-Za-z0-9_-] is
# written %XX (upper-case hex), `%` included, so a token never holds `.`, `*` or `>`.

_SEGMENT_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ENCODED_SEGMENT = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+")


def encode_event_segment(name: str) -> str:
    """Dynamo's `encode_event_segment`: a name as one NATS subject token."""
    return "".join(chr(byte) if byte in _SEGMENT_SAFE else f"%{byte:02X}" for byte in name.encode())


def decode_event_segment(segment: str) -> str:
    """The name a subject token stands for; strict, so that one name has exactly one token.

    Rejects (wrong_type) anything `encode_event_segment` cannot have written: other bytes,
    lower-case or broken escapes, escapes of safe bytes, bytes that are not UTF-8; and
    (out_of_range) names longer than a label may be.
    """
    if _ENCODED_SEGMENT.fullmatch(segment) is None:
        raise MessageRejected(WRONG_TYPE, f"subject token {segment[:MAX_LABEL_LENGTH]!r} is not percent-encoded")
    if "%" in segment:
        parts = segment.split("%")
        raw = bytearray(parts[0].encode())
        for part in parts[1:]:
            raw.append(int(part[:2], 16))
            raw += part[2:].encode()
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise MessageRejected(WRONG_TYPE, f"subject token {segment[:MAX_LABEL_LENGTH]!r} is not UTF-8") from None
        if encode_event_segment(name) != segment:
            raise MessageRejected(WRONG_TYPE, f"subject token {segment[:MAX_LABEL_LENGTH]!r} escapes a plain byte")
    else:
        name = segment
    if len(name) > MAX_LABEL_LENGTH:
        raise MessageRejected(OUT_OF_RANGE, f"name of {len(name)} characters > {MAX_LABEL_LENGTH}")
    return name


class EventSubject(Struct, frozen=True, gc=False):
    """Where an event was published, names decoded; `endpoint` is None for a component-scoped event."""

    namespace: str
    component: str
    endpoint: str | None
    topic: str


def endpoint_event_subject(namespace: str, component: str, endpoint: str, topic: str) -> str:
    """Dynamo's `EventScope::subject` for an endpoint-scoped publisher."""
    return (f"namespace.{encode_event_segment(namespace)}.component.{encode_event_segment(component)}"
            f".endpoint.{encode_event_segment(endpoint)}.{encode_event_segment(topic)}")


def component_event_subject(namespace: str, component: str, topic: str) -> str:
    """Dynamo's `EventScope::subject` for a component-scoped publisher."""
    return f"namespace.{encode_event_segment(namespace)}.component.{encode_event_segment(component)}.{encode_event_segment(topic)}"


def event_subject_pattern(namespace: str, topic: str) -> str:
    """What a consumer subscribes to for `topic` from every endpoint of every component of `namespace`."""
    return f"namespace.{encode_event_segment(namespace)}.component.*.endpoint.*.{encode_event_segment(topic)}"


def parse_event_subject(subject: str) -> EventSubject:
    """The decoded names of `namespace.{ns}.component.{c}[.endpoint.{e}].{topic}`."""
    tokens = subject.split(".")
    if len(tokens) == 7 and tokens[0] == "namespace" and tokens[2] == "component" and tokens[4] == "endpoint":
        return EventSubject(decode_event_segment(tokens[1]), decode_event_segment(tokens[3]),
                            decode_event_segment(tokens[5]), decode_event_segment(tokens[6]))
    if len(tokens) == 5 and tokens[0] == "namespace" and tokens[2] == "component":
        return EventSubject(decode_event_segment(tokens[1]), decode_event_segment(tokens[3]), None,
                            decode_event_segment(tokens[4]))
    raise MessageRejected(WRONG_TYPE, f"subject {subject[:2 * MAX_LABEL_LENGTH]!r} is not an event-plane subject")


# ZMQ framing --------------------------------------------------------------------------
#
# A ZMQ publisher sends four frames: [topic, publisher_id (u64 big-endian), sequence
# (u64 big-endian), frame], frame = version byte 0x01, u32 big-endian length, envelope.
# The first frame is the bare topic (`kv_metrics`) from a publisher's own PUB socket (direct
# mode), the whole subject (`namespace.{ns}.component.{c}.endpoint.{e}.{topic}`) through a
# broker (`DYN_ZMQ_BROKER_URL`), where no discovery entry says whose it is.

ZMQ_FRAME_VERSION: Final = 1
_ZMQ_HEADER_BYTES: Final = 5
_U64_BYTES: Final = 8


class ZmqEvent(Struct, gc=False):
    """One decoded ZMQ event message; its header agrees with its envelope."""

    topic: str
    publisher_id: int
    sequence: int
    envelope: EventEnvelope
    subject: EventSubject | None = None  # broker mode: where the first frame says it was published


def encode_zmq_frames(envelope: EventEnvelope, subject: str | None = None) -> list[bytes]:
    """The frames of a direct-mode publisher, or of one behind a broker when `subject` is given."""
    body = encode_envelope(envelope)
    frame = bytes([ZMQ_FRAME_VERSION]) + len(body).to_bytes(4, "big") + body
    return [(subject or envelope.topic).encode(), envelope.publisher_id.to_bytes(_U64_BYTES, "big"),
            envelope.sequence.to_bytes(_U64_BYTES, "big"), frame]


def decode_zmq_frames(frames: Sequence[bytes], max_bytes: int, *, broker: bool = False) -> ZmqEvent:
    """A four-frame ZMQ event message, checked frame by frame and against its envelope.

    `broker`: the first frame is the event-plane subject (broker mode), decoded into `subject`.
    """
    if len(frames) < 4:
        raise MessageRejected(MISSING_FIELD, f"{len(frames)} frames, expected 4")
    if len(frames) > 4:
        raise MessageRejected(INCONSISTENT, f"{len(frames)} frames, expected 4")
    topic_frame, publisher_frame, sequence_frame, frame = (bytes(part) for part in frames)
    if len(publisher_frame) != _U64_BYTES or len(sequence_frame) != _U64_BYTES:
        raise MessageRejected(WRONG_TYPE, "publisher id and sequence frames must be 8 bytes each")
    try:
        topic = topic_frame.decode()
    except UnicodeDecodeError:
        raise MessageRejected(WRONG_TYPE, "topic frame is not UTF-8") from None
    subject = None
    if broker:
        subject = parse_event_subject(topic)
        topic = subject.topic
    if len(frame) < _ZMQ_HEADER_BYTES:
        raise MessageRejected(MISSING_FIELD, f"event frame of {len(frame)} bytes has no header")
    if frame[0] != ZMQ_FRAME_VERSION:
        raise MessageRejected(OUT_OF_RANGE, f"event frame version {frame[0]}, only {ZMQ_FRAME_VERSION} is known")
    length = int.from_bytes(frame[1:_ZMQ_HEADER_BYTES], "big")
    if length != len(frame) - _ZMQ_HEADER_BYTES:
        raise MessageRejected(INCONSISTENT, f"event frame says {length} bytes, holds {len(frame) - _ZMQ_HEADER_BYTES}")
    envelope = decode_envelope(frame[_ZMQ_HEADER_BYTES:], max_bytes)
    publisher_id = int.from_bytes(publisher_frame, "big")
    sequence = int.from_bytes(sequence_frame, "big")
    if (envelope.topic, envelope.publisher_id, envelope.sequence) != (topic, publisher_id, sequence):
        raise MessageRejected(INCONSISTENT, "ZMQ frame header disagrees with its envelope")
    return ZmqEvent(topic, publisher_id, sequence, envelope, subject)
