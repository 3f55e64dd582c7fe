"""Every Dynamo payload shape decodes to the same stats; every class of bad input has its reason."""

from __future__ import annotations

import json

import pytest

import fleet_protocol as protocol
from fleet_protocol import MessageRejected

LIMIT = 64 * 1024

NESTED = {
    "worker_stats": {"data_parallel_rank": None, "request_active_slots": 37, "request_total_slots": 100,
                     "num_requests_waiting": 12},
    "kv_stats": {"kv_active_blocks": 40, "kv_total_blocks": 100, "gpu_cache_usage_perc": 0.4,
                 "gpu_prefix_cache_hit_rate": 0.25},
    "spec_decode_stats": None,
}
FLAT = {"data_parallel_rank": None, "request_active_slots": 37, "request_total_slots": 100, "kv_active_blocks": 40,
        "kv_total_blocks": 100, "num_requests_waiting": 12, "gpu_cache_usage_perc": 0.4,
        "gpu_prefix_cache_hit_rate": 0.25}
WRAPPED = {"engine_load_metrics": NESTED}


def load_event(data, **extra) -> bytes:
    return json.dumps({"worker_id": 7587888657184927289, "data": data, **extra}).encode()


@pytest.mark.parametrize("data", [NESTED, FLAT, WRAPPED], ids=["nested", "flat", "wrapped"])
def test_every_dynamo_shape_decodes_to_the_same_stats(data):
    event = protocol.decode_load_event(load_event(data), LIMIT)
    assert event.worker_id == 7587888657184927289
    assert event.endpoint == "generate"
    assert event.data.worker_stats == protocol.WorkerStats(37, 100, 12, None)
    assert event.data.kv_stats == protocol.KvStats(40, 100, 0.4, 0.25)


def test_oldest_flat_shape_with_only_the_four_counts():
    data = {k: FLAT[k] for k in ("request_active_slots", "request_total_slots", "kv_active_blocks", "kv_total_blocks")}
    event = protocol.decode_load_event(load_event(data), LIMIT)
    assert event.data.worker_stats.num_requests_waiting is None
    assert event.data.kv_stats.gpu_cache_usage_perc is None


def test_unknown_fields_and_spec_decode_stats_are_accepted():
    data = {**NESTED, "spec_decode_stats": {"num_spec_tokens": 3, "num_accepted_tokens_per_pos": [3, 2, 1]},
            "future_field": {"x": 1}}
    event = protocol.decode_load_event(load_event(data, endpoint="chat", something_new=1), LIMIT)
    assert event.endpoint == "chat"
    assert event.data.spec_decode_stats.num_accepted_tokens_per_pos == [3, 2, 1]


def test_data_parallel_rank_is_kept():
    data = {**FLAT, "data_parallel_rank": 3}
    assert protocol.decode_load_event(load_event(data), LIMIT).data.worker_stats.data_parallel_rank == 3


def test_published_message_round_trips():
    metrics = protocol.decode_load_event(load_event(NESTED), LIMIT).data
    payload = protocol.encode(protocol.LoadEvent(worker_id=5, data=metrics, endpoint="e"))
    assert protocol.decode_load_event(payload, LIMIT) == protocol.LoadEvent(5, metrics, "e")
    # Dynamo's serde writes absent optionals as null, never omits them.
    assert json.loads(payload)["data"]["spec_decode_stats"] is None


def test_hit_rate_event():
    event = protocol.decode_hit_rate_event(b'{"worker_id":7,"isl_blocks":12,"overlap_blocks":8}', LIMIT)
    assert (event.worker_id, event.isl_blocks, event.overlap_blocks, event.dp_rank) == (7, 12, 8, None)
    event = protocol.decode_hit_rate_event(b'{"worker_id":7,"isl_blocks":12,"overlap_blocks":8,"dp_rank":2}', LIMIT)
    assert event.dp_rank == 2


