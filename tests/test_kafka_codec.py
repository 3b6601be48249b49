"""The Kafka codec against kafka-python's hand-written protocol structs (kafka.protocol.old)
as the oracle, both ways: our bytes decode there to the same values, theirs decode here."""

from __future__ import annotations

import random

import pytest
from kafka.protocol.old import (api_versions, commit, fetch, find_coordinator, group, init_producer_id,
                                list_offsets, metadata, produce)
from kafka.protocol.old.api import RequestHeader as OracleHeader

from ingest.net.kafka import codec
from ingest.net.kafka.schema import CODEC_VERSIONS, SCHEMAS, ApiKey

ORACLE = {
    ApiKey.PRODUCE: (produce, "ProduceRequest", "ProduceResponse"),
    ApiKey.FETCH: (fetch, "FetchRequest", "FetchResponse"),
    ApiKey.LIST_OFFSETS: (list_offsets, "ListOffsetsRequest", "ListOffsetsResponse"),
    ApiKey.METADATA: (metadata, "MetadataRequest", "MetadataResponse"),
    ApiKey.OFFSET_COMMIT: (commit, "OffsetCommitRequest", "OffsetCommitResponse"),
    ApiKey.OFFSET_FETCH: (commit, "OffsetFetchRequest", "OffsetFetchResponse"),
    ApiKey.FIND_COORDINATOR: (find_coordinator, "FindCoordinatorRequest", "FindCoordinatorResponse"),
    ApiKey.API_VERSIONS: (api_versions, "ApiVersionsRequest", "ApiVersionsResponse"),
    ApiKey.INIT_PRODUCER_ID: (init_producer_id, "InitProducerIdRequest", "InitProducerIdResponse"),
    ApiKey.JOIN_GROUP: (group, "JoinGroupRequest", "JoinGroupResponse"),
    ApiKey.SYNC_GROUP: (group, "SyncGroupRequest", "SyncGroupResponse"),
    ApiKey.HEARTBEAT: (group, "HeartbeatRequest", "HeartbeatResponse"),
    ApiKey.LEAVE_GROUP: (group, "LeaveGroupRequest", "LeaveGroupResponse"),
}
CASES = [(key, v, side) for key, (low, high) in CODEC_VERSIONS.items()
         for v in range(low, high + 1) for side in (0, 1)]


def sample(rng: random.Random, kind):
    """A random value of a schema type (nulls included where the type allows them)."""
    if isinstance(kind, tuple):
        if kind[0] == "narray" and rng.random() < 0.2:
            return None
        n = rng.randrange(0, 3)
        return [sample(rng, kind[1]) if isinstance(kind[1], str) else sample_struct(rng, kind[1])
                for _ in range(n)]
    bits = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}.get(kind)
    if bits:
        return rng.randrange(-(1 << (bits - 1)), 1 << (bits - 1))
    if kind == "bool":
        return rng.random() < 0.5
    if kind.startswith("n") and rng.random() < 0.2:
        return None
    if kind in ("string", "nstring"):
        return rng.choice(["", "t", "telemetry-ü", "x" * 40])
    return rng.randbytes(rng.randrange(0, 50))


def sample_struct(rng, fields):
    return {name: sample(rng, kind) for name, kind in codec._fields(fields, VERSION[0])}


def as_tuple(fields, value):
    """Our dict -> the positional tuple kafka-python's Struct takes, in schema order."""
    out = []
    for name, kind in fields:
        v = value[name]
        if isinstance(kind, tuple) and not isinstance(kind[1], str) and v is not None:
            v = [as_tuple(codec._fields(kind[1], VERSION[0]), item) for item in v]
            if len(codec._fields(kind[1], VERSION[0])) == 1:  # the oracle's Array(String)
                v = [item[0] for item in v]
        if name.endswith("authorized_operations"):  # the oracle's BitField takes bit numbers
            v = {bit for bit in range(32) if v & (1 << bit)}
        out.append(v)
    return tuple(out)


VERSION = [0]


def oracle_class(key, version, side):
    module, request, response = ORACLE[key]
    return getattr(module, f"{(request, response)[side]}_v{version}")


@pytest.mark.parametrize("key,version,side", CASES)
def test_codec_matches_kafka_python_both_ways(key, version, side):
    fields = SCHEMAS[key][side]
    klass = oracle_class(key, version, side)
    rng = random.Random(f"{key}-{version}-{side}")
    VERSION[0] = version
    for _ in range(20):
        value = sample_struct(rng, fields)
        ours = codec.encode_body(fields, value, version)
        theirs = klass(*as_tuple(codec._fields(fields, version), value)).encode()
        assert ours == theirs
        assert codec.decode_body(fields, theirs, version) == value


def test_request_header_v1_matches_kafka_python():
    head = OracleHeader(api_key=3, api_version=5, correlation_id=77, client_id="cli").encode()
    frame = codec.encode_request(3, 5, 77, "cli", {"topics": None, "allow_auto_topic_creation": True})
    header, pos = codec.decode_header(frame[4:])
    assert frame[4:4 + len(head)] == head and pos == len(head)
    assert header == codec.RequestHeader(3, 5, 77, "cli")


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_truncated_request_is_refused_with_a_reason(cut):
    frame = codec.encode_request(0, 3, 1, "c", {"acks": 1, "timeout_ms": 1000,
                                                "topics": [{"name": "t", "partitions": [{"index": 0, "records": b"x" * 8}]}]})
    with pytest.raises(codec.KafkaProtocolError) as e:
        codec.decode_request(frame[4:-cut])
    assert e.value.reason == "truncated"


def test_unknown_api_key_and_version_are_refused():
    with pytest.raises(codec.KafkaProtocolError) as e:
        codec.decode_request(codec.encode_request(3, 0, 1, None, {})[4:].replace(b"\x00\x03", b"\x00\x63", 1))
    assert e.value.reason == "api_key"
    frame = bytearray(codec.encode_request(3, 0, 1, None, {})[4:])
    frame[2:4] = (99).to_bytes(2, "big")
    with pytest.raises(codec.KafkaProtocolError) as e:
        codec.decode_request(bytes(frame))
    assert e.value.reason == "version"


def test_frame_reader_splits_a_stream_and_refuses_bad_sizes():
    a, b = codec.frame(b"abc"), codec.frame(b"defgh")
    reader = codec.FrameReader()
    stream = a + b
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i:i + 1])
    assert got == [b"abc", b"defgh"] and reader.buffered_bytes == 0
    for size in (0, -1, codec.REQUEST_BYTES_MAX + 1):
        with pytest.raises(codec.KafkaProtocolError) as e:
            codec.FrameReader().feed(size.to_bytes(4, "big", signed=True))
        assert e.value.reason == "size"
