"""The partition log: offsets, reads across segments, time lookups, rolling, retention,
group commit and a full disk."""

import os
import random
import struct
import subprocess

import pytest
import zmq

from ingest.errors import (
    DiskFullError,
    InvalidBatchError,
    InvalidConfigError,
    OffsetOutOfRangeError,
    RecordBatchTooLargeError,
)
from ingest.shards.log import CLEAN_SHUTDOWN_FILE, RECOVERY_POINT_FILE, Log, LogConfig, mono_ms
from tests.kafka_batches import make_batch, parse_batches

DAY_MS = 24 * 3600 * 1000
NOW_MS = 1_700_000_000_000


def read_all(log: Log) -> bytes:
    """Every batch from log start to log end, read in max_bytes steps."""
    out, offset = bytearray(), log.log_start_offset
    while offset < log.log_end_offset:
        chunk = log.read(offset, 3000)
        assert chunk, f"empty read at offset {offset}"
        out += chunk
        offset = parse_batches(chunk)[-1].last_offset + 1
    return bytes(out)


def fill(log: Log, batches: int, seed: int = 0, timestamp_ms: int = NOW_MS) -> list[bytes]:
    rng = random.Random(seed)
    sent = []
    for i in range(batches):
        batch = make_batch(count=rng.randint(1, 6), value_bytes=rng.randint(10, 700),
                           seed=seed * 100_000 + i, timestamp_ms=timestamp_ms + i * 10)
        log.append(batch)
        sent.append(batch)
    return sent


def test_appends_get_consecutive_offsets_and_read_back_byte_identical_across_segments(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=4000, index_interval_bytes=500))
    sent = fill(log, 120)
    assert len(log.segments) > 5, "the test should span several rolled segments"
    stored = parse_batches(read_all(log))
    expected_offset = 0
    for batch, original in zip(stored, sent):
        assert batch.base_offset == expected_offset and batch.crc_ok
        expected_offset = batch.last_offset + 1
        assert original[8:] == read_all_batch_bytes(log, batch.base_offset)[8:]
    assert expected_offset == log.log_end_offset and len(stored) == len(sent)
    for segment in log.segments:
        one_batch = len(parse_batches(os.pread(segment.fileno(), segment.size_bytes, 0))) == 1
        assert 0 < segment.size_bytes <= 4000 or one_batch
        first_base_offset = struct.unpack(">q", os.pread(segment.fileno(), 8, 0))[0]
        assert segment.base_offset == first_base_offset


def read_all_batch_bytes(log: Log, offset: int) -> bytes:
    data = log.read(offset, 1)
    return data[:parse_batches(data)[0].size]


def test_every_offset_reads_from_the_batch_that_holds_it(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=5000, index_interval_bytes=300))
    fill(log, 80, seed=3)
    batches = parse_batches(read_all(log))
    for offset in range(log.log_end_offset):
        first = parse_batches(log.read(offset, 1000))[0]
        holding = next(b for b in batches if b.base_offset <= offset <= b.last_offset)
        assert (first.base_offset, first.last_offset) == (holding.base_offset, holding.last_offset)


def test_a_read_returns_one_whole_batch_even_if_it_is_bigger_than_max_bytes(tmp_path):
    log = Log(tmp_path / "t-0")
    big = make_batch(count=3, value_bytes=5000)
    log.append(big)
    data = log.read(1, 100)
    assert len(data) == len(big) and data[8:] == big[8:]


def test_reads_outside_the_log_are_offset_out_of_range_and_the_end_is_empty(tmp_path):
    log = Log(tmp_path / "t-0")
    fill(log, 3)
    end = log.log_end_offset
    assert log.read(end, 1000) == b""
    with pytest.raises(OffsetOutOfRangeError):
        log.read(end + 1, 1000)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(-1, 1000)


