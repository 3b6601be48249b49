"""One partition's log: ordered segments, offset assignment, group commit, retention,
recovery. One Log per partition directory, driven by one worker thread.

Files in the partition directory, besides the segments:
    recovery-point   decimal base offset of the first segment that may hold unsynced
                     bytes; every segment before it was fsynced whole, indexes included
    clean-shutdown   every byte and index on disk was fsynced and the files are exactly as
                     close() left them, so open trusts them and skips the scan. It stays
                     while the log is untouched after an open (or its creation) and is
                     removed, durably, before the first change: closing a log nobody wrote
                     to since then costs no write and no fsync (a drain of thousands of
                     idle partitions stays quick)

Offsets: log_start_offset <= flushed_offset <= log_end_offset. Everything below
flushed_offset is fdatasynced; everything below log_end_offset is in the page cache.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.errors import (
    DiskFullError,
    InvalidBatchError,
    InvalidConfigError,
    LogOfflineError,
    OffsetOutOfRangeError,
    RecordBatchTooLargeError,
)
from ingest.shards import kernels
from ingest.shards.index import INT32_MAX, NO_TIMESTAMP
from ingest.shards.layout import (
    LAST_OFFSET_DELTA_OFFSET,
    LENGTH_OFFSET,
    LOG_OVERHEAD,
    MAX_TIMESTAMP_OFFSET,
    RECORD_BATCH_OVERHEAD,
)
from ingest.shards.segment import (
    INDEX_SUFFIX,
    TIME_INDEX_SUFFIX,
    Problem,
    ScanResult,
    Segment,
    StaleTrustError,
    parse_segment_file_name,
    storage_error,
)

logger = logging.getLogger(__name__)

RECOVERY_POINT_FILE = "recovery-point"
CLEAN_SHUTDOWN_FILE = "clean-shutdown"
TMP_SUFFIX = ".tmp"

MiB = 1 << 20
DAY_MS = 24 * 3600 * 1000
# Positions in .index entries are int32: a segment (plus the batch that may overflow it)
# must stay below 2 GiB.
SEGMENT_BYTES_MAX = INT32_MAX
# A batch bigger than this is a producer bug, not telemetry; it would also pin that much
# memory in every reader.
MAX_BATCH_BYTES_LIMIT = 1 << 30

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")


def wall_ms() -> int:
    """Wall-clock ms: record timestamps, retention and roll by age."""
    return time.time_ns() // 1_000_000


def mono_ms() -> int:
    """Monotonic ms: the group-commit clock of flush_due / flush_wait_ms."""
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class LogConfig:
    segment_bytes: int = 256 * MiB  # roll when the next batch would pass this
    segment_ms: int = 7 * DAY_MS  # roll when a batch is this much newer than the first
    retention_bytes: int = -1  # delete old segments beyond this total; -1 = unlimited
    retention_ms: int = 7 * DAY_MS  # delete segments whose newest record is older; -1 = never
    index_interval_bytes: int = 4096  # bytes of log between two index entries
    flush_interval_ms: int = 5  # group commit: longest an append waits for its fsync
    flush_bytes: int = 1 * MiB  # group commit: flush early once this much is unsynced
    max_batch_bytes: int = 8 * MiB  # largest batch accepted for append, header included

    def __post_init__(self) -> None:
        checks = (
            (RECORD_BATCH_OVERHEAD <= self.max_batch_bytes <= MAX_BATCH_BYTES_LIMIT,
             "max_batch_bytes", f"{RECORD_BATCH_OVERHEAD}..{MAX_BATCH_BYTES_LIMIT}"),
            (RECORD_BATCH_OVERHEAD <= self.segment_bytes
             <= SEGMENT_BYTES_MAX - self.max_batch_bytes,
             "segment_bytes", f"{RECORD_BATCH_OVERHEAD}..2 GiB - max_batch_bytes"),
            (self.segment_ms >= 1, "segment_ms", ">= 1"),
            (self.retention_bytes >= -1, "retention_bytes", ">= 0, or -1 for unlimited"),
            (self.retention_ms >= -1, "retention_ms", ">= 0, or -1 for unlimited"),
            (0 <= self.index_interval_bytes <= INT32_MAX, "index_interval_bytes", ">= 0"),
            (self.flush_interval_ms >= 0, "flush_interval_ms", ">= 0"),
            (self.flush_bytes >= 0, "flush_bytes", ">= 0"),
        )
        for ok, name, allowed in checks:
            if not ok:
                raise InvalidConfigError(
                    f"storage {name} = {getattr(self, name)} is out of range: use {allowed}")


@dataclass(slots=True)
class LogProbe:
    """Counters of one log, read by the worker's metrics snapshot."""

    appended_batches_total: int = 0
    appended_bytes_total: int = 0
    flushes_total: int = 0
    fsyncs_total: int = 0
    segments_rolled_total: int = 0
    segments_deleted_total: int = 0
    recovery_truncated_bytes_total: int = 0
    disk_full_total: int = 0


