"""Dynamo 1.x wire types against bytes recorded from a real ai-dynamo-runtime 1.6.1 worker.

tests/dynamo_wire_1_6_1.json holds what the runtime put on NATS, on ZMQ and in its file
discovery backend; test_dynamo_wire.py checks the same live when the `dynamo` extra is
installed. Here: each recorded message decodes to the values that were published, and our
encoders give back the very bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

import fleet_protocol as protocol

RECORDED = json.loads((Path(__file__).parent.parent / "dynamo_wire_1_6_1.json").read_text())
LIMIT = 64 * 1024


def recorded_nats(index: int) -> tuple[str, bytes]:
    message = RECORDED["nats"][index]
    return message["subject"], bytes.fromhex(message["hex"])


def reencode(envelope: protocol.EventEnvelope, payload: bytes) -> bytes:
    return protocol.encode_envelope(protocol.EventEnvelope(
        envelope.publisher_id, envelope.sequence, envelope.published_at, envelope.topic, payload))


def test_recorded_kv_metrics_decodes_to_the_published_values_and_reencodes_to_the_same_bytes():
    subject, message = recorded_nats(0)
    envelope = protocol.decode_envelope(message, LIMIT)
    assert (envelope.publisher_id, envelope.sequence, envelope.topic) == (8474731318632737, 0, "kv_metrics")
    assert envelope.publisher_id < 2**53 and envelope.published_at == 1796130512119
    load = protocol.decode_active_load(envelope.payload, LIMIT)
    assert load == protocol.ActiveLoad(worker_id=8064585579384093175, dp_rank=1, active_decode_blocks=None,
                                       active_prefill_tokens=None, kv_used_blocks=9)
    assert protocol.parse_event_subject(subject) == protocol.EventSubject("dynamo", "backend", "generate", "kv_metrics")
    assert protocol.encode_active_load(load) == envelope.payload
    assert reencode(envelope, protocol.encode_active_load(load)) == message


def test_recorded_kv_events_stored_removed_cleared():
    stored = protocol.decode_kv_events(protocol.decode_envelope(recorded_nats(1)[1], LIMIT).payload, LIMIT)
    removed = protocol.decode_kv_events(protocol.decode_envelope(recorded_nats(2)[1], LIMIT).payload, LIMIT)
    cleared = protocol.decode_kv_events(protocol.decode_envelope(recorded_nats(3)[1], LIMIT).payload, LIMIT)
    (event,) = stored
    assert (event.worker_id, event.storage_tier, event.residency_domain) == (8064585579384093175, "device", "worker")
    assert (event.event.event_id, event.event.dp_rank, event.event.kind) == (1, 0, "stored")
    assert event.event.data.stored.parent_hash is None and event.event.data.stored.start_position is None
    assert [block.block_hash for block in event.event.data.stored.blocks] == [111, 222]
    assert [bytes(block.mm_extra_info) for block in event.event.data.stored.blocks] == [b"\xc0", b"\xc0"]
    assert (removed[0].event.event_id, removed[0].event.kind, removed[0].event.data.removed.block_hashes) == (
        2, "removed", [111])
    assert (cleared[0].event.event_id, cleared[0].event.kind, cleared[0].event.data) == (2, "cleared", "cleared")
    for index, batch in ((1, stored), (2, removed), (3, cleared)):
        message = recorded_nats(index)[1]
        envelope = protocol.decode_envelope(message, LIMIT)
        assert protocol.encode_kv_events(batch) == envelope.payload
        assert reencode(envelope, protocol.encode_kv_events(batch)) == message


def test_recorded_forward_pass_metrics():
    message = recorded_nats(4)[1]
    envelope = protocol.decode_envelope(message, LIMIT)
    metrics = protocol.decode_forward_pass_v1(envelope.payload, LIMIT)
    assert (metrics.version, metrics.worker_id, metrics.worker, metrics.dp_rank, metrics.counter_id) == (
        1, "12345", 12345, 0, 1)
    assert metrics.wall_time == 0.25
    assert metrics.scheduled_requests == protocol.ScheduledRequests(1, 100, 0.0, 50, 2, 300, 0.0)
    assert metrics.queued_requests == protocol.QueuedRequests(3, 400, 0.0, 4, 500, 0.0)
    assert reencode(envelope, protocol.encode_forward_pass_v1(metrics)) == message


def test_recorded_zmq_frames():
    frames = [bytes.fromhex(frame) for frame in RECORDED["zmq"][0]["frames"]]
    event = protocol.decode_zmq_frames(frames, LIMIT)
    assert (event.topic, event.publisher_id, event.sequence) == ("kv_metrics", 2769505147984861, 2)
    load = protocol.decode_active_load(event.envelope.payload, LIMIT)
    assert (load.worker_id, load.dp_rank, load.active_decode_blocks, load.kv_used_blocks) == (
        5853249505673812305, 0, 3, 1000)
    assert protocol.encode_zmq_frames(event.envelope) == frames


@pytest.mark.parametrize(("frames", "reason"), [
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8], "missing_field"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\1\0\0\0\0", b""], "inconsistent"),
    ([b"kv_metrics", b"\0" * 7, b"\0" * 8, b"\1\0\0\0\0"], "wrong_type"),
    ([b"\xff", b"\0" * 8, b"\0" * 8, b"\1\0\0\0\0"], "wrong_type"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\1\0\0"], "missing_field"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\2\0\0\0\0"], "out_of_range"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\1\0\0\0\5\xc0"], "inconsistent"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\1\0\0\0\1\xc1"], "not_msgpack"),
])
def test_broken_zmq_frames_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_zmq_frames(frames, LIMIT)
    assert rejected.value.reason == reason


def test_zmq_header_must_agree_with_the_envelope():
    frames = [bytes.fromhex(frame) for frame in RECORDED["zmq"][0]["frames"]]
    frames[2] = (3).to_bytes(8, "big")
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_zmq_frames(frames, LIMIT)
    assert rejected.value.reason == "inconsistent"


def test_unknown_envelope_keys_are_ignored():
    message = msgspec.msgpack.encode({"publisher_id": 1, "sequence": 2, "published_at": 3, "topic": "kv_metrics",
                                      "payload": b"\xc0", "published_at_ns": 3_000_000})
    assert protocol.decode_envelope(message, LIMIT) == protocol.EventEnvelope(1, 2, 3, "kv_metrics", b"\xc0")


def test_later_active_load_keys_are_tolerated():
    payload = msgspec.msgpack.encode({"worker_id": 7, "dp_rank": 0, "active_decode_blocks": None,
                                      "active_prefill_tokens": None, "kv_used_blocks": 4,
                                      "scheduler_load_scope": "worker"})
    assert protocol.decode_active_load(payload, LIMIT).kv_used_blocks == 4


@pytest.mark.parametrize(("change", "reason"), [
    ({"worker_id": "12a"}, "wrong_type"),  # not decimal
    ({"worker_id": "-1"}, "wrong_type"),
    ({"worker_id": ""}, "wrong_type"),
    ({"worker_id": str(2**64)}, "out_of_range"),
    ({"worker_id": 12345}, "wrong_type"),
    ({"version": 2}, "out_of_range"),
    ({"wall_time": float("nan")}, "out_of_range"),
    ({"wall_time": float("inf")}, "out_of_range"),
    ({"dp_rank": -1}, "out_of_range"),
])
def test_forward_pass_metrics_rejects(change, reason):
    good = msgspec.msgpack.decode(protocol.decode_envelope(recorded_nats(4)[1], LIMIT).payload)
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_forward_pass_v1(msgspec.msgpack.encode({**good, **change}), LIMIT)
    assert rejected.value.reason == reason


def test_forward_pass_worker_id_at_the_u64_ceiling_is_accepted():
    good = msgspec.msgpack.decode(protocol.decode_envelope(recorded_nats(4)[1], LIMIT).payload)
    metrics = protocol.decode_forward_pass_v1(msgspec.msgpack.encode({**good, "worker_id": str(2**64 - 1)}), LIMIT)
    assert metrics.worker == 2**64 - 1


@pytest.mark.parametrize("data", [{}, {"stored": {"blocks": []}, "removed": {"block_hashes": []}}])
def test_kv_event_data_must_be_exactly_one_kind(data):
    batch = [{"worker_id": 1, "storage_tier": "device", "residency_domain": "worker",
              "event": {"event_id": 1, "data": data, "dp_rank": 0}}]
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_kv_events(msgspec.msgpack.encode(batch), LIMIT)
    assert rejected.value.reason == "inconsistent"


def test_garbage_is_not_msgpack_and_oversize_is_oversized():
    for decode in (protocol.decode_envelope, protocol.decode_active_load, protocol.decode_kv_events,
                   protocol.decode_forward_pass_v1):
        with pytest.raises(protocol.MessageRejected) as rejected:
            decode(b"\xc1", LIMIT)
        assert rejected.value.reason == "not_msgpack"
        with pytest.raises(protocol.MessageRejected) as rejected:
            decode(b"\xc0" * 11, 10)
        assert rejected.value.reason == "oversized"


# Subjects ---------------------------------------------------------------------------


@pytest.mark.parametrize(("names", "subject"), sorted(RECORDED["subjects"].items()))
def test_subjects_encode_names_as_the_runtime_does(names, subject):
    namespace, component, endpoint = names.split("/", 2)
    assert protocol.endpoint_event_subject(namespace, component, endpoint, "kv_metrics") == subject
    assert protocol.parse_event_subject(subject) == protocol.EventSubject(namespace, component, endpoint, "kv_metrics")


@pytest.mark.parametrize("token", ["a.b", "a*", ">", "%c3%bc", "%41", "%2", "%G0", "%FF", "", "a b"])
def test_subject_tokens_that_the_runtime_cannot_have_written_are_rejected(token):
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_event_segment(token)
    assert rejected.value.reason == "wrong_type"


def test_names_longer_than_a_label_are_rejected():
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_event_segment("%25" * (protocol.MAX_LABEL_LENGTH + 1))
    assert rejected.value.reason == "out_of_range"
    assert protocol.decode_event_segment("%25" * protocol.MAX_LABEL_LENGTH) == "%" * protocol.MAX_LABEL_LENGTH


def test_component_scoped_subjects_and_the_subscription_pattern():
    assert protocol.component_event_subject("a b", "c", "kv-events") == "namespace.a%20b.component.c.kv-events"
    assert protocol.parse_event_subject("namespace.a%20b.component.c.kv-events") == protocol.EventSubject(
        "a b", "c", None, "kv-events")
    assert protocol.event_subject_pattern("dynamo", "kv_metrics") == "namespace.dynamo.component.*.endpoint.*.kv_metrics"
    for subject in ("namespace.dynamo.kv_metrics", "namespace.dynamo.component.c.x.e.kv_metrics", "a.b.c.d.e"):
        with pytest.raises(protocol.MessageRejected):
            protocol.parse_event_subject(subject)


# Discovery --------------------------------------------------------------------------


def file_entries(recorded: dict) -> list[tuple[str, protocol.DiscoveryKey, protocol.DiscoveryEntry]]:
    found = []
    for path, value in recorded.items():
        _, bucket, name = path.split("/")
        key = protocol.key_of_file(bucket, name)
        parsed, entry = protocol.decode_keyed_entry(key, value.encode(), LIMIT)
        found.append((key, parsed, entry))
    return found


def test_recorded_file_backend_entries_decode_to_the_registered_values():
    entries = {parsed.bucket + ":" + (parsed.topic or ""): (key, parsed, entry)
               for key, parsed, entry in file_entries(RECORDED["file_backend"])}
    worker_id = 6314910994418258211
    key, parsed, instance = entries["instances:"]
    assert key == f"v1/instances/dynamo/backend/generate/{worker_id:x}"
    assert parsed == protocol.DiscoveryKey("instances", worker_id, "dynamo", "backend", "generate")
    assert (instance.namespace, instance.component, instance.endpoint, instance.instance_id) == (
        "dynamo", "backend", "generate", worker_id)
    assert json.loads(bytes(instance.transport)) == {"nats_tcp": f"dynamo_backend.generate-{worker_id:x}"}
    _, parsed, model = entries["mdc:"]
    assert parsed.lora is None and model.instance_id == worker_id
    assert model.card_json.runtime_config == protocol.RuntimeConfig(
        total_kv_blocks=4096, max_num_seqs=256, max_num_batched_tokens=8192, data_parallel_start_rank=2,
        data_parallel_size=2, enable_local_indexer=True)
    assert (model.card_json.display_name, model.card_json.worker_type, model.card_json.kv_cache_block_size) == (
        "model", "aggregated", 0)
    _, parsed, channel = entries["event_channels:kv_metrics"]
    assert (parsed.instance_id, parsed.topic, channel.topic, channel.instance_id) == (
        8178518412318943, "kv_metrics", "kv_metrics", 8178518412318943)
    assert channel.transport == protocol.NatsTransport(protocol.NatsConfig(
        "namespace.dynamo.component.backend.endpoint.generate"))
    assert channel.scope == protocol.EventScope("endpoint", protocol.EndpointScope("dynamo", "backend", "generate"))
    _, parsed, source = entries["event_sources:kv-events"]
    assert (source.publisher_id, source.metadata.worker) == (4112600864908154, protocol.SourceWorker(worker_id, 0))


def test_recorded_zmq_channel_and_tcp_instance():
    ((_, _, channel),) = file_entries(RECORDED["zmq_event_channel"])
    assert channel.transport == protocol.ZmqTransport(protocol.ZmqConfig("tcp://127.0.0.1:46383"))
    ((_, _, instance),) = file_entries(RECORDED["file_backend_tcp_instance"])
    assert json.loads(bytes(instance.transport)) == {"tcp": "127.0.0.1:41863/875fed1387d4ecbf/dynamo/backend/generate"}


def test_file_names_are_the_keys_percent_encoded():
    for path in (*RECORDED["file_backend"], *RECORDED["etcd_keys_odd_names"]["file_names"]):
        _, bucket, name = path.split("/")
        key = protocol.key_of_file(bucket, name)
        assert protocol.file_name(key.split("/", 2)[2]) == name
    assert protocol.key_of_file("mdc", "a%20b%2Fx%2FC%C3%B6%2Amp%2Fe%3Ef%25%2F4c01f84c30fd6bc2") == (
        "v1/mdc/a b/x/Cö*mp/e>f%/4c01f84c30fd6bc2")
    for name in ("a-b", "a%2d", "a%4", "%FF", "a%41"):
        with pytest.raises(protocol.MessageRejected):
            protocol.key_of_file("mdc", name)


def test_keys_with_odd_names():
    channel, instance, card = RECORDED["etcd_keys_odd_names"]["keys"]
    parsed = protocol.parse_discovery_key(channel)
    assert (parsed.namespace, parsed.component, parsed.endpoint, parsed.topic) == ("a b/x", "Cö*mp", "e>f%", "kv-events")
    assert protocol.event_channel_key("a b/x", "Cö*mp", "e>f%", "kv-events", parsed.instance_id) == channel
    # instance and card keys hold the names raw: a `/` in a name leaves only the id certain
    assert protocol.parse_discovery_key(instance) == protocol.DiscoveryKey("instances", 0x559FA231BE773F06)
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.parse_discovery_key(card)
    assert rejected.value.reason == "inconsistent"
    assert protocol.parse_discovery_key("v1/mdc/ns/c/e/ff/my-lora") == protocol.DiscoveryKey(
        "mdc", 255, "ns", "c", "e", lora="my-lora")
    assert protocol.instance_key("ns", "c", "e", 255) == "v1/instances/ns/c/e/ff"
    assert protocol.model_card_key("ns", "c", "e", 255, "l") == "v1/mdc/ns/c/e/ff/l"
    for key in ("v1/instances/ns/c/e", "v1/other/ns/c/e/ff", "v2/instances/ns/c/e/ff", "v1/instances/ns/c/e/xyz",
                "v1/instances/ns/c/e/" + "f" * 17):
        with pytest.raises(protocol.MessageRejected):
            protocol.parse_discovery_key(key)


def test_a_zmq_broker_entry_as_dynamos_broker_registers_it():
    """Component-scoped (`zmq_broker`, topic `broker`), transport ZmqBroker: the shape a real 1.6.1 worker
    with DYN_ZMQ_BROKER_ENABLED accepts (tests/integration/test_dynamo_v1_zmq.py), bounded."""
    key, entry = protocol.zmq_broker_entry("dynamo", 0xB0, ["tcp://10.0.0.1:5555"], ["tcp://10.0.0.1:5556"])
    assert key == "v1/event_channels/namespace/dynamo/component/zmq_broker/topic/broker/b0"
    value = protocol.encode_discovery_entry(entry)
    assert json.loads(value) == {
        "type": "EventChannel", "scope": {"kind": "component", "namespace": "dynamo", "component": "zmq_broker"},
        "topic": "broker", "instance_id": 0xB0,
        "transport": {"kind": "ZmqBroker", "config": {"xsub_endpoints": ["tcp://10.0.0.1:5555"],
                                                      "xpub_endpoints": ["tcp://10.0.0.1:5556"]}}}
    assert protocol.decode_keyed_entry(key, value, LIMIT) == (
        protocol.DiscoveryKey("event_channels", 0xB0, "dynamo", "zmq_broker", None, "broker"), entry)
    for xpub in ([], ["tcp://10.0.0.1:1"] * (protocol.discovery.MAX_BROKER_ENDPOINTS + 1), ["x" * 1025]):
        _, bad = protocol.zmq_broker_entry("dynamo", 0xB0, [], xpub)
        with pytest.raises(protocol.MessageRejected) as rejected:
            protocol.decode_keyed_entry(key, protocol.encode_discovery_entry(bad), LIMIT)
        assert rejected.value.reason in ("out_of_range", "wrong_type"), xpub


def test_entry_and_key_must_name_the_same_id():
    value = next(v for p, v in RECORDED["file_backend"].items() if p.startswith("v1/instances/"))
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_keyed_entry("v1/instances/dynamo/backend/generate/1", value.encode(), LIMIT)
    assert rejected.value.reason == "inconsistent"
    with pytest.raises(protocol.MessageRejected) as rejected:  # a model card in the instances bucket
        card = next(v for p, v in RECORDED["file_backend"].items() if p.startswith("v1/mdc/"))
        protocol.decode_discovery_entry(card.encode(), LIMIT, "instances")
    assert rejected.value.reason == "wrong_type"


def test_discovery_entries_reencode_to_equal_values():
    for _, _, entry in file_entries(RECORDED["file_backend"]):
        assert protocol.decode_discovery_entry(protocol.encode_discovery_entry(entry), LIMIT) == entry


# $SRV.STATS of 1.x ------------------------------------------------------------------


def test_recorded_stats_reply_has_no_data_but_counters():
    reply = protocol.decode_stats_reply(RECORDED["stats_reply"].encode(), LIMIT)
    (raw,) = reply.endpoints
    entry = protocol.decode_stats_endpoint(raw)
    assert not protocol.has_stats_data(entry)
    counters = protocol.decode_endpoint_stats_v1(raw)
    worker_id = 0x57A3121772825123
    assert counters == protocol.EndpointStatsV1(
        name=protocol.instance_endpoint_name("dynamo_backend", "generate", worker_id),
        subject=protocol.endpoint_subject("dynamo_backend", "generate", worker_id),
        num_requests=0, num_errors=0, processing_time=0, average_processing_time=0, last_error="", queue_group="q")
    assert protocol.parse_instance_endpoint_name(counters.name, "dynamo_backend") == ("generate", worker_id)
    mine = protocol.StatsReplyV1(reply.name, reply.id, reply.version, reply.started, [counters])
    assert protocol.encode_stats_reply_v1(mine) == RECORDED["stats_reply"].encode()


def test_stats_counters_rejects():
    good = json.loads(RECORDED["stats_reply"])["endpoints"][0]
    for change, reason in (({"num_requests": -1}, "out_of_range"), ({"processing_time": 2**64}, "out_of_range"),
                           ({"num_errors": "1"}, "wrong_type")):
        with pytest.raises(protocol.MessageRejected) as rejected:
            protocol.decode_endpoint_stats_v1(msgspec.Raw(json.dumps({**good, **change}).encode()))
        assert rejected.value.reason == reason
    missing = {key: value for key, value in good.items() if key != "num_requests"}
    with pytest.raises(protocol.MessageRejected) as rejected:
        protocol.decode_endpoint_stats_v1(msgspec.Raw(json.dumps(missing).encode()))
    assert rejected.value.reason == "missing_field"
    for name in ("dynamo_backend-generate", "other-generate-ff", "dynamo_backend--ff", "dynamo_backend-generate-xyz"):
        assert protocol.parse_instance_endpoint_name(name, "dynamo_backend") is None