def test_offset_for_timestamp_matches_a_scan_of_every_record(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=3000, index_interval_bytes=200))
    rng = random.Random(5)
    for i in range(90):
        # Timestamps wander up and down, as devices' clocks do.
        timestamps = [NOW_MS + rng.randint(-500, 500) + 20 * i for _ in range(3)]
        log.append(make_batch(count=3, timestamps_ms=timestamps, seed=i))
    records = [r for b in parse_batches(read_all(log)) for r in b.records]
    for target in range(NOW_MS - 600, NOW_MS + 90 * 20 + 600, 17):
        expected = next((offset for offset, ts, _ in records if ts >= target), None)
        assert log.offset_for_timestamp(target) == expected, target


def test_the_producer_buffer_is_appended_without_being_modified(tmp_path):
    log = Log(tmp_path / "t-0")
    fill(log, 2)
    producer = make_batch(count=4)
    frozen = bytes(producer)
    base, last = log.append(memoryview(producer))
    assert (base, last) == (log.log_end_offset - 4, log.log_end_offset - 1)
    assert producer == frozen
    stored = parse_batches(log.read(base, 1 << 20))[0]
    assert stored.base_offset == base and stored.crc_ok


def test_the_partition_leader_epoch_is_stamped_on_request(tmp_path):
    log = Log(tmp_path / "t-0")
    base, _ = log.append(make_batch(), partition_leader_epoch=12)
    stored = parse_batches(log.read(base, 1 << 20))[0]
    assert stored.leader_epoch == 12 and stored.crc_ok


@pytest.mark.parametrize("mangle, error", [
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), InvalidBatchError),  # CRC mismatch
    (lambda b: b + b, InvalidBatchError),  # two batches in one append
    (lambda b: b[:40], InvalidBatchError),  # shorter than a header
    (lambda b: make_batch(count=2, value_bytes=3000), RecordBatchTooLargeError),
])
def test_an_invalid_batch_is_refused_and_nothing_is_written(tmp_path, mangle, error):
    log = Log(tmp_path / "t-0", LogConfig(max_batch_bytes=4096))
    fill(log, 2)
    end, size = log.log_end_offset, log.size_bytes
    with pytest.raises(error):
        log.append(mangle(make_batch()))
    assert (log.log_end_offset, log.size_bytes) == (end, size)
    assert os.path.getsize(log.active.path) == size


def test_a_segment_rolls_when_a_batch_is_segment_ms_newer_than_its_first(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_ms=60_000))
    log.append(make_batch(timestamp_ms=NOW_MS))
    log.append(make_batch(timestamp_ms=NOW_MS + 60_000))
    assert len(log.segments) == 1
    log.append(make_batch(timestamp_ms=NOW_MS + 60_010))
    assert [s.base_offset for s in log.segments] == [0, 6]


def test_retention_by_size_deletes_the_oldest_segments_and_moves_the_log_start(tmp_path):
    config = LogConfig(segment_bytes=3000, retention_bytes=10_000, retention_ms=-1)
    log = Log(tmp_path / "t-0", config)
    fill(log, 100)
    before = len(log.segments)
    deleted = log.apply_retention(NOW_MS)
    assert deleted > 0 and len(log.segments) == before - deleted
    assert log.size_bytes >= 10_000 - 3000 and log.size_bytes - log.segments[0].size_bytes < 10_000
    assert log.log_start_offset == log.segments[0].base_offset > 0
    with pytest.raises(OffsetOutOfRangeError):
        log.read(log.log_start_offset - 1, 100)
    assert parse_batches(log.read(log.log_start_offset, 100))[0].base_offset == log.log_start_offset
    names = os.listdir(tmp_path / "t-0")
    assert f"{log.log_start_offset:020d}.log" in names
    assert not any(n.startswith(f"{0:020d}") for n in names)


def test_retention_by_size_never_deletes_the_active_segment(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=3000, retention_bytes=0))
    fill(log, 30)
    log.apply_retention(NOW_MS)
    assert len(log.segments) == 1 and log.log_end_offset > log.log_start_offset


