"""Specification of the RecordBatch v2 codec (ingest.shards.batch) and the encode/decode kernels.

kafka-python's DefaultRecordBatch / DefaultRecordBatchBuilder are the independent oracle:
whatever we write they read field for field, and whatever they write we read.
"""

import struct

import crc32c as crc32c_reference
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from ingest.shards import kernels
from ingest.shards.batch import (
    BatchHeader,
    Columns,
    CorruptBatchError,
    Record,
    UnsupportedCompressionError,
    decode_batch,
    decode_columns,
    encode_batch,
    encode_batch_py,
    encode_columns,
    encode_headers,
    iter_batches,
    parse_header,
    patch_base_offset,
)
from ingest.shards.layout import ATTRIBUTES_OFFSET, CRC_OFFSET, RECORD_BATCH_OVERHEAD

INT64_MAX = 2**63 - 1
NOW_MS = 1_700_000_000_000

keys = st.one_of(st.none(), st.binary(max_size=24))
values = st.one_of(st.none(), st.binary(max_size=300))
headers = st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=16))),
                   max_size=3).map(tuple)


def records_with(timestamps):
    return st.lists(st.builds(Record, offset=st.just(0), timestamp_ms=timestamps, key=keys,
                              value=values, headers=headers), min_size=1, max_size=40)


any_records = records_with(st.one_of(st.integers(-1, INT64_MAX), st.integers(NOW_MS, NOW_MS + 10**6)))
# kafka-python adds timestamp deltas in Python ints, without Java's int64 wrap-around, so
# its oracle only holds while max - min fits in an int64.
kafka_python_records = records_with(st.integers(-1, INT64_MAX - 1))


def reseal(batch: bytes) -> bytes:
    crc = crc32c_reference.crc32c(batch[ATTRIBUTES_OFFSET:])
    return batch[:CRC_OFFSET] + struct.pack(">I", crc) + batch[ATTRIBUTES_OFFSET:]


def with_attributes(batch: bytes, attributes: int) -> bytes:
    edited = batch[:ATTRIBUTES_OFFSET] + struct.pack(">h", attributes) + batch[ATTRIBUTES_OFFSET + 2:]
    return reseal(edited)


def kafka_python_build(records, codec=0, producer=(-1, -1, -1)):
    builder = DefaultRecordBatchBuilder(2, codec, False, *producer, 1 << 30)
    for i, record in enumerate(records):
        builder.append(i, record.timestamp_ms, record.key, record.value, list(record.headers))
    return bytes(builder.build())


def expected_records(records, base_offset=0):
    return [Record(base_offset + i, r.timestamp_ms, r.key, r.value, tuple(r.headers))
            for i, r in enumerate(records)]


def telemetry(count, value_bytes=100, first_ms=NOW_MS):
    return [Record(0, first_ms + i, b"device-%d" % (i % 7) if i % 3 else None,
                   bytes([i % 251]) * value_bytes, (("unit", b"C"),) if i % 5 == 0 else ())
            for i in range(count)]


# --- encoding: cross-checked with kafka-python ------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=kafka_python_records, base_offset=st.integers(0, 2**40),
       producer_id=st.integers(-1, INT64_MAX), producer_epoch=st.integers(-1, 2**15 - 1),
       base_sequence=st.integers(-1, 2**31 - 1), leader_epoch=st.integers(-1, 2**31 - 1))
def test_our_batches_decode_with_kafka_python_field_for_field(records, base_offset, producer_id,
                                                              producer_epoch, base_sequence,
                                                              leader_epoch):
    encoded = encode_batch(records, base_offset, producer_id, producer_epoch, base_sequence, leader_epoch)
    theirs = DefaultRecordBatch(encoded)
    assert theirs.validate_crc()
    assert (theirs.base_offset, theirs.leader_epoch, theirs.magic) == (base_offset, leader_epoch, 2)
    assert (theirs.producer_id, theirs.producer_epoch, theirs.base_sequence) == (
        producer_id, producer_epoch, base_sequence)
    assert theirs.records_count == len(records) and theirs.last_offset_delta == len(records) - 1
    assert theirs.max_timestamp == max(r.timestamp_ms for r in records)
    decoded = [Record(r.offset, r.timestamp, r.key, r.value, tuple(r.headers)) for r in theirs]
    assert decoded == expected_records(records, base_offset)