BAD_LOAD = [
    (b"not json at all", protocol.NOT_JSON),
    (b"\xff\xfe\x00", protocol.NOT_JSON),
    (b"", protocol.NOT_JSON),
    (b"[" * 10_000 + b"]" * 10_000, protocol.WRONG_TYPE),
    (b"[1, 2]", protocol.WRONG_TYPE),
    (b'{"data": {}}', protocol.MISSING_FIELD),
    (load_event({"request_active_slots": 1}), protocol.MISSING_FIELD),
    (load_event({"worker_stats": NESTED["worker_stats"]}), protocol.MISSING_FIELD),
    (load_event({**FLAT, "kv_active_blocks": "40"}), protocol.WRONG_TYPE),
    (load_event({**FLAT, "kv_active_blocks": 40.5}), protocol.WRONG_TYPE),
    (json.dumps({"worker_id": "abc", "data": FLAT}).encode(), protocol.WRONG_TYPE),
    (load_event({**FLAT, "kv_active_blocks": -1}), protocol.OUT_OF_RANGE),
    (load_event({**FLAT, "kv_total_blocks": 2**41}), protocol.OUT_OF_RANGE),
    (load_event({**FLAT, "gpu_cache_usage_perc": 1.5}), protocol.OUT_OF_RANGE),
    (load_event({**FLAT, "gpu_cache_usage_perc": 0.5}).replace(b"0.5", b"1e400"), protocol.OUT_OF_RANGE),
    (load_event({**FLAT, "gpu_cache_usage_perc": float("inf")}), protocol.NOT_JSON),  # Python's "Infinity"
    (json.dumps({"worker_id": 2**64, "data": FLAT}).encode(), protocol.OUT_OF_RANGE),
    (json.dumps({"worker_id": -5, "data": FLAT}).encode(), protocol.OUT_OF_RANGE),
    (load_event(FLAT, endpoint=""), protocol.OUT_OF_RANGE),
    (load_event(FLAT, endpoint="x" * 200), protocol.OUT_OF_RANGE),
    (load_event({**FLAT, "kv_active_blocks": 101}), protocol.INCONSISTENT),
    (load_event({**FLAT, "request_active_slots": 101}), protocol.INCONSISTENT),
    (load_event({**FLAT, "padding": "x" * LIMIT}), protocol.OVERSIZED),
]


@pytest.mark.parametrize("payload,reason", BAD_LOAD, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD_LOAD)])
def test_bad_load_events_are_rejected_with_their_reason(payload, reason):
    with pytest.raises(MessageRejected) as caught:
        protocol.decode_load_event(payload, LIMIT)
    assert caught.value.reason == reason, caught.value.detail


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b'{"worker_id":7,"isl_blocks":12}', protocol.MISSING_FIELD),
        (b'{"worker_id":7,"isl_blocks":8,"overlap_blocks":12}', protocol.INCONSISTENT),
        (b'{"worker_id":7,"isl_blocks":-8,"overlap_blocks":0}', protocol.OUT_OF_RANGE),
        (b'{"worker_id":7,"isl_blocks":null,"overlap_blocks":0}', protocol.WRONG_TYPE),
        (b'{"worker_id":7,"isl_blocks":NaN,"overlap_blocks":0}', protocol.NOT_JSON),
    ],
)
def test_bad_hit_rate_events_are_rejected_with_their_reason(payload, reason):
    with pytest.raises(MessageRejected) as caught:
        protocol.decode_hit_rate_event(payload, LIMIT)
    assert caught.value.reason == reason


def test_subjects():
    assert protocol.component_subject("dynamo", "backend", "kv_metrics") == "namespace.dynamo.component.backend.kv_metrics"
    assert protocol.namespace_subject("dynamo", "kv-hit-rate") == "namespace.dynamo.kv-hit-rate"
    assert protocol.component_of("namespace.dynamo.component.MyComponent.kv_metrics") == "MyComponent"
    assert protocol.component_of("namespace.dynamo.kv_metrics") is None
