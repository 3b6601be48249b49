"""Offset and time indexes: Kafka's file formats, floor lookups, truncation, rebuild."""

import random
import struct

import numpy as np
import pytest

from ingest.shards.index import (
    NO_TIMESTAMP,
    OffsetIndex,
    TimeIndex,
    indexed_rows,
    time_index_entries,
)


def test_offset_index_file_holds_big_endian_relative_offset_and_position(tmp_path):
    index = OffsetIndex(str(tmp_path / "00000000000000001000.index"), 1000)
    index.append(1004, 0)
    index.append(1010, 5000)
    index.flush()
    raw = (tmp_path / "00000000000000001000.index").read_bytes()
    assert raw == struct.pack(">ii", 4, 0) + struct.pack(">ii", 10, 5000)


def test_time_index_file_holds_big_endian_timestamp_and_relative_offset(tmp_path):
    index = TimeIndex(str(tmp_path / "00000000000000000007.timeindex"), 7)
    assert index.maybe_append(1_700_000_000_000, 9)
    index.flush()
    raw = (tmp_path / "00000000000000000007.timeindex").read_bytes()
    assert raw == struct.pack(">qi", 1_700_000_000_000, 2)


def test_offset_lookup_returns_the_floor_entry_like_a_linear_search(tmp_path):
    rng = random.Random(1)
    index = OffsetIndex(str(tmp_path / "x.index"), 500)
    entries, offset, position = [], 500, 0
    for _ in range(300):
        offset += rng.randint(1, 20)
        position += rng.randint(61, 9000)
        index.append(offset, position)
        entries.append((offset, position))
    for target in range(480, offset + 30):
        floor = [e for e in entries if e[0] <= target]
        assert index.lookup(target) == (floor[-1] if floor else (500, 0))


def test_time_lookup_returns_the_floor_entry_like_a_linear_search(tmp_path):
    index = TimeIndex(str(tmp_path / "x.timeindex"), 0)
    entries = [(100, 3), (250, 9), (251, 10), (900, 44)]
    for ts, offset in entries:
        index.maybe_append(ts, offset)
    for target in range(0, 1000):
        floor = [e for e in entries if e[0] <= target]
        assert index.lookup(target) == (floor[-1] if floor else (NO_TIMESTAMP, 0))


def test_time_index_only_takes_a_timestamp_above_the_last_one(tmp_path):
    index = TimeIndex(str(tmp_path / "x.timeindex"), 0)
    assert not index.maybe_append(NO_TIMESTAMP, 0)
    assert index.maybe_append(10, 1)
    assert not index.maybe_append(10, 2)
    assert not index.maybe_append(5, 3)
    assert index.entries() == [(10, 1)]


def test_offset_index_refuses_offsets_that_do_not_increase(tmp_path):
    index = OffsetIndex(str(tmp_path / "x.index"), 0)
    index.append(10, 100)
    with pytest.raises(AssertionError):
        index.append(10, 200)
    with pytest.raises(AssertionError):
        index.append(11, 100)


def test_truncate_to_drops_entries_at_and_above_the_offset_on_disk_too(tmp_path):
    path = tmp_path / "00000000000000000000.index"
    index = OffsetIndex(str(path), 0)
    for i in range(1, 11):
        index.append(i * 10, i * 1000)
    index.flush()
    index.truncate_to(50)
    assert index.entries() == [(i * 10, i * 1000) for i in range(1, 5)]
    index.flush()
    assert path.stat().st_size == 4 * OffsetIndex.ENTRY_BYTES
    reloaded = OffsetIndex(str(path), 0)
    assert reloaded.load() and reloaded.entries() == index.entries()

    times = TimeIndex(str(tmp_path / "x.timeindex"), 0)
    for i in range(1, 6):
        times.maybe_append(i * 100, i * 10)
    times.truncate_to(30)
    assert times.entries() == [(100, 10), (200, 20)]


def test_appends_after_a_load_extend_the_file_without_rewriting_it(tmp_path):
    path = tmp_path / "x.index"
    index = OffsetIndex(str(path), 0)
    index.append(5, 100)
    index.flush()
    reloaded = OffsetIndex(str(path), 0)
    assert reloaded.load()
    reloaded.append(9, 300)
    reloaded.flush()
    assert path.read_bytes() == struct.pack(">iiii", 5, 100, 9, 300)


@pytest.mark.parametrize("garbage", [b"\x00" * 7, struct.pack(">iiii", 9, 100, 5, 200)])
def test_a_garbled_index_file_loads_as_empty_and_says_so(tmp_path, garbage):
    path = tmp_path / "x.index"
    path.write_bytes(garbage)
    index = OffsetIndex(str(path), 0)
    assert not index.load()
    assert len(index) == 0


def test_a_missing_index_file_loads_as_empty_and_says_so(tmp_path):
    index = TimeIndex(str(tmp_path / "absent.timeindex"), 0)
    assert not index.load()
    assert len(index) == 0


def test_indexed_rows_follow_kafkas_bytes_since_last_entry_rule():
    rng = random.Random(7)
    sizes = [rng.randint(61, 3000) for _ in range(2000)]
    positions = np.cumsum([0] + sizes[:-1]).astype(np.int64)
    for interval in (0, 1, 100, 4096, 10_000):
        expected, since = [], 0
        for row, size in enumerate(sizes):
            if since > interval:
                expected.append(row)
                since = 0
            since += size
        assert indexed_rows(positions, interval).tolist() == expected


def test_time_index_entries_keep_the_first_batch_reaching_each_new_maximum():
    last_offsets = np.array([2, 5, 8, 11, 14], dtype=np.int64)
    max_ts = np.array([100, 90, 300, 300, 200], dtype=np.int64)
    rows = np.array([1, 3, 4], dtype=np.int64)
    ts, offsets = time_index_entries(rows, last_offsets, max_ts, sealed=False)
    # Row 1: max so far 100 (reached at offset 2); row 3: 300 reached at 8; row 4: no gain.
    assert ts.tolist() == [100, 300] and offsets.tolist() == [2, 8]
    ts, offsets = time_index_entries(np.array([], np.int64), last_offsets, max_ts, sealed=True)
    assert ts.tolist() == [300] and offsets.tolist() == [8]
