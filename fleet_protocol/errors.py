"""Why a message is not used: the reasons every decoder of this package raises."""

from __future__ import annotations

from typing import Final

# Reasons a message is rejected; each is a label value of the rejected-messages counter.
OVERSIZED: Final = "oversized"
NOT_JSON: Final = "not_json"
MISSING_FIELD: Final = "missing_field"
WRONG_TYPE: Final = "wrong_type"
OUT_OF_RANGE: Final = "out_of_range"
INCONSISTENT: Final = "inconsistent"
REJECT_REASONS: Final = (OVERSIZED, NOT_JSON, MISSING_FIELD, WRONG_TYPE, OUT_OF_RANGE, INCONSISTENT)
# Dynamo 1.x's event plane is MessagePack: its decoders say not_msgpack where the JSON ones say not_json.
# Kept out of REJECT_REASONS so that the JSON kinds' counters do not grow a reason they cannot have.
NOT_MSGPACK: Final = "not_msgpack"
EVENT_REJECT_REASONS: Final = (OVERSIZED, NOT_MSGPACK, MISSING_FIELD, WRONG_TYPE, OUT_OF_RANGE, INCONSISTENT)


class MessageRejected(Exception):
    """A message that cannot be used; `reason` is one of REJECT_REASONS (EVENT_REJECT_REASONS for MessagePack)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

