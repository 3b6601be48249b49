"""A segment: zero-copy appends with the broker's fields patched, whole-batch reads."""

import os
import struct

import pytest

from ingest.errors import CorruptDataError
from ingest.shards.segment import Segment, segment_file_name
from tests.kafka_batches import kafka_index_entries, make_batch, parse_batches


def new_segment(tmp_path, base_offset=0, index_interval_bytes=4096) -> Segment:
    return Segment.create(tmp_path, base_offset, index_interval_bytes, now_ms=0)


def append(segment: Segment, batch, epoch=None) -> int:
    parsed = parse_batches(bytes(batch))[0]
    base = segment.next_offset
    return segment.append(memoryview(batch), base, base + parsed.last_offset - parsed.base_offset,
                          parsed.max_timestamp_ms, epoch)


def test_files_are_named_by_base_offset_in_twenty_digits(tmp_path):
    segment = new_segment(tmp_path, base_offset=42)
    segment.close()
    assert sorted(os.listdir(tmp_path)) == [
        "00000000000000000042.index", "00000000000000000042.log",
        "00000000000000000042.timeindex"]
    assert segment_file_name(42, ".log") == "00000000000000000042.log"


def test_append_writes_the_producer_bytes_with_only_the_base_offset_replaced(tmp_path):
    segment = new_segment(tmp_path, base_offset=100)
    batch = make_batch(count=5)
    producer_buffer = memoryview(batch)  # read-only, as a zmq frame's buffer is
    assert append(segment, producer_buffer) == 0
    on_disk = (tmp_path / segment_file_name(100, ".log")).read_bytes()
    assert on_disk[8:] == batch[8:]
    assert struct.unpack(">q", on_disk[:8])[0] == 100
    assert struct.unpack(">q", batch[:8])[0] == 0, "the producer's buffer was modified"
    parsed = parse_batches(on_disk)[0]
    assert parsed.crc_ok and [r[0] for r in parsed.records] == [100, 101, 102, 103, 104]
    assert segment.next_offset == 105


def test_append_can_stamp_the_partition_leader_epoch_without_breaking_the_crc(tmp_path):
    segment = new_segment(tmp_path)
    batch = bytearray(make_batch(count=2))
    before = bytes(batch)
    append(segment, batch, epoch=7)
    assert batch == before
    parsed = parse_batches(os.pread(segment.fileno(), segment.size_bytes, 0))[0]
    assert parsed.leader_epoch == 7 and parsed.crc_ok


def test_read_returns_whole_batches_from_the_one_holding_the_offset(tmp_path):
    segment = new_segment(tmp_path, base_offset=0, index_interval_bytes=300)
    sizes = []
    for i in range(40):
        batch = make_batch(count=1 + i % 4, value_bytes=20 + 13 * i, seed=i)
        append(segment, batch)
        sizes.append(len(batch))
    everything = os.pread(segment.fileno(), segment.size_bytes, 0)
    batches = parse_batches(everything)
    for max_bytes in (1, 500, 2000, 1 << 20):
        for offset in range(segment.base_offset, segment.next_offset):
            position, data = segment.read(offset, max_bytes)
            holding = next(b for b in batches if b.base_offset <= offset <= b.last_offset)
            assert position == holding.position
            returned = parse_batches(data)
            assert sum(b.size for b in returned) == len(data), "a partial batch was returned"
            assert returned[0].base_offset == holding.base_offset
            # As many whole batches as fit, and always at least one.
            fits = [b for b in batches if b.position >= position
                    and b.position + b.size - position <= max_bytes]
            assert len(returned) == max(1, len(fits))
            assert segment.file_region(offset, max_bytes) == (position, len(data))


def test_index_entries_built_while_appending_are_kafkas(tmp_path):
    segment = new_segment(tmp_path, base_offset=10, index_interval_bytes=700)
    for i in range(60):
        append(segment, make_batch(count=2, value_bytes=50 + 7 * i, seed=i,
                                   timestamp_ms=5_000 + (i * 37) % 400))
    batches = parse_batches(os.pread(segment.fileno(), segment.size_bytes, 0))
    offsets, times = kafka_index_entries(batches, 10, 700, sealed=False)
    assert segment.offset_index.entries() == offsets
    assert segment.time_index.entries() == times
    segment.seal()
    offsets, times = kafka_index_entries(batches, 10, 700, sealed=True)
    assert segment.time_index.entries() == times


def test_find_offset_by_timestamp_matches_a_scan_of_every_record(tmp_path):
    segment = new_segment(tmp_path, index_interval_bytes=200)
    for i in range(50):
        timestamps = [10_000 + ((i * 7919 + j * 104729) % 3000) for j in range(4)]
        append(segment, make_batch(count=4, timestamps_ms=timestamps, seed=i))
    records = [r for b in parse_batches(os.pread(segment.fileno(), segment.size_bytes, 0))
               for r in b.records]
    for target in range(9_990, 13_010, 7):
        expected = next((offset for offset, ts, _ in records if ts >= target), None)
        assert segment.find_offset_by_timestamp(target, 0) == expected


def test_reopening_a_sealed_segment_trusts_its_indexes(tmp_path):
    segment = new_segment(tmp_path, index_interval_bytes=100)
    for i in range(20):
        append(segment, make_batch(count=3, seed=i, timestamp_ms=1000 * i))
    segment.seal()
    segment.flush_indexes()
    next_offset, entries = segment.next_offset, segment.offset_index.entries()
    segment.close()
    reopened = Segment.open(tmp_path, 0, 100)
    assert reopened.load_indexes(next_offset=None)
    assert reopened.next_offset == next_offset
    assert reopened.offset_index.entries() == entries
    assert reopened.max_timestamp_ms == 1000 * 19 + 2


def test_a_batch_at_the_end_is_never_read_beyond_the_readable_prefix(tmp_path):
    segment = new_segment(tmp_path)
    for i in range(3):
        append(segment, make_batch(seed=i))
    segment.close()
    with open(tmp_path / segment_file_name(0, ".log"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x40]))
    reopened = Segment.open(tmp_path, 0, 4096)
    scan = reopened.recover(max_batch_bytes=1 << 20)
    assert scan.error is not None and scan.next_offset == 6
    assert reopened.read(0, 1 << 20)[1] == os.pread(reopened.fileno(), scan.valid_bytes, 0)
    with pytest.raises(CorruptDataError, match="corrupt region"):
        reopened.read(6, 1 << 20)