def test_bytes_equal_kafka_python_builder_when_timestamps_do_not_decrease():
    records = telemetry(300)
    # kafka-python writes leader epoch 0 where a producer would leave -1; match it.
    ours = encode_batch(records, partition_leader_epoch=0, producer_id=7, producer_epoch=1, base_sequence=42)
    assert ours == kafka_python_build(records, producer=(7, 1, 42))


def test_out_of_order_timestamps_take_the_first_as_base_like_kafka_and_keep_their_values():
    records = [Record(0, t, None, b"x") for t in (5_000, 1_000, 9_000, 0, 2_000)]
    ours = encode_batch(records, partition_leader_epoch=0)
    header, decoded = decode_batch(ours)
    assert (header.base_timestamp_ms, header.max_timestamp_ms) == (5_000, 9_000)
    assert [r.timestamp_ms for r in decoded] == [5_000, 1_000, 9_000, 0, 2_000]
    assert ours == kafka_python_build(records, producer=(-1, -1, -1))


def test_batches_built_by_kafka_python_decode_with_ours_and_pass_validation():
    records = telemetry(50) + [Record(0, NOW_MS, None, None, (("k", None),))]
    batch = kafka_python_build(records, producer=(3, 0, 10))
    buf = np.frombuffer(batch, dtype=np.uint8)
    assert kernels.validate_batch(buf, 0, buf.size, 1 << 20) == kernels.OK
    header, decoded = decode_batch(batch)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (3, 0, 10)
    assert decoded == expected_records(records)


@settings(max_examples=100, deadline=None)
@given(records=kafka_python_records)
def test_kafka_python_batches_round_trip_through_our_decoder(records):
    assert decode_batch(kafka_python_build(records))[1] == expected_records(records)


# --- encoding: our two encoders and round trips -----------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=any_records, base_offset=st.integers(0, INT64_MAX - 100))
def test_kernel_and_python_encoders_write_identical_bytes_that_round_trip(records, base_offset):
    encoded = encode_batch(records, base_offset)
    assert encoded == encode_batch_py(records, base_offset)
    header, decoded = decode_batch(encoded)
    assert decoded == expected_records(records, base_offset)
    assert header.size_bytes == len(encoded) and header.last_offset == base_offset + len(records) - 1


def test_timestamps_at_the_bounds_kafka_allows_round_trip():
    extremes = [-1, 0, INT64_MAX, 1, INT64_MAX - 1, -1]
    records = [Record(0, t, None, b"v") for t in extremes]
    encoded = encode_batch(records)
    assert encoded == encode_batch_py(records)
    assert [r.timestamp_ms for r in decode_batch(encoded)[1]] == extremes


def test_many_records_and_empty_or_null_fields_round_trip():
    records = [Record(0, NOW_MS + i, None if i % 2 else b"", b"" if i % 3 else None) for i in range(20_000)]
    encoded = encode_batch(records)
    assert encoded == encode_batch_py(records)
    assert decode_batch(encoded)[1] == expected_records(records)


def test_encode_columns_equals_encode_batch_for_the_same_records():
    records = telemetry(100)
    values_buf = b"".join(r.value for r in records)
    value_lengths = [len(r.value) for r in records]
    key_lengths = [-1 if r.key is None else len(r.key) for r in records]
    raw_headers = [encode_headers(r.headers) if r.headers else b"" for r in records]
    columnar = encode_columns(
        values_buf, np.cumsum([0] + value_lengths[:-1]), value_lengths,
        b"".join(r.key for r in records if r.key is not None),
        np.cumsum([0] + [max(n, 0) for n in key_lengths[:-1]]), key_lengths,
        [r.timestamp_ms for r in records], base_offset=9, producer_id=5, producer_epoch=2,
        base_sequence=77, partition_leader_epoch=3, headers_buf=b"".join(raw_headers),
        header_offsets=np.cumsum([0] + [len(h) for h in raw_headers[:-1]]),
        header_lengths=[len(h) for h in raw_headers])
    assert columnar == encode_batch(records, 9, 5, 2, 77, 3)


def test_encode_columns_without_keys_writes_null_keys():
    encoded = encode_columns(b"abcdef", [0, 2, 4], [2, 2, 2], timestamps_ms=[1, 2, 3])
    assert [(r.key, r.value) for r in decode_batch(encoded)[1]] == [(None, b"ab"), (None, b"cd"), (None, b"ef")]


