"""Specification of the numba kernels: CRC32C, batch validation and scanning, murmur2.

Oracles are independent implementations: the `crc32c` package and kafka-python's record
builder and partitioner.
"""

import struct

import crc32c as crc32c_reference
import llvmlite.binding as llvm_binding
import numpy as np
import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2
from kafka.record.default_records import DefaultRecordBatchBuilder

from ingest.shards import kernels
from ingest.shards.layout import (
    ATTRIBUTES_OFFSET,
    CRC_OFFSET,
    LAST_OFFSET_DELTA_OFFSET,
    LENGTH_OFFSET,
    MAGIC_OFFSET,
    PARTITION_LEADER_EPOCH_OFFSET,
    RECORD_BATCH_OVERHEAD,
    RECORDS_COUNT_OFFSET,
    RECORDS_OFFSET,
)

MAX_BATCH_BYTES = 1 << 20
CRC_PATHS = [kernels.crc32c_sw] + ([kernels.crc32c_hw] if kernels.HAS_SSE42 else [])


def as_array(data) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype=np.uint8)


def kafka_python_batch(count=5, first_timestamp_ms=1_700_000_000_000, codec=0, value_bytes=20):
    """A batch built by kafka-python's DefaultRecordBatchBuilder (the reference encoder)."""
    builder = DefaultRecordBatchBuilder(2, codec, False, -1, -1, -1, MAX_BATCH_BYTES)
    for i in range(count):
        key = None if i % 3 == 0 else b"key-%d" % i
        headers = [("trace", b"t%d" % i), ("empty", None)] if i % 2 else []
        builder.append(i, first_timestamp_ms + 7 * i, key, b"v" * value_bytes, headers)
    return bytes(builder.build())


def reseal(batch: bytes) -> bytes:
    """Recompute the CRC after a deliberate edit, so a check other than CRC must catch it."""
    crc = crc32c_reference.crc32c(batch[ATTRIBUTES_OFFSET:])
    return batch[:CRC_OFFSET] + struct.pack(">I", crc) + batch[ATTRIBUTES_OFFSET:]


def validate(batch: bytes, max_batch_bytes=MAX_BATCH_BYTES) -> int:
    buf = as_array(batch)
    return kernels.validate_batch(buf, 0, buf.size, max_batch_bytes)


def scan(buf: np.ndarray, start=0, capacity=64, end=None):
    rows = [np.full(capacity, -7, dtype=np.int64) for _ in range(5)]
    count, valid_end, code = kernels.scan_batches(
        buf, start, buf.size if end is None else end, MAX_BATCH_BYTES, *rows)
    return count, valid_end, code, [row[:count].tolist() for row in rows]


# --- CRC32C ---------------------------------------------------------------------------


@pytest.mark.parametrize("crc_path", CRC_PATHS, ids=lambda f: f.__name__)
def test_crc32c_of_the_standard_check_string_is_e3069283(crc_path):
    buf = as_array(b"123456789")
    assert crc_path(buf, 0, buf.size, 0) == 0xE3069283
    assert kernels.crc32c(buf, 0, buf.size) == 0xE3069283
    assert kernels.crc32c_bytes(b"123456789") == 0xE3069283


@pytest.mark.parametrize("crc_path", CRC_PATHS, ids=lambda f: f.__name__)
def test_crc32c_equals_reference_for_every_length_up_to_4096_at_random_offsets(crc_path):
    rng = np.random.default_rng(20240611)
    buf = rng.integers(0, 256, 4096 + 64, dtype=np.uint8)
    for length in range(4097):
        start = int(rng.integers(0, 64))
        expected = crc32c_reference.crc32c(buf[start:start + length].tobytes())
        assert crc_path(buf, start, start + length, 0) == expected, (length, start)


@pytest.mark.parametrize("crc_path", CRC_PATHS, ids=lambda f: f.__name__)
def test_crc32c_equals_reference_across_the_interleaved_block_boundaries(crc_path):
    rng = np.random.default_rng(7)
    long3 = 3 * kernels.CRC_LONG_BLOCK_BYTES
    short3 = 3 * kernels.CRC_SHORT_BLOCK_BYTES
    lengths = [long3 - 1, long3, long3 + 1, long3 + short3 + 9, 2 * long3 + short3 - 1, (1 << 20) + 13]
    buf = rng.integers(0, 256, max(lengths) + 16, dtype=np.uint8)
    for length in lengths:
        expected = crc32c_reference.crc32c(buf[5:5 + length].tobytes())
        assert crc_path(buf, 5, 5 + length, 0) == expected, length


@pytest.mark.parametrize("crc_path", CRC_PATHS, ids=lambda f: f.__name__)
def test_crc32c_continues_from_a_previous_crc(crc_path):
    rng = np.random.default_rng(3)
    buf = rng.integers(0, 256, 100_000, dtype=np.uint8)
    whole = crc32c_reference.crc32c(buf.tobytes())
    for split in (0, 1, 99, 30_000, 99_999, 100_000):
        head = crc_path(buf, 0, split, 0)
        assert crc_path(buf, split, buf.size, head) == whole, split
    assert kernels.crc32c_bytes(buf[500:].tobytes(), kernels.crc32c_bytes(buf[:500].tobytes())) == whole


