"""Pull mode's pure parts on plain values: naming, subject matching, hex ids, stats replies."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fleet_protocol as protocol
from aggregator.ingest.stats_replies import (
    NO_DATA,
    NO_WORKER_ID,
    NotWanted,
    ScrapeTarget,
    ServicePlan,
    match_subject,
    plan_services,
    read_stats_reply,
)
from fleet_protocol import MessageRejected
from fleet_protocol.service_stats import (
    endpoint_subject,
    parse_worker_id,
    service_name,
    slugify,
    stats_subject,
)

NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8, "num_requests_waiting": 1,
                           "data_parallel_rank": None},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100, "gpu_cache_usage_perc": 0.3,
                       "gpu_prefix_cache_hit_rate": 0.25},
          "spec_decode_stats": None}
PLAN = ServicePlan("dynamo_backend", {"generate": "backend", "load-metrics": "backend"})

# A reply exactly as nats-py 2.16's nats.micro sent it (observed), with Dynamo's naming.
OBSERVED_REPLY = (
    '{"type": "io.nats.micro.v1.stats_response", "name": "dynamo_backend", "id": "9uYsvdQ4umTeMGoa5trjCh", '
    '"version": "0.0.1", "started": "2026-11-24T23:43:02.434Z", "endpoints": [{"name": "generate-4409f134c386bbc4", '
    '"subject": "dynamo_backend.generate-4409f134c386bbc4", "queue_group": "q", "num_requests": 0, "num_errors": 0, '
    '"last_error": "", "processing_time": 0, "average_processing_time": 0, "data": ' + json.dumps(NESTED) + '}], '
    '"metadata": {}}'
)


def kv(active: int, total: int = 100) -> dict:
    return {"worker_stats": {"request_active_slots": 1, "request_total_slots": 8},
            "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": total}}


def reply(*endpoints) -> bytes:
    return json.dumps({"type": protocol.STATS_RESPONSE_TYPE, "name": "dynamo_backend", "id": "x",
                       "version": "0.0.1", "started": "2025-08-08T05:07:17Z", "endpoints": list(endpoints)}).encode()


def entry(subject: str, data=None, **extra) -> dict:
    return {"name": subject.split(".", 1)[-1], "subject": subject, "num_requests": 0, "num_errors": 0,
            "last_error": "", "processing_time": 0, "average_processing_time": 0, "queue_group": "q",
            "data": data, **extra}


@pytest.mark.parametrize("raw,slug", [
    ("dynamo_MyComponent", "dynamo_mycomponent"),
    ("dynamo_backend", "dynamo_backend"),
    ("my-ns_vllm-worker", "my-ns_vllm-worker"),
    ("_dynamo_x", "dynamo_x"),
    ("__a", "a"),
    ("a.b c/d*e>f", "a_b_c_d_e_f"),
    ("Ünïcode_X", "n_code_x"),  # lower-cased first, then non-ASCII replaced, then leading '_' trimmed
    ("a__b_", "a__b_"),  # only leading underscores go
])
def test_slugify_is_dynamos(raw, slug):
    assert slugify(raw) == slug


def test_names_and_subjects_of_a_dynamo_worker():
    service = service_name("dynamo", "MyComponent")
    assert service == "dynamo_mycomponent"
    assert stats_subject(service) == "$SRV.STATS.dynamo_mycomponent"
    subject = endpoint_subject(service, "my_endpoint", 0x694D988806B92E39)
    assert subject == "dynamo_mycomponent.my_endpoint-694d988806b92e39"
    plan = ServicePlan(service, {"my_endpoint": "MyComponent"})
    # Dynamo's documented example: exported in decimal.
    assert match_subject(subject, plan) == ("my_endpoint", 7587888657184927289)


@pytest.mark.parametrize("text,value", [
    ("1a", 26), ("ABC", 0xABC), ("0", 0), ("ffffffffffffffff", 2**64 - 1), ("00000000000000000001", 1),
    ("", None), ("0x1a", None), ("1_a", None), ("+1", None), ("-1", None), (" 1", None), ("1 ", None),
    ("g", None), ("１", None),
])
def test_parse_worker_id_takes_hex_digits_only(text, value):
    assert parse_worker_id(text) == value


def test_parse_worker_id_rejects_more_than_64_bits():
    with pytest.raises(MessageRejected) as error:
        parse_worker_id("1" + "0" * 16)
    assert error.value.reason == protocol.OUT_OF_RANGE


@pytest.mark.parametrize("subject,expected", [
    ("dynamo_backend.generate-1a", ("generate", 26)),
    ("dynamo_backend.load-metrics-ff", ("load-metrics", 255)),
    ("dynamo_backend.generate-00", ("generate", 0)),
    ("dynamo_backend.generate2-1a", NotWanted),  # Dynamo's prefix match took this for `generate`
    ("dynamo_backend.generatex", NotWanted),
    ("dynamo_backend.generate-zz", NotWanted),  # not a worker id: some other endpoint `generate-zz`
    ("dynamo_backend.generate-1-2", NotWanted),  # endpoint `generate-1` of worker 2
    ("dynamo_backend.load-1", NotWanted),
    ("dynamo_backend2.generate-1", NotWanted),
    ("dynamo_backen.generate-1", NotWanted),
    ("other.generate-1", NotWanted),
    ("generate-1", NotWanted),  # an endpoint outside the service's group
    ("dynamo_backend.generate", NO_WORKER_ID),  # Dynamo dropped static endpoints silently
    ("dynamo_backend.generate-" + "f" * 17, protocol.OUT_OF_RANGE),
])
def test_subjects_match_exactly(subject, expected):
    if expected is NotWanted:
        with pytest.raises(NotWanted):
            match_subject(subject, PLAN)
    elif isinstance(expected, str):
        with pytest.raises(MessageRejected) as error:
            match_subject(subject, PLAN)
        assert error.value.reason == expected
    else:
        assert match_subject(subject, PLAN) == expected


def test_plan_groups_endpoints_by_service_and_refuses_colliding_components():
    plans = plan_services("dynamo", [ScrapeTarget("backend", "generate"), ScrapeTarget("backend", "load_metrics"),
                                     ScrapeTarget("prefill", "generate")])
    assert plans == [ServicePlan("dynamo_backend", {"generate": "backend", "load_metrics": "backend"}),
                     ServicePlan("dynamo_prefill", {"generate": "prefill"})]
    assert plans[0].subject == "$SRV.STATS.dynamo_backend"
    with pytest.raises(ValueError, match="both NATS service 'dynamo_backend'"):
        plan_services("dynamo", [ScrapeTarget("backend", "generate"), ScrapeTarget("Backend", "generate")])


def test_observed_nats_micro_reply_decodes():
    reading = read_stats_reply(OBSERVED_REPLY.encode(), PLAN, 65536)
    assert reading.rejects == [] and reading.ignored == 0
    (item,) = reading.readings
    assert (item.component, item.endpoint, item.worker_id) == ("backend", "generate", 0x4409F134C386BBC4)
    assert item.metrics == msgspec.convert(NESTED, protocol.ForwardPassMetrics)


def test_each_endpoint_is_read_on_its_own():
    payload = reply(
        entry("dynamo_backend.generate-1", kv(10)),
        5,  # not an object
        entry("dynamo_backend.generate-2", {"kv_stats": "garbage"}),
        {"subject": 7, "data": kv(99)},  # subject of the wrong type
        entry("dynamo_backend.generate2-3", kv(99)),  # another endpoint of the service
        entry("dynamo_backend.generate", kv(99)),  # static: no worker id
        entry("dynamo_backend.generate-4", None),  # no stats handler
        {"name": "x", "subject": "dynamo_backend.generate-5"},  # no data field at all
        entry("dynamo_backend.generate-6", kv(200)),  # inconsistent: more active than total
        entry("dynamo_backend.generate-7", {"request_active_slots": 1, "request_total_slots": 2,
                                            "kv_active_blocks": 70, "kv_total_blocks": 100}),  # flat shape
        entry("dynamo_backend.load-metrics-8", {"engine_load_metrics": kv(80)}),  # wrapped shape
        entry("dynamo_backend.generate-9", kv(90)),
    )
    reading = read_stats_reply(payload, PLAN, 65536)
    got = {(r.endpoint, r.worker_id): r.metrics.kv_stats.kv_active_blocks for r in reading.readings}
    assert got == {("generate", 1): 10, ("generate", 7): 70, ("load-metrics", 8): 80, ("generate", 9): 90}
    assert [(r.reason, r.subject) for r in reading.rejects] == [
        (protocol.WRONG_TYPE, "endpoints[1]"),
        (protocol.WRONG_TYPE, "dynamo_backend.generate-2"),
        (protocol.WRONG_TYPE, "endpoints[3]"),
        (NO_WORKER_ID, "dynamo_backend.generate"),
        (NO_DATA, "dynamo_backend.generate-4"),
        (NO_DATA, "dynamo_backend.generate-5"),
        (protocol.INCONSISTENT, "dynamo_backend.generate-6"),
    ]
    assert reading.ignored == 1
    assert {r.component for r in reading.readings} == {"backend"}


def test_an_endpoint_with_invalid_utf8_is_rejected_alone():
    good = entry("dynamo_backend.generate-1", kv(10))
    payload = reply(good, {"subject": "dynamo_backend.generate-2", "data": kv(20)})
    payload = payload.replace(b"generate-2", b"generate-2\xff")  # one bad byte inside a JSON string
    reading = read_stats_reply(payload, PLAN, 65536)
    assert [(r.worker_id, r.metrics.kv_stats.kv_active_blocks) for r in reading.readings] == [(1, 10)]
    assert [r.reason for r in reading.rejects] == [protocol.NOT_JSON]


@pytest.mark.parametrize("payload,reason", [
    (b"{not json", protocol.NOT_JSON),
    (b"[]", protocol.WRONG_TYPE),
    (b"{}", protocol.MISSING_FIELD),
    (b'{"endpoints": {}}', protocol.WRONG_TYPE),
    (b'{"endpoints": [], "name": 5}', protocol.WRONG_TYPE),
    (b" " * 5000, protocol.OVERSIZED),
])
def test_unusable_replies_are_rejected_whole(payload, reason):
    with pytest.raises(MessageRejected) as error:
        read_stats_reply(payload, PLAN, 4096 if reason == protocol.OVERSIZED else 1 << 20)
    assert error.value.reason == reason


def test_an_empty_reply_yields_nothing():
    assert read_stats_reply(reply(), PLAN, 4096).readings == []


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.one_of(st.integers(0, 100), st.none())),
                max_size=20, unique_by=lambda t: t[0]))
def test_bad_entries_never_shift_another_workers_data(workers):
    """Whatever mix of good and garbage entries, each good worker gets exactly its own numbers."""
    entries = []
    for worker_id, active in workers:
        subject = endpoint_subject("dynamo_backend", "generate", worker_id)
        entries.append(entry(subject, kv(active) if active is not None else {"kv_stats": [active]}))
    reading = read_stats_reply(reply(*entries), PLAN, 1 << 20)
    assert [(r.worker_id, r.metrics.kv_stats.kv_active_blocks) for r in reading.readings] == [
        (w, a) for w, a in workers if a is not None]
    assert len(reading.rejects) == sum(a is None for _, a in workers)