def fsync_directory(path: str | Path) -> None:
    """Make file creations, renames and deletions in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Log:
    """The segments of one partition directory, oldest first; the last one is active."""

    def __init__(self, directory: str | os.PathLike, config: LogConfig | None = None) -> None:
        self.directory = Path(directory)
        self.config = config or LogConfig()
        self.probe = LogProbe()
        # Corrupt batches found in sealed segments; their offsets are never served.
        self.problems: list[Problem] = []
        # True if open scanned segments because the last shutdown was not clean.
        self.recovered_by_scan = False
        self.segments_scanned = 0
        self._segments: list[Segment] = []
        self._base_offsets: list[int] = []
        self._unsynced: list[Segment] = []  # sealed since the last flush
        self._dir_dirty = False  # files created since the last directory fsync
        self._recovery_point = 0
        self._flushed_offset = 0
        self._unflushed_bytes = 0
        self._first_unflushed_ms: int | None = None
        self._offline: OSError | None = None
        self._closed = False
        # The clean-shutdown marker is on disk: nothing changed since it was written.
        self._clean_on_disk = False
        try:
            self._open()
        except OSError as err:
            for segment in self._segments:
                segment.close()
            raise storage_error(err, f"opening the log in {self.directory}") from err

    # ---- state -------------------------------------------------------------------------

    @property
    def active(self) -> Segment:
        return self._segments[-1]

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    @property
    def log_start_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._segments[-1].next_offset

    @property
    def flushed_offset(self) -> int:
        """Every offset below this is fdatasynced."""
        return self._flushed_offset

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    def _check_online(self) -> None:
        if self._closed:
            raise ValueError(f"the log in {self.directory} is closed")
        if self._offline is not None:
            raise LogOfflineError(self._offline.errno or 0,
                                  f"the log in {self.directory} is offline after a failed "
                                  f"fsync ({self._offline}); restart to recover it from disk")

    # ---- open and recovery -------------------------------------------------------------

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        base_offsets = self._list_segments()
        marker = self.directory / CLEAN_SHUTDOWN_FILE
        clean = marker.exists()
        if not base_offsets:
            self._segments = [Segment.create(self.directory, 0, self.config.index_interval_bytes,
                                             wall_ms())]
            # Empty files are already what close() would leave: mark them clean, so an
            # unused new partition costs nothing to close (the directory fsync in
            # _write_recovery_point makes the marker durable with the new files).
            self._best_effort(self._write_clean_marker, "writing the clean-shutdown marker")
            self._best_effort(lambda: self._write_recovery_point(0), "writing the recovery point")
            # The partition directory itself may be new (whoever created it): make its
            # entry in the data directory durable before anything in it is acknowledged.
            fsync_directory(self.directory.parent)
        elif clean:
            self._load_trusted(base_offsets)
        else:
            self._recover(base_offsets)
        self._base_offsets = [segment.base_offset for segment in self._segments]
        self._flushed_offset = self.log_end_offset
        # A trusted open leaves the files as they were (any index it had to rebuild was
        # written and fsynced): the marker stays until the first change.
        self._clean_on_disk = clean or self._clean_on_disk

    def _write_clean_marker(self) -> None:
        """Create the clean-shutdown marker (durable with the next directory fsync)."""
        fd = os.open(self.directory / CLEAN_SHUTDOWN_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)
        self._clean_on_disk = True

    def _leave_clean_state(self) -> None:
        """Durably remove the clean-shutdown marker before the first change to the files:
        a crash from then on must make the next open scan."""
        if not self._clean_on_disk:
            return
        try:
            (self.directory / CLEAN_SHUTDOWN_FILE).unlink(missing_ok=True)
            fsync_directory(self.directory)
        except OSError as err:
            raise storage_error(err, f"removing the clean-shutdown marker in {self.directory}") from err
        self._clean_on_disk = False

    def _list_segments(self) -> list[int]:
        """Base offsets of the .log files; drops index files without a .log (a deletion
        interrupted after its first unlink) and a half-written recovery point. Files of
        other modules in the directory are left alone."""
        names = os.listdir(self.directory)
        base_offsets = sorted(b for b in map(parse_segment_file_name, names) if b is not None)
        present = set(base_offsets)
        for name in names:
            index_of = {parse_segment_file_name(name, suffix)
                        for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX)} - {None}
            if (index_of and not index_of <= present) or name == RECOVERY_POINT_FILE + TMP_SUFFIX:
                os.unlink(self.directory / name)
        return base_offsets

    def _open_segments(self, base_offsets: list[int]) -> None:
        for base_offset in base_offsets:
            self._segments.append(
                Segment.open(self.directory, base_offset, self.config.index_interval_bytes))

    def _load_trusted(self, base_offsets: list[int]) -> None:
        """After a clean shutdown: load indexes, trust sizes; scan only a segment whose
        indexes do not fit its log."""
        self._open_segments(base_offsets)
        for i, segment in enumerate(self._segments):
            sealed = i + 1 < len(self._segments)
            next_offset = base_offsets[i + 1] if sealed else None
            if segment.load_indexes(next_offset):
                continue
            logger.warning("%s: indexes do not fit the log after a clean shutdown; "
                           "rebuilding them", segment.path)
            if sealed:
                self._recover_sealed(segment, next_offset)
            else:
                self._recover_tail(i)
                segment.flush()
                # Sealed, as the clean close that left the marker did: the marker stays
                # while the log is untouched, so the files must be what close() leaves.
                self._best_effort(segment.seal, f"writing the indexes of {segment.path}")
                self._best_effort(segment.flush_indexes, f"writing the indexes of {segment.path}")
        self._recovery_point = self._read_recovery_point()

    def _recover(self, base_offsets: list[int]) -> None:
        """After a crash: segments from the recovery point on may hold torn or unsynced
        bytes and are scanned, cut at the first invalid batch, and any segment after the
        cut is deleted (it was never acknowledged as durable). Segments before it were
        fsynced: only their indexes are checked, and a corrupt batch in one is reported
        as a problem and never served, but nothing is cut."""
        self.recovered_by_scan = True
        recovery_point = self._read_recovery_point()
        self._open_segments(base_offsets)
        i = 0
        while i < len(self._segments):  # _recover_tail may drop the segments after i
            segment = self._segments[i]
            if segment.base_offset < recovery_point and i + 1 < len(self._segments):
                next_offset = self._segments[i + 1].base_offset
                if not segment.load_indexes(next_offset):
                    self._recover_sealed(segment, next_offset)
            else:
                self._recover_tail(i)
            i += 1
        self._sync_after_recovery(recovery_point)

    def _scan(self, segment: Segment) -> ScanResult:
        # Not config.max_batch_bytes: lowering that setting must never make recovery cut
        # batches that were valid when they were appended.
        self.segments_scanned += 1
        return segment.recover(MAX_BATCH_BYTES_LIMIT)

    def _recover_sealed(self, segment: Segment, next_offset: int) -> None:
        """Rebuild a fsynced sealed segment's indexes; report any corrupt batch."""
        scan = self._scan(segment)
        if scan.error is None and scan.next_offset == next_offset:
            self._best_effort(segment.seal, f"writing the indexes of {segment.path}")
            self._best_effort(segment.flush_indexes, f"syncing the indexes of {segment.path}")
            return
        message = scan.error or (f"segment ends at offset {scan.next_offset} but the next "
                                 f"segment starts at {next_offset}")
        problem = Problem(segment.path, scan.valid_bytes, scan.next_offset,
                          f"{message}; offsets {scan.next_offset}..{next_offset - 1} are "
                          "not served")
        logger.error("corrupt data: %s", problem)
        self.problems.append(problem)
        segment.mark_corrupt(problem)
        segment.next_offset = next_offset
        # Keep no index files, so every later open scans this segment again and reports it.
        segment.offset_index.delete()
        segment.time_index.delete()

    def _recover_tail(self, i: int) -> None:
        """Scan segment i (at or after the recovery point); cut it at its first invalid
        batch and delete the segments after it if it does not lead into them."""
        segment = self._segments[i]
        scan = self._scan(segment)
        later = self._segments[i + 1:]
        broken = scan.error is not None or (later and scan.next_offset != later[0].base_offset)
        if scan.valid_bytes < scan.file_bytes:
            logger.warning("%s: cutting %d bytes after byte %d (offset %d): %s", segment.path,
                           scan.file_bytes - scan.valid_bytes, scan.valid_bytes,
                           scan.next_offset, scan.error)
            self.probe.recovery_truncated_bytes_total += scan.file_bytes - scan.valid_bytes
            segment.truncate_to(scan.valid_bytes)
        if broken and later:
            logger.warning("%s: deleting %d later segment(s): offsets must follow on from "
                           "offset %d", segment.path, len(later), scan.next_offset)
            for dropped in later:
                self.probe.recovery_truncated_bytes_total += dropped.size_bytes
                dropped.delete()
            del self._segments[i + 1:]
        if i + 1 < len(self._segments):
            self._best_effort(segment.seal, f"writing the indexes of {segment.path}")

    def _sync_after_recovery(self, recovery_point: int) -> None:
        """Make what recovery kept durable: it may be page cache a killed process left."""
        for segment in self._segments:
            if segment.base_offset >= recovery_point or segment is self.active:
                segment.flush()
                self._best_effort(segment.flush_indexes, f"writing the indexes of {segment.path}")
        fsync_directory(self.directory)
        # Derived data on a possibly full disk: a log must open even then, or retention,
        # which frees space, could never run.
        self._best_effort(lambda: self._write_recovery_point(self.active.base_offset),
                          "moving the recovery point")

    def _read_recovery_point(self) -> int:
        try:
            text = (self.directory / RECOVERY_POINT_FILE).read_text()
            return int(text.strip())
        except FileNotFoundError:
            return 0
        except ValueError:
            logger.warning("%s: unreadable recovery point; scanning every segment",
                           self.directory / RECOVERY_POINT_FILE)
            return 0

    def _write_recovery_point(self, offset: int) -> None:
        """Atomically replace the recovery point file (write, fsync, rename, fsync dir)."""
        path = self.directory / RECOVERY_POINT_FILE
        tmp = path.with_name(path.name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{offset}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(self.directory)
        self.probe.fsyncs_total += 2
        self._recovery_point = offset
        self._dir_dirty = False

    # ---- append ------------------------------------------------------------------------

    def append(self, batch, partition_leader_epoch: int | None = None) -> tuple[int, int]:
        """Append one RecordBatch v2 (any buffer: bytes, memoryview, zmq frame), assigning
        its offsets. Returns (base_offset, last_offset). The bytes are in the page cache
        on return and durable once flushed_offset > last_offset.

        Raises InvalidBatchError (nothing written), DiskFullError or StorageError (nothing
        of the batch stays on disk; the log accepts appends again once the cause is gone).
        """
        self._check_online()
        view = memoryview(batch)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        last_offset_delta, max_timestamp_ms = self._check_batch(view)
        self._leave_clean_state()
        base_offset = self.log_end_offset
        last_offset = base_offset + last_offset_delta
        try:
            if self._should_roll(len(view), last_offset, max_timestamp_ms):
                self._roll()
            self.active.append(view, base_offset, last_offset, max_timestamp_ms,
                               partition_leader_epoch)
        except DiskFullError:
            self.probe.disk_full_total += 1
            raise
        self._unflushed_bytes += len(view)
        if self._first_unflushed_ms is None:
            self._first_unflushed_ms = mono_ms()
        self.probe.appended_batches_total += 1
        self.probe.appended_bytes_total += len(view)
        return base_offset, last_offset

    def _check_batch(self, view: memoryview) -> tuple[int, int]:
        """(lastOffsetDelta, maxTimestamp) of a batch that is exactly one valid batch."""
        size = len(view)
        if size > self.config.max_batch_bytes:
            raise RecordBatchTooLargeError(
                f"batch of {size} bytes is over max_batch_bytes = {self.config.max_batch_bytes}:"
                " send smaller batches", "too_large")
        if size < RECORD_BATCH_OVERHEAD:
            raise InvalidBatchError(f"{size} bytes cannot hold a batch header: send one "
                                    "whole RecordBatch v2", kernels.ERROR_NAMES[kernels.ERR_SHORT])
        declared_bytes = LOG_OVERHEAD + _INT32.unpack_from(view, LENGTH_OFFSET)[0]
        if declared_bytes != size:
            raise InvalidBatchError(f"batchLength says {declared_bytes} bytes but {size} were"
                                    " given: send exactly one batch per append", "length")
        code = kernels.validate_batch(np.frombuffer(view, np.uint8), 0, size,
                                      self.config.max_batch_bytes)
        if code != kernels.OK:
            raise InvalidBatchError(f"invalid batch: {kernels.ERROR_NAMES[code]}",
                                    kernels.ERROR_NAMES[code])
        last_offset_delta = _INT32.unpack_from(view, LAST_OFFSET_DELTA_OFFSET)[0]
        if last_offset_delta < 0:
            raise InvalidBatchError(f"lastOffsetDelta {last_offset_delta} is negative",
                                    "records")
        return last_offset_delta, _INT64.unpack_from(view, MAX_TIMESTAMP_OFFSET)[0]

    def _should_roll(self, batch_bytes: int, last_offset: int, max_timestamp_ms: int) -> bool:
        """Kafka's rule: a non-empty active segment rolls when the batch would overflow
        segment_bytes or the int32 relative offsets, or is segment_ms newer than the
        segment's first batch (or, without timestamps, the segment is that old)."""
        active = self.active
        if active.size_bytes == 0:
            return False
        if active.size_bytes + batch_bytes > self.config.segment_bytes:
            return True
        if last_offset - active.base_offset > INT32_MAX:
            return True
        first_ms = active.rolling_base_timestamp_ms
        if first_ms > NO_TIMESTAMP and max_timestamp_ms > NO_TIMESTAMP:
            return max_timestamp_ms - first_ms > self.config.segment_ms
        return wall_ms() - active.created_ms > self.config.segment_ms

    def _roll(self) -> None:
        """Start a new active segment at log_end_offset. The old one is sealed (indexes
        written) and fsynced by the next flush. On error nothing changed."""
        old = self.active
        try:
            new = Segment.create(self.directory, self.log_end_offset,
                                 self.config.index_interval_bytes, wall_ms())
        except OSError as err:
            raise storage_error(err, f"creating a segment in {self.directory}") from err
        try:
            old.seal()
        except OSError as err:
            new.delete()
            raise storage_error(err, f"writing the indexes of {old.path}") from err
        self._segments.append(new)
        self._base_offsets.append(new.base_offset)
        self._unsynced.append(old)
        self._dir_dirty = True
        self.probe.segments_rolled_total += 1

    # ---- group commit ------------------------------------------------------------------

    def flush(self) -> int:
        """One fdatasync of the active segment (after any segment rolled since the last
        flush) covering every append so far. Returns the new flushed_offset.

        An OSError here takes the log offline (LogOfflineError): after a failed fsync the
        kernel may have dropped the dirty pages, so only a reopen can tell what is on disk.
        """
        self._check_online()
        end = self.log_end_offset
        if end == self._flushed_offset and not self._unsynced and not self._dir_dirty:
            return end
        try:
            for segment in self._unsynced:
                segment.flush()
                self._best_effort(segment.flush_indexes, f"writing the indexes of {segment.path}")
                self.probe.fsyncs_total += 3
            self.active.flush()
            self.probe.fsyncs_total += 1
            if self._dir_dirty:
                fsync_directory(self.directory)  # new segment files must survive a crash
                self.probe.fsyncs_total += 1
            if self._recovery_point != self.active.base_offset:
                self._best_effort(lambda: self._write_recovery_point(self.active.base_offset),
                                  "moving the recovery point")
        except OSError as err:
            self._offline = err
            raise LogOfflineError(err.errno or 0, f"fsync in {self.directory} failed ({err}):"
                                  " the log is offline; restart to recover it") from err
        assert self._flushed_offset <= end <= self.log_end_offset
        self._unsynced.clear()
        self._dir_dirty = False
        self._flushed_offset = end
        self._unflushed_bytes = 0
        self._first_unflushed_ms = None
        self.probe.flushes_total += 1
        return end

    def _best_effort(self, action, what: str) -> None:
        """Run a metadata write whose failure costs only a longer scan at the next open
        (indexes are rebuilt from the log; an older recovery point scans more), never
        data: on a full disk it must not take the log offline."""
        try:
            action()
        except OSError as err:
            logger.warning("%s in %s failed (%s): the next open scans more", what, self.directory, err)

    def flush_start(self) -> tuple[int, int] | None:
        """Begin a group commit that another thread can finish: (fd, target_offset) when
        one fdatasync of the active segment is all that is needed, else None (a roll or
        a new file needs the full flush(): call it instead).

        The caller runs os.fdatasync(fd) anywhere, then calls flush_done(target_offset)
        (or flush_failed) on the log's own thread. Appends may go on meanwhile: they are
        not covered by this flush and count towards the next one. The fd stays open
        until flush_done: the caller must not close() or apply_retention() in between.
        """
        self._check_online()
        if self._unsynced or self._dir_dirty or self._recovery_point != self.active.base_offset:
            return None
        target = self.log_end_offset
        self._unflushed_bytes = 0
        self._first_unflushed_ms = None
        return self.active.fileno(), target

    def flush_done(self, target_offset: int) -> None:
        """The fdatasync begun by flush_start returned: offsets below target are durable."""
        assert target_offset <= self.log_end_offset, (target_offset, self.log_end_offset)
        self._flushed_offset = max(self._flushed_offset, target_offset)
        self.probe.fsyncs_total += 1
        self.probe.flushes_total += 1

    def flush_failed(self, err: OSError) -> None:
        """The fdatasync begun by flush_start failed: the log goes offline (see flush)."""
        self._offline = err

    def flush_due(self, now_ms: int | None = None) -> bool:
        """True when the group-commit policy wants a flush: flush_bytes are unsynced, or
        the oldest unsynced append is flush_interval_ms old. now_ms is monotonic (mono_ms)."""
        if self._first_unflushed_ms is None:
            return False
        if self._unflushed_bytes >= self.config.flush_bytes:
            return True
        now_ms = mono_ms() if now_ms is None else now_ms
        return now_ms - self._first_unflushed_ms >= self.config.flush_interval_ms

    def flush_wait_ms(self, now_ms: int | None = None) -> int:
        """Milliseconds until flush_due becomes true (0 = now); flush_interval_ms if
        nothing is unsynced. now_ms is monotonic (mono_ms)."""
        if self._first_unflushed_ms is None:
            return self.config.flush_interval_ms
        if self._unflushed_bytes >= self.config.flush_bytes:
            return 0
        now_ms = mono_ms() if now_ms is None else now_ms
        return max(0, self._first_unflushed_ms + self.config.flush_interval_ms - now_ms)

    # ---- reads -------------------------------------------------------------------------

    def _segment_for(self, offset: int) -> Segment | None:
        """The segment holding `offset`; None for log_end_offset (nothing there yet)."""
        self._check_online()
        if not self.log_start_offset <= offset <= self.log_end_offset:
            raise OffsetOutOfRangeError(offset, self.log_start_offset, self.log_end_offset)
        if offset == self.log_end_offset:
            return None
        return self._segments[bisect_right(self._base_offsets, offset) - 1]

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding `offset`, up to max_bytes (at least one
        batch, however large; b"" at log_end_offset), all from one segment.
        Raises OffsetOutOfRangeError, or CorruptDataError in a corrupt region."""
        segment = self._segment_for(offset)
        if segment is None:
            return b""
        try:
            return segment.read(offset, max_bytes)[1]
        except StaleTrustError as err:
            logger.error("%s; scanning the segment", err)
            self._rescan(segment)
            return segment.read(offset, max_bytes)[1]  # scanned: validated, nothing trusted

    def _rescan(self, segment: Segment) -> None:
        """Scan a segment trusted at open whose bytes failed validation on read: rebuild its
        indexes and report any corrupt batch (never served). Nothing is cut: after a clean
        shutdown every byte was acknowledged; the active segment's appends move to a new
        segment instead."""
        self._leave_clean_state()
        i = self._segments.index(segment)
        if segment is not self.active:
            self._recover_sealed(segment, self._segments[i + 1].base_offset)
            return
        end = segment.next_offset
        scan = self._scan(segment)
        if scan.valid_bytes == scan.file_bytes:
            return
        problem = Problem(segment.path, scan.valid_bytes, scan.next_offset,
                          f"{scan.error}; offsets {scan.next_offset}..{end - 1} are not served")
        logger.error("corrupt data: %s", problem)
        self.problems.append(problem)
        segment.mark_corrupt(problem)
        segment.next_offset = end
        self._roll()

    def file_region(self, offset: int, max_bytes: int) -> tuple[int, int, int]:
        """(fd, position, length) of what read() would return, for os.sendfile. The fd
        stays valid until the segment is deleted by retention or the log closes."""
        segment = self._segment_for(offset)
        if segment is None:
            return self.active.fileno(), self.active.size_bytes, 0
        return (segment.fileno(), *segment.file_region(offset, max_bytes))

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """The first offset whose record timestamp is >= timestamp_ms, or None if every
        record is older (Kafka's ListOffsets by time). Kafka's special timestamps LATEST
        (-1) and EARLIEST (-2) are the caller's: log_end_offset and log_start_offset."""
        self._check_online()
        for segment in self._segments:
            if segment.max_timestamp_ms >= timestamp_ms:
                found = segment.find_offset_by_timestamp(timestamp_ms, self.log_start_offset)
                if found is not None:
                    return found
        return None

    # ---- retention ---------------------------------------------------------------------

    def apply_retention(self, now_ms: int | None = None, keep_from_offset: int | None = None) -> int:
        """Delete the oldest non-active segments whose newest record is older than
        retention_ms (wall clock now_ms), then those beyond retention_bytes in total,
        but none holding an offset >= keep_from_offset (data a reader, the uplink, still
        needs). log_start_offset moves to the first segment kept. Returns segments deleted."""
        self._check_online()
        now_ms = wall_ms() if now_ms is None else now_ms
        keep_from = self.log_end_offset if keep_from_offset is None else keep_from_offset
        deleted = 0
        if self.config.retention_ms >= 0:
            while (len(self._segments) > 1 and self._segments[1].base_offset <= keep_from
                   and now_ms - self._segments[0].largest_timestamp_ms > self.config.retention_ms):
                self._delete_oldest()
                deleted += 1
        if self.config.retention_bytes >= 0:
            total_bytes = self.size_bytes
            while (len(self._segments) > 1 and self._segments[1].base_offset <= keep_from
                   and total_bytes - self._segments[0].size_bytes >= self.config.retention_bytes):
                total_bytes -= self._segments[0].size_bytes
                self._delete_oldest()
                deleted += 1
        if deleted:
            # Deletions must not come back out of order after a crash.
            fsync_directory(self.directory)
        return deleted

    def _delete_oldest(self) -> None:
        self._leave_clean_state()
        segment = self._segments.pop(0)
        self._base_offsets.pop(0)
        if segment in self._unsynced:
            self._unsynced.remove(segment)
        self._flushed_offset = max(self._flushed_offset, self.log_start_offset)
        try:
            segment.delete()
        except OSError as err:
            raise storage_error(err, f"deleting {segment.path}") from err
        self.probe.segments_deleted_total += 1
        logger.info("retention deleted %s; log starts at offset %d", segment.path,
                    self.log_start_offset)

    # ---- close -------------------------------------------------------------------------

    def close(self) -> None:
        """Flush, seal the active segment's indexes, fsync them and leave the
        clean-shutdown marker so the next open skips the scan; a log untouched since its
        marker was written is only closed (no write, no fsync). Idempotent. After a failed
        flush (offline log) only the files are closed: the next open scans. If only the
        indexes cannot be written (a full disk), the data is flushed and no marker is
        left: the next open scans and rebuilds them."""
        if self._closed:
            return
        try:
            if self._clean_on_disk:
                pass  # untouched since the marker was written: the files are already clean
            elif self._offline is None:
                self.flush()
                try:
                    self.active.seal()
                    self.active.flush_indexes()
                except OSError as err:
                    logger.warning("writing the indexes of %s failed (%s): the next open scans",
                                   self.active.path, err)
                    return
                self._write_clean_marker()
                fsync_directory(self.directory)
        except OSError as err:
            raise storage_error(err, f"closing the log in {self.directory}") from err
        finally:
            self._closed = True
            for segment in self._segments:
                segment.close()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