def test_crc32c_dispatches_to_hardware_exactly_when_the_host_has_sse42():
    assert kernels.HAS_SSE42 == bool(llvm_binding.get_host_cpu_features().get("sse4.2", False))
    buf = np.frombuffer(b"ingest" * 1000, dtype=np.uint8)
    assert kernels.crc32c(buf, 3, buf.size - 2) == crc32c_reference.crc32c(buf[3:-2].tobytes())


# --- validate_batch -------------------------------------------------------------------


def test_batches_built_by_kafka_python_are_valid():
    for count in (1, 2, 17, 300):
        assert validate(kafka_python_batch(count)) == kernels.OK, count


def test_every_single_bit_flip_in_the_checked_bytes_is_rejected():
    batch = kafka_python_batch(4)
    # baseOffset [0, 8) is patched by the broker and partitionLeaderEpoch [12, 16) is
    # assigned later, so Kafka leaves both outside the CRC; every other bit is checked.
    checked = [*range(LENGTH_OFFSET, PARTITION_LEADER_EPOCH_OFFSET), *range(MAGIC_OFFSET, len(batch))]
    for byte_index in checked:
        for bit in range(8):
            flipped = bytearray(batch)
            flipped[byte_index] ^= 1 << bit
            assert validate(flipped) != kernels.OK, (byte_index, bit)


def test_base_offset_and_leader_epoch_are_outside_the_crc_as_in_kafka():
    flipped = bytearray(kafka_python_batch(4))
    flipped[0] ^= 0x80
    flipped[PARTITION_LEADER_EPOCH_OFFSET] ^= 0x01
    assert validate(flipped) == kernels.OK


def test_every_truncation_is_reported_short():
    batch = kafka_python_batch(3)
    for length in range(len(batch)):
        assert validate(batch[:length]) == kernels.ERR_SHORT, length


def test_batch_length_outside_its_bounds_is_a_length_error():
    batch = kafka_python_batch(3)
    too_small = batch[:LENGTH_OFFSET] + struct.pack(">i", kernels.BATCH_LENGTH_MIN - 1) + batch[12:]
    assert validate(too_small) == kernels.ERR_LENGTH
    negative = batch[:LENGTH_OFFSET] + struct.pack(">i", -5) + batch[12:]
    assert validate(negative) == kernels.ERR_LENGTH
    assert validate(batch, max_batch_bytes=len(batch) - 13) == kernels.ERR_LENGTH
    assert validate(batch, max_batch_bytes=len(batch) - 12) == kernels.OK


def test_a_batch_with_another_magic_is_rejected():
    batch = bytearray(kafka_python_batch(2))
    batch[MAGIC_OFFSET] = 1
    assert validate(batch) == kernels.ERR_MAGIC


def test_compressed_batches_are_checked_by_header_and_crc_only():
    gzipped = kafka_python_batch(50, codec=1, value_bytes=200)
    assert struct.unpack_from(">h", gzipped, ATTRIBUTES_OFFSET)[0] & 0x07 == 1
    assert validate(gzipped) == kernels.OK
    for codec in (5, 6, 7):
        attributes = struct.pack(">h", codec)
        edited = gzipped[:ATTRIBUTES_OFFSET] + attributes + gzipped[ATTRIBUTES_OFFSET + 2:]
        assert validate(reseal(edited)) == kernels.ERR_COMPRESSION, codec


def with_int32(batch: bytes, offset: int, value: int) -> bytes:
    return reseal(batch[:offset] + struct.pack(">i", value) + batch[offset + 4:])


def test_records_that_disagree_with_the_header_are_rejected_even_with_a_good_crc():
    batch = kafka_python_batch(4)
    for records_count in (0, 3, 5, -1, 2**31 - 1):
        assert validate(with_int32(batch, RECORDS_COUNT_OFFSET, records_count)) == kernels.ERR_RECORDS
    for last_offset_delta in (2, 4, -1):
        edited = with_int32(batch, LAST_OFFSET_DELTA_OFFSET, last_offset_delta)
        assert validate(edited) == kernels.ERR_RECORDS


def test_offset_deltas_must_count_up_from_zero():
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, MAX_BATCH_BYTES)
    builder.append(0, 1000, None, b"a", [])
    builder.append(-1, 1000, None, b"b", [])  # a negative offset delta
    assert validate(builder.build()) == kernels.ERR_RECORDS
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, MAX_BATCH_BYTES)
    builder.append(0, 1000, None, b"a", [])
    builder.append(2, 1000, None, b"b", [])  # a gap: lastOffsetDelta 2 with 2 records
    assert validate(builder.build()) == kernels.ERR_RECORDS