@pytest.mark.parametrize("bad_call, message", [
    (lambda: encode_batch([]), "at least one record"),
    (lambda: encode_batch([Record(0, -2, None, b"x")]), "timestamps must be >= 0"),
    (lambda: encode_batch_py([Record(0, -2, None, b"x")]), "timestamps must be >= 0"),
    (lambda: encode_batch([Record(0, 1, None, b"x")], base_offset=-1), "base offset"),
    (lambda: encode_batch([Record(0, 1, None, b"x")] * 2, base_offset=INT64_MAX), "base offset"),
    (lambda: encode_batch([Record(0, 1, None, b"x")], producer_epoch=2**15), "producer_epoch"),
    (lambda: encode_batch([Record(0, 1, None, b"x")], producer_id=-2), "producer_id"),
    (lambda: encode_batch([Record(0, 1, None, b"x")], base_sequence=2**31), "base_sequence"),
    (lambda: encode_batch([Record(0, 1, None, b"x")], partition_leader_epoch=-5), "partition_leader_epoch"),
    (lambda: encode_columns(b"abc", [0], [4], timestamps_ms=[1]), "outside its buffer"),
    (lambda: encode_columns(b"abc", [-1], [1], timestamps_ms=[1]), "outside its buffer"),
    (lambda: encode_columns(b"abc", [0], [-2], timestamps_ms=[1]), "outside its buffer"),
    (lambda: encode_columns(b"abc", [0, 1], [1, 1], timestamps_ms=[1]), "differ in length"),
    (lambda: encode_columns(b"abc", [0], [1], timestamps_ms=[1], headers_buf=b"\x02\x00",
                            header_offsets=[0], header_lengths=[2]), "do not parse"),
])
def test_invalid_input_raises_a_value_error_that_says_what_is_wrong(bad_call, message):
    with pytest.raises(ValueError, match=message):
        bad_call()


def test_the_kernel_writes_only_inside_its_batch_and_reports_a_small_buffer():
    values = np.frombuffer(b"x" * 1000, dtype=np.uint8)
    offsets, lengths = np.zeros(10, np.int64), np.full(10, 100, np.int64)
    null_keys, timestamps, empty = np.full(10, -1, np.int64), np.arange(10, dtype=np.int64), np.zeros(0, np.int64)
    args = (values, offsets, lengths, values, offsets, null_keys, timestamps, values, empty, empty,
            0, -1, -1, -1, -1)
    bound = kernels.encoded_size_upper_bound(lengths, null_keys, empty)
    out = np.full(bound + 64, 0xEE, dtype=np.uint8)
    end = kernels.encode_records(*args, out, 32)
    assert 32 < end <= 32 + bound
    assert (out[:32] == 0xEE).all() and (out[end:] == 0xEE).all()
    assert out[32:end].tobytes() == encode_batch([Record(0, t, None, b"x" * 100) for t in range(10)])
    small = np.zeros(end - 32 - 1, dtype=np.uint8)
    assert kernels.encode_records(*args, small, 0) == kernels.ENC_ERR_OUT_TOO_SMALL


# --- decoding ---------------------------------------------------------------------------


def test_parse_header_reads_every_field_and_patch_base_offset_keeps_the_batch_valid():
    batch = encode_batch(telemetry(5), 0, 11, 3, 100, 4)
    header = parse_header(batch)
    assert header == BatchHeader(0, len(batch) - 12, 4, 2, header.crc, 0, 4, NOW_MS, NOW_MS + 4, 11, 3, 100, 5)
    patched = patch_base_offset(1_000_000) + batch[8:]
    header, records = decode_batch(patched)
    assert header.last_offset == 1_000_004 and [r.offset for r in records] == list(range(1_000_000, 1_000_005))
    with pytest.raises(CorruptBatchError):
        parse_header(batch[:RECORD_BATCH_OVERHEAD - 1])


def test_decode_batch_rejects_a_corrupt_batch():
    batch = bytearray(encode_batch(telemetry(3)))
    batch[-1] ^= 0x10
    with pytest.raises(CorruptBatchError, match="crc"):
        decode_batch(bytes(batch))


