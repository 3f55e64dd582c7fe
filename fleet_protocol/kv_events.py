"""KV cache events on topic `kv-events` (Dynamo 1.x's `RouterEvent`), the payload of an EventEnvelope.

A payload is a batch (MessagePack array) of RouterEvents. Each says that one (worker,
dp_rank) source stored blocks, removed blocks, or dropped every block (`cleared`).
`event_id` counts up per source, so a gap means lost events; ordering holds only within
one source. Block hashes are u64 on the wire (the Python API's negative i64 arrive as
their two's complement).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from .errors import INCONSISTENT, MessageRejected
from .event_plane import U64
from .msgpack_codec import decode_msgpack, encode_msgpack
from .values import MAX_LABEL_LENGTH, Count, Rank

CLEARED: Final = "cleared"
STORED: Final = "stored"
REMOVED: Final = "removed"
DEVICE_TIER: Final = "device"  # also host_pinned, disk, external (1.6.1)
WORKER_DOMAIN: Final = "worker"  # also cache_owner (1.6.1)
LabelText = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL_LENGTH)]
_NIL: Final = msgspec.Raw(b"\xc0")


class StoredBlock(Struct, gc=False):
    block_hash: U64
    tokens_hash: U64
    # Multimodal details, kept undecoded: nothing here reads them, and a shape change must not cost the block.
    # Raw, not Raw | None: msgspec would then only accept nil. Absent reads as nil.
    mm_extra_info: msgspec.Raw = _NIL


class KvStored(Struct, gc=False):
    parent_hash: U64 | None = None
    start_position: Count | None = None
    blocks: list[StoredBlock] = []


class KvRemoved(Struct, gc=False):
    block_hashes: list[U64] = []


class KvEventData(Struct, omit_defaults=True, gc=False):
    """The map form of the data: exactly one of `stored` / `removed` (serde's externally tagged enum)."""

    stored: KvStored | None = None
    removed: KvRemoved | None = None


class KvCacheEvent(Struct, gc=False):
    event_id: U64
    data: KvEventData | Literal["cleared"]
    dp_rank: Rank = 0

    @property
    def kind(self) -> str:
        """`stored`, `removed` or `cleared`."""
        if isinstance(self.data, str):
            return CLEARED
        return STORED if self.data.stored is not None else REMOVED


class RouterEvent(Struct, kw_only=True, gc=False):
    """One event of one worker's KV cache; fields in the runtime's order (keyword-only, for the defaults between)."""

    worker_id: U64
    storage_tier: LabelText = DEVICE_TIER
    residency_domain: LabelText = WORKER_DOMAIN
    event: KvCacheEvent


_batch_decoder = msgspec.msgpack.Decoder(list[RouterEvent])


def decode_kv_events(payload: bytes, max_bytes: int) -> list[RouterEvent]:
    """A batch of RouterEvents; the whole batch is rejected if one event is malformed."""
    batch: list[RouterEvent] = decode_msgpack(_batch_decoder, payload, max_bytes)
    for event in batch:
        data = event.event.data
        if not isinstance(data, str) and (data.stored is None) == (data.removed is None):
            raise MessageRejected(INCONSISTENT, f"event {event.event.event_id}: data must be one of stored, removed")
    return batch


def encode_kv_events(batch: list[RouterEvent]) -> bytes:
    return encode_msgpack(batch)