def test_a_record_length_that_overruns_the_batch_is_rejected():
    batch = bytearray(kafka_python_batch(1, value_bytes=10))
    batch[RECORDS_OFFSET] += 2  # zigzag: the record claims one more byte than it has
    assert validate(reseal(bytes(batch))) == kernels.ERR_RECORDS
    batch[RECORDS_OFFSET] -= 4  # and one fewer
    assert validate(reseal(bytes(batch))) == kernels.ERR_RECORDS


def test_bytes_after_the_last_record_are_rejected():
    batch = kafka_python_batch(2)
    padded = batch + b"\x00\x00"
    padded = padded[:LENGTH_OFFSET] + struct.pack(">i", len(padded) - 12) + padded[12:]
    assert validate(reseal(padded)) == kernels.ERR_RECORDS


# --- scan_batches ---------------------------------------------------------------------


def test_scan_finds_exactly_the_valid_prefix_before_garbage_or_a_torn_tail():
    batches = [kafka_python_batch(n, first_timestamp_ms=1000 * n) for n in (1, 4, 9)]
    valid = b"".join(batches)
    sizes = [len(b) for b in batches]
    positions = [0, sizes[0], sizes[0] + sizes[1]]
    tails = {
        b"": kernels.OK,
        batches[0][:30]: kernels.ERR_SHORT,
        batches[1][:-1]: kernels.ERR_SHORT,
        b"\x00" * 100: kernels.ERR_LENGTH,
        bytes(range(200)): kernels.ERR_LENGTH,
    }
    for tail, code in tails.items():
        buf = as_array(valid + tail)
        count, valid_end, error, rows = scan(buf)
        assert (count, valid_end, error) == (3, len(valid), code), tail[:8]
        assert rows == [positions, [0, 0, 0], [0, 3, 8], [1000, 4021, 9056], sizes]


def test_scan_stops_at_a_corrupt_batch_in_the_middle():
    batches = [kafka_python_batch(n) for n in (2, 3, 4)]
    corrupt = bytearray(batches[1])
    corrupt[-1] ^= 0x01
    buf = as_array(batches[0] + corrupt + batches[2])
    count, valid_end, error, _ = scan(buf)
    assert (count, valid_end, error) == (1, len(batches[0]), kernels.ERR_CRC)


def test_scan_resumes_where_it_stopped_when_the_arrays_are_full():
    batches = [kafka_python_batch(n) for n in (1, 2, 3, 4, 5)]
    buf = as_array(b"".join(batches))
    count, valid_end, error, _ = scan(buf, capacity=2)
    assert (count, valid_end, error) == (2, len(batches[0]) + len(batches[1]), kernels.OK)
    count, valid_end, error, rows = scan(buf, start=valid_end, capacity=2)
    assert (count, error) == (2, kernels.OK) and rows[2] == [2, 3]
    count, valid_end, error, rows = scan(buf, start=valid_end, capacity=2)
    assert (count, valid_end, error) == (1, buf.size, kernels.OK) and rows[2] == [4]


def test_scan_of_an_empty_range_finds_nothing_and_no_error():
    buf = as_array(kafka_python_batch(2))
    assert scan(buf, start=buf.size)[:3] == (0, buf.size, kernels.OK)
    assert scan(buf, start=0, end=0)[:3] == (0, 0, kernels.OK)


def test_scan_honours_end_before_the_buffer_ends():
    batch = kafka_python_batch(2)
    buf = as_array(batch + batch)
    assert scan(buf, end=len(batch))[:3] == (1, len(batch), kernels.OK)
    assert scan(buf, end=len(batch) + RECORD_BATCH_OVERHEAD)[:3] == (1, len(batch), kernels.ERR_SHORT)


# --- murmur2 / partitioning -----------------------------------------------------------


def test_murmur2_equals_kafka_python_for_random_keys():
    rng = np.random.default_rng(11)
    for length in list(range(40)) + [100, 1000]:
        for _ in range(5):
            key = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            ours = kernels.murmur2(as_array(key), 0, length)
            assert -(2**31) <= ours < 2**31
            assert ours & 0xFFFFFFFF == kafka_murmur2(key), key


def test_partition_for_key_follows_kafkas_default_partitioner():
    rng = np.random.default_rng(12)
    for num_partitions in (1, 2, 3, 12, 1000):
        for _ in range(50):
            key = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
            # kafka-python's DefaultPartitioner.partition, minus its cluster lookup.
            expected = (kafka_murmur2(key) & 0x7FFFFFFF) % num_partitions
            assert kernels.partition_for_key(as_array(key), 0, len(key), num_partitions) == expected


# --- warm-up --------------------------------------------------------------------------


def test_warm_up_compiles_the_kernels_for_read_only_and_writable_buffers():
    kernels.warm_up()
    for kernel in (kernels.validate_batch, kernels.scan_batches, kernels.encode_records,
                   kernels.decode_columns_into, kernels.crc32c):
        buffer_kinds = {signature[0].mutable for signature in kernel.signatures}
        assert buffer_kinds == {True, False}, kernel.__name__