def test_retention_by_time_deletes_segments_whose_newest_record_is_too_old(tmp_path):
    config = LogConfig(segment_bytes=3000, retention_ms=7 * DAY_MS)
    log = Log(tmp_path / "t-0", config)
    fill(log, 30, timestamp_ms=NOW_MS - 10 * DAY_MS)  # old records
    log.append(make_batch(timestamp_ms=NOW_MS - 10 * DAY_MS))
    old_segments = len(log.segments)
    fill(log, 30, seed=1, timestamp_ms=NOW_MS - DAY_MS)  # rolls into fresh segments
    fresh_start = next(s.base_offset for s in log.segments if s.max_timestamp_ms > NOW_MS - 2 * DAY_MS)
    assert log.apply_retention(NOW_MS) >= old_segments - 1
    assert log.log_start_offset <= fresh_start
    assert all(s.max_timestamp_ms > NOW_MS - 7 * DAY_MS for s in log.segments)
    assert log.apply_retention(NOW_MS) == 0


def test_retention_by_time_judges_age_the_same_after_a_reopen(tmp_path):
    config = LogConfig(segment_bytes=3000, retention_ms=7 * DAY_MS)
    log = Log(tmp_path / "t-0", config)
    fill(log, 40, timestamp_ms=NOW_MS - 8 * DAY_MS)
    fill(log, 40, seed=1, timestamp_ms=NOW_MS - 6 * DAY_MS)
    expected_start = next(s.base_offset for s in log.segments
                          if s.max_timestamp_ms >= NOW_MS - 7 * DAY_MS)
    log.close()
    reopened = Log(tmp_path / "t-0", config)
    reopened.apply_retention(NOW_MS)
    assert reopened.log_start_offset == expected_start


def test_one_flush_covers_every_append_since_the_last_with_one_fdatasync(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(flush_interval_ms=1000, flush_bytes=1 << 30))
    log.flush()
    fsyncs = log.probe.fsyncs_total
    fill(log, 50)
    assert log.flushed_offset == 0 < log.log_end_offset
    assert log.flush() == log.log_end_offset == log.flushed_offset
    assert log.probe.fsyncs_total == fsyncs + 1


def test_flush_is_due_after_flush_interval_ms_or_flush_bytes(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(flush_interval_ms=50, flush_bytes=4000))
    assert not log.flush_due(mono_ms())
    log.append(make_batch(value_bytes=100))
    now = mono_ms()
    assert not log.flush_due(now)
    assert 40 <= log.flush_wait_ms(now) <= 50
    assert log.flush_due(now + 50) and log.flush_wait_ms(now + 50) == 0
    log.flush()
    assert not log.flush_due(now + 1000)
    log.append(make_batch(value_bytes=5000))
    assert log.flush_due(mono_ms()), "flush_bytes reached"


def test_a_flush_after_a_roll_syncs_the_sealed_segment_and_moves_the_recovery_point(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=2000))
    fill(log, 20)
    assert len(log.segments) > 2
    log.flush()
    recovery_point = int((tmp_path / "t-0" / RECOVERY_POINT_FILE).read_text())
    assert recovery_point == log.active.base_offset


def test_close_leaves_the_clean_shutdown_marker_and_the_first_append_removes_it(tmp_path):
    log = Log(tmp_path / "t-0")
    fill(log, 5)
    log.close()
    assert (tmp_path / "t-0" / CLEAN_SHUTDOWN_FILE).exists()
    reopened = Log(tmp_path / "t-0")
    assert (tmp_path / "t-0" / CLEAN_SHUTDOWN_FILE).exists()
    assert reopened.flushed_offset == reopened.log_end_offset
    fill(reopened, 1, seed=1)
    assert not (tmp_path / "t-0" / CLEAN_SHUTDOWN_FILE).exists()
    reopened.close()
    assert (tmp_path / "t-0" / CLEAN_SHUTDOWN_FILE).exists()


