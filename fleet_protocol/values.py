"""Value types shared by the messages: bounded counts, fractions, worker ids, ranks, names.

Every structure of this package holds only scalars, lists and other structures, never a cycle, so
they are untracked by the cyclic GC (`gc=False`): a fleet keeps hundreds of thousands of
them alive, and tracked ones make each full collection walk all of them.
"""

from __future__ import annotations

from typing import Annotated, Final

from msgspec import Meta

from .errors import OUT_OF_RANGE, MessageRejected

# Beyond 2**40 blocks or slots no engine exists; such a value is a bug or an attack.
MAX_COUNT: Final = 2**40
MAX_LABEL_LENGTH: Final = 128

Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
# Dynamo's worker id is an etcd lease id (i64, later u64); exported in decimal.
# msgspec cannot bound ints beyond int64, so the u64 ceiling is checked after decoding.
MAX_WORKER_ID: Final = 2**64 - 1
WorkerId = Annotated[int, Meta(ge=0)]
Rank = Annotated[int, Meta(ge=0, le=65535)]
EndpointName = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL_LENGTH)]


def check_worker_id(worker_id: int) -> None:
    if worker_id > MAX_WORKER_ID:
        raise MessageRejected(OUT_OF_RANGE, f"worker_id {worker_id} does not fit in 64 bits")