def test_gzip_batches_from_kafka_python_decode():
    records = telemetry(200)
    gzipped = kafka_python_build(records, codec=1)
    assert parse_header(gzipped).compression_codec == 1
    assert decode_batch(gzipped)[1] == expected_records(records)


def test_a_gzip_batch_inflating_past_the_bound_is_rejected():
    gzipped = kafka_python_build(telemetry(200), codec=1)
    with pytest.raises(CorruptBatchError, match="beyond"):
        decode_batch(gzipped, decompressed_bytes_max=1000)


def test_gzip_records_that_disagree_with_the_header_are_rejected():
    gzipped = kafka_python_build(telemetry(20), codec=1)
    wrong_count = reseal(gzipped[:RECORD_BATCH_OVERHEAD - 4] + struct.pack(">i", 19) + gzipped[RECORD_BATCH_OVERHEAD:])
    with pytest.raises(CorruptBatchError):
        decode_batch(wrong_count)


@pytest.mark.parametrize("codec", [2, 3])
def test_codecs_without_a_decompressor_raise_unsupported_compression(codec):
    batch = with_attributes(encode_batch(telemetry(3)), codec)
    with pytest.raises(UnsupportedCompressionError):
        decode_batch(batch)


def test_log_append_time_batches_give_every_record_the_max_timestamp():
    batch = with_attributes(encode_batch(telemetry(4)), 0x08)
    header, records = decode_batch(batch)
    assert header.is_log_append_time
    assert [r.timestamp_ms for r in records] == [NOW_MS + 3] * 4
    assert decode_columns(batch).timestamps_ms.tolist() == [NOW_MS + 3] * 4


def test_iter_batches_yields_each_batch_and_ends_at_a_partial_tail():
    batches = [encode_batch(telemetry(n), base_offset=10 * n) for n in (1, 2, 3)]
    buf = b"".join(batches) + batches[0][:40]
    found = [(pos, header.base_offset, header.records_count) for pos, header in iter_batches(buf)]
    assert found == [(0, 10, 1), (len(batches[0]), 20, 2), (len(batches[0]) + len(batches[1]), 30, 3)]
    with pytest.raises(CorruptBatchError):
        list(iter_batches(batches[0] + b"\xff" * 100))


def test_decode_columns_reads_every_complete_batch_and_ignores_a_partial_tail():
    batches = [encode_batch(telemetry(n, first_ms=NOW_MS + n), base_offset=100 * n) for n in (3, 1, 4)]
    complete = b"".join(batches)
    for tail in (b"", batches[2][:10], batches[2][:-1]):
        columns = decode_columns(complete + tail)
        assert isinstance(columns, Columns) and columns.bytes_consumed == len(complete)
        expected = [r for b in batches for r in decode_batch(b)[1]]
        assert columns.offsets.tolist() == [r.offset for r in expected]
        assert columns.timestamps_ms.tolist() == [r.timestamp_ms for r in expected]
        assert [columns.key(i) for i in range(len(columns))] == [r.key for r in expected]
        assert [columns.value(i) for i in range(len(columns))] == [r.value for r in expected]
        assert [columns.headers(i) for i in range(len(columns))] == [r.headers for r in expected]


def test_decode_columns_of_only_a_partial_batch_is_empty():
    columns = decode_columns(encode_batch(telemetry(2))[:-3])
    assert len(columns) == 0 and columns.bytes_consumed == 0


def test_decoded_columns_re_encode_to_the_same_bytes():
    original = encode_batch(telemetry(64), base_offset=5, producer_id=1, producer_epoch=0, base_sequence=9)
    c = decode_columns(original)
    again = encode_columns(c.buffer, c.value_offsets, c.value_lengths, c.buffer, c.key_offsets,
                           c.key_lengths, c.timestamps_ms, 5, 1, 0, 9, -1, c.buffer,
                           c.header_offsets, c.header_lengths)
    assert again == original


def test_decode_columns_stops_at_a_corrupt_or_compressed_batch_with_a_named_error():
    good = encode_batch(telemetry(2))
    corrupt = bytearray(good)
    corrupt[70] ^= 1
    with pytest.raises(CorruptBatchError, match=f"byte {len(good)}"):
        decode_columns(good + bytes(corrupt))
    with pytest.raises(UnsupportedCompressionError, match="codec 1"):
        decode_columns(good + kafka_python_build(telemetry(100), codec=1))