def _file_stamps(directory) -> dict[str, tuple[int, int]]:
    return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns) for e in os.scandir(directory)}


@pytest.mark.parametrize("written", [False, True], ids=["new", "written before"])
def test_closing_a_log_untouched_since_its_open_writes_and_fsyncs_nothing(tmp_path, written, monkeypatch):
    log = Log(tmp_path / "t-0")
    if written:
        fill(log, 5)
    log.close()
    stamps = _file_stamps(tmp_path / "t-0")
    reopened = Log(tmp_path / "t-0")
    reopened.read(0, 1 << 20)
    syncs = []
    for name in ("fsync", "fdatasync"):  # counted, then done for real
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real: (syncs.append(fd), real(fd))[1])
    reopened.close()
    monkeypatch.undo()
    assert syncs == [], "closing an untouched log fsynced"
    assert _file_stamps(tmp_path / "t-0") == stamps, "a file was rewritten or replaced"
    assert not Log(tmp_path / "t-0").recovered_by_scan


@pytest.mark.parametrize("bad", [dict(segment_bytes=10), dict(retention_ms=-2),
                                 dict(max_batch_bytes=1 << 31), dict(flush_interval_ms=-1)])
def test_a_config_value_out_of_range_is_refused_with_its_name(bad):
    with pytest.raises(InvalidConfigError, match=next(iter(bad))):
        LogConfig(**bad)


# ---- disk full ---------------------------------------------------------------------------

# Small enough to fill in a few dozen appends, big enough for the log's first files.
TMPFS_BYTES = 256 * 1024
BALLAST_BYTES = 64 * 1024


@pytest.fixture
def tiny_filesystem(tmp_path, request):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    assert result.returncode == 0, f"cannot mount a tmpfs (this test needs root): {result.stderr}"
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(mount_point)]))
    return mount_point


@pytest.mark.parametrize("segment_bytes", [1 << 20, 20_000])
def test_a_full_disk_loses_no_appended_batch_and_appends_resume_once_space_is_free(
        tiny_filesystem, segment_bytes):
    ballast = tiny_filesystem / "ballast"
    ballast.write_bytes(os.urandom(BALLAST_BYTES))
    config = LogConfig(segment_bytes=segment_bytes)
    log = Log(tiny_filesystem / "t-0", config)
    appended = []
    with pytest.raises(DiskFullError):
        for i in range(1000):
            batch = make_batch(count=2, value_bytes=5000, seed=i)
            log.append(batch)
            appended.append(batch)
    assert 5 < len(appended) < 1000
    assert log.probe.disk_full_total == 1
    assert os.path.getsize(log.active.path) == log.active.size_bytes, "a partial batch stayed"
    assert [b[8:] for b in split(read_all(log))] == [b[8:] for b in appended]

    ballast.unlink()
    more = make_batch(count=2, value_bytes=5000, seed=9999)
    log.append(more)
    appended.append(more)
    log.flush()
    log.close()
    reopened = Log(tiny_filesystem / "t-0", config)
    assert not reopened.recovered_by_scan
    assert [b[8:] for b in split(read_all(reopened))] == [b[8:] for b in appended]
    reopened.close()


def split(data: bytes) -> list[bytes]:
    return [data[b.position:b.position + b.size] for b in parse_batches(data)]


def test_a_zero_copy_zmq_frame_is_appended_from_its_own_buffer(tmp_path):
    context = zmq.Context.instance()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        receiver.bind("inproc://log-append")
        sender.connect("inproc://log-append")
        batch = make_batch(count=20, value_bytes=2000)  # big enough for zero-copy transfer
        sender.send(batch, copy=False)
        frame = receiver.recv(copy=False)
        log = Log(tmp_path / "t-0")
        fill(log, 1)
        base, last = log.append(frame)
        assert last - base == 19
        assert bytes(frame.buffer) == batch, "the frame's buffer was modified"
        assert log.read(base, 1 << 20)[8:] == batch[8:]
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
