"""The intake kernel: RECORD frames in, Kafka batches out, bad frames refused, never a crash."""

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_murmur2

from ingest.net import wire
from ingest.shards import batch as batch_codec
from ingest.shards import intake
from ingest.shards.intake import (C_PARTITION, C_STATUS, COLUMNS, HEADER_EXPANSION, ROW_BAD_PARTITION,
                                  ROW_BATCH_FRAME, ROW_MALFORMED, ROW_TOO_LARGE, ROW_UNKNOWN_TOPIC,
                                  ROW_UNSUPPORTED_VERSION, TopicTable, encode_rows, parse_record_frames)

TOPICS = {"telemetry": {"partitions": 6}, "alerts": {"partitions": 1}}


def parse(frames, max_record_bytes=1 << 20, now_ms=1_700_000_000_000, topics=TOPICS):
    table = TopicTable(topics)
    joined = b"".join(frames)
    buf = np.frombuffer(joined, dtype=np.uint8)
    rows = np.full((len(frames), COLUMNS), -99, dtype=np.int64)
    hdr_out = np.empty(HEADER_EXPANSION * len(joined) + 5 * len(frames), dtype=np.uint8)
    ends = np.cumsum([len(f) for f in frames]).astype(np.int64)
    parse_record_frames(buf, ends, table.blob, table.name_starts, table.name_ends, table.partitions,
                        max_record_bytes, now_ms, rows, hdr_out)
    return buf, rows, hdr_out


record_strategy = st.builds(
    dict,
    value=st.one_of(st.none(), st.binary(max_size=300)),
    key=st.one_of(st.none(), st.binary(max_size=40)),
    timestamp_ms=st.one_of(st.none(), st.integers(0, 2**62)),
    headers=st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=20))), max_size=4),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(record_strategy, min_size=1, max_size=30))
def test_parsed_frames_encode_to_the_same_records(records):
    frames = [wire.RecordMessage(topic="telemetry", value=r["value"], key=r["key"], timestamp_ms=r["timestamp_ms"],
                                 headers=tuple(r["headers"])).encode() for r in records]
    buf, rows, hdr_out = parse(frames, now_ms=123)
    assert (rows[:, C_STATUS] == 0).all()
    rows[:, C_PARTITION] = 0
    header, decoded = batch_codec.decode_batch(encode_rows(buf, rows, hdr_out))
    assert header.records_count == len(records)
    for r, d in zip(records, decoded):
        assert d.value == r["value"] and d.key == r["key"]
        assert d.timestamp_ms == (123 if r["timestamp_ms"] is None else r["timestamp_ms"])
        assert list(d.headers) == [(n, v) for n, v in r["headers"]]


def test_keys_land_on_kafkas_murmur2_partitions():
    rng = random.Random(7)
    keys = [rng.randbytes(rng.randrange(0, 30)) for _ in range(500)]
    frames = [wire.RecordMessage(topic="telemetry", value=b"v", key=k).encode() for k in keys]
    _, rows, _ = parse(frames)
    expected = [(kafka_murmur2(k) & 0x7FFFFFFF) % 6 for k in keys]
    assert rows[:, C_PARTITION].tolist() == expected


def test_null_keys_are_left_for_the_sticky_partitioner_and_explicit_partitions_kept():
    frames = [wire.RecordMessage(topic="telemetry", value=b"a").encode(),
              wire.RecordMessage(topic="telemetry", value=b"b", key=b"k", partition=4).encode()]
    _, rows, _ = parse(frames)
    assert rows[:, C_PARTITION].tolist() == [-1, 4]


def test_invalid_frames_get_a_reason_each():
    good = wire.RecordMessage(topic="telemetry", value=b"v").encode()
    batch = batch_codec.encode_batch([batch_codec.Record(0, 1, None, b"x")])
    frames = [
        good[:10],                                                            # truncated header
        bytes([2]) + good[1:],                                                # unknown version
        wire.RecordMessage(topic="nope", value=b"v").encode(),                # unknown topic
        wire.RecordMessage(topic="telemetry", value=b"v" * 101).encode(),     # too large
        wire.RecordMessage(topic="alerts", value=b"v", partition=1).encode(),  # no partition 1
        wire.BatchMessage(topic="telemetry", partition=0, batch=batch).encode(),
        good,
    ]
    _, rows, _ = parse(frames, max_record_bytes=100)
    assert rows[:, C_STATUS].tolist() == [ROW_MALFORMED, ROW_UNSUPPORTED_VERSION, ROW_UNKNOWN_TOPIC,
                                          ROW_TOO_LARGE, ROW_BAD_PARTITION, ROW_BATCH_FRAME, 0]


def test_truncated_and_mutated_frames_never_crash_the_kernel():
    rng = random.Random(3)
    base = wire.RecordMessage(topic="telemetry", value=b"payload", key=b"key",
                              headers=(("a", b"1"), ("b", None))).encode()
    frames = [base[:i] for i in range(len(base))]
    for _ in range(3000):
        f = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        frames.append(bytes(f))
    buf, rows, hdr_out = parse(frames)
    ok = rows[:, C_STATUS] >= 0
    # The value is the rest of the frame, so only a cut before the value must be refused.
    value_starts_at = len(base) - len(b"payload")
    assert not ok[:value_starts_at].any(), "a frame cut before its value was accepted"
    assert ok[value_starts_at:len(base)].all()
    sel = rows[ok]
    sel[:, C_PARTITION] = 0
    if len(sel):  # whatever was accepted must encode to a valid batch
        batch_codec.decode_batch(encode_rows(buf, sel, hdr_out))


def test_warm_up_runs_every_kernel_of_the_hot_path():
    intake.warm_up()


def test_header_names_must_be_utf8():
    good = wire.RecordMessage(topic="telemetry", value=b"v", headers=(("é€😀", b"1"),)).encode()
    bad = bytearray(good)
    bad[bad.index("é".encode())] = 0xC0  # an overlong lead byte: never valid UTF-8
    _, rows, _ = parse([good, bytes(bad)])
    assert rows[:, C_STATUS].tolist() == [0, ROW_MALFORMED]
