"""One segment: a .log file of consecutive RecordBatch v2 and its two sparse indexes.

Contract (one appender, one thread):
- `append` puts a batch's bytes at the end of the .log in the page cache, or leaves the
  file exactly as it was and raises; `flush` makes everything appended durable.
- Reads only ever return whole batches from the readable prefix: batches that were
  validated by a scan or appended through `append`. A corrupt batch found in the file
  ends the readable prefix; offsets from there on raise CorruptDataError.
- The producer's bytes are never copied or modified: the broker-owned fields
  (baseOffset, partitionLeaderEpoch) are written from separate small buffers with one
  pwritev, which keeps the CRC valid since it covers neither.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.errors import CorruptDataError, DiskFullError, StorageError
from ingest.shards import kernels
from ingest.shards.batch import (READ_BATCH_BYTES_MAX, CorruptBatchError, UnsupportedCompressionError,
                                 decode_batch)
from ingest.shards.index import (
    INT32_MAX,
    NO_TIMESTAMP,
    OffsetIndex,
    TimeIndex,
    indexed_rows,
    time_index_entries,
)
from ingest.shards.layout import (
    BASE_OFFSET_OFFSET,
    LAST_OFFSET_DELTA_OFFSET,
    LENGTH_OFFSET,
    LOG_OVERHEAD,
    MAX_TIMESTAMP_OFFSET,
    PARTITION_LEADER_EPOCH_LENGTH,
    PARTITION_LEADER_EPOCH_OFFSET,
    RECORD_BATCH_OVERHEAD,
)

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
# Kafka names segment files by their base offset in 20 digits (fits any int64).
OFFSET_DIGITS = 20

# Header walks read this much at a time: a little more than the default index interval,
# so a lookup usually costs one pread.
HEADER_CHUNK_BYTES = 8192
# Rows per scan_batches call; a 256 MiB segment of 4 KiB batches fits in one call.
SCAN_CHUNK_BATCHES = 65536

_INT64 = struct.Struct(">q")
_INT32 = struct.Struct(">i")


def segment_file_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:0{OFFSET_DIGITS}d}{suffix}"


def parse_segment_file_name(name: str, suffix: str = LOG_SUFFIX) -> int | None:
    """Base offset of a segment file name like 00000000000000000042.log, else None."""
    stem = name[: -len(suffix)]
    if not name.endswith(suffix) or len(stem) != OFFSET_DIGITS or not stem.isdigit():
        return None
    return int(stem)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in a data directory: the file, the byte position in it, the offset
    expected there, and what is wrong."""

    file: str
    position: int
    offset: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.position}: offset {self.offset}: {self.message}"


class StaleTrustError(Exception):
    """Bytes trusted at open (clean shutdown) are not valid batches where the indexes
    point: rot at rest, or a garbled index. The segment needs a scan before serving."""


@dataclass(slots=True)
class ScanResult:
    """Valid, contiguous batches at the start of a .log, one array element per batch."""

    positions: np.ndarray
    base_offsets: np.ndarray
    last_offsets: np.ndarray
    max_timestamps_ms: np.ndarray
    sizes: np.ndarray
    valid_bytes: int  # bytes of valid batches from the start of the file
    file_bytes: int
    next_offset: int  # the offset the batch at valid_bytes should have
    error: str | None  # why the bytes at valid_bytes are not a valid batch

    @property
    def count(self) -> int:
        return int(self.positions.size)


def scan_log(path: str | Path, base_offset: int, max_batch_bytes: int) -> ScanResult:
    """Validate the batches of a .log from its start with the numba kernel.

    Stops at the first batch that is torn, fails validation, or breaks offset contiguity
    (its baseOffset is not the previous lastOffset + 1, or the first is not base_offset).
    """
    file_bytes = os.path.getsize(path)
    chunks: list[tuple[np.ndarray, ...]] = []
    position, code = 0, kernels.OK
    if file_bytes:
        buf = np.memmap(path, dtype=np.uint8, mode="r", shape=(file_bytes,))
        while position < file_bytes and code == kernels.OK:
            arrays = tuple(np.empty(SCAN_CHUNK_BATCHES, np.int64) for _ in range(5))
            count, position, code = kernels.scan_batches(buf, position, file_bytes,
                                                        max_batch_bytes, *arrays)
            chunks.append(tuple(a[:count] for a in arrays))
        del buf
    columns = [np.concatenate([c[i] for c in chunks]) if chunks else np.empty(0, np.int64)
               for i in range(5)]
    error = None if code == kernels.OK else f"invalid batch: {kernels.ERROR_NAMES[code]}"
    result = ScanResult(*columns, valid_bytes=position, file_bytes=file_bytes,
                        next_offset=base_offset, error=error)
    _cut_at_discontinuity(result, base_offset)
    return result


def _cut_at_discontinuity(result: ScanResult, base_offset: int) -> None:
    """Shorten `result` to its batches whose offsets follow on from base_offset."""
    if result.count:
        expected = np.concatenate(([base_offset], result.last_offsets[:-1] + 1))
        bad = (result.base_offsets != expected) | (result.last_offsets < result.base_offsets)
        bad |= result.last_offsets - base_offset > INT32_MAX
        if bad.any():
            row = int(np.argmax(bad))
            result.error = (f"batch has offsets {int(result.base_offsets[row])}.."
                            f"{int(result.last_offsets[row])} where {int(expected[row])} "
                            "was expected next")
            result.valid_bytes = int(result.positions[row])
            for name in ("positions", "base_offsets", "last_offsets", "max_timestamps_ms",
                         "sizes"):
                setattr(result, name, getattr(result, name)[:row])
    if result.count:
        result.next_offset = int(result.last_offsets[-1]) + 1


def storage_error(err: OSError, doing: str) -> StorageError:
    """The named error for an OSError: DiskFullError for ENOSPC/EDQUOT."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left while {doing}: free disk space and retry")
    return StorageError(err.errno or 0, f"I/O error while {doing}: {err}")


class Segment:
    """A .log and its .index/.timeindex, named by base offset, in one partition directory."""

    def __init__(self, directory: str | Path, base_offset: int, index_interval_bytes: int,
                 fd: int, created_ms: int) -> None:
        self.directory = Path(directory)
        self.base_offset = base_offset
        self.index_interval_bytes = index_interval_bytes
        self.path = str(self.directory / segment_file_name(base_offset, LOG_SUFFIX))
        self.offset_index = OffsetIndex(
            str(self.directory / segment_file_name(base_offset, INDEX_SUFFIX)), base_offset)
        self.time_index = TimeIndex(
            str(self.directory / segment_file_name(base_offset, TIME_INDEX_SUFFIX)), base_offset)
        self._fd = fd
        self.created_ms = created_ms
        self.size_bytes = 0
        # Reads never go past this; below size_bytes only when a corrupt batch is there.
        self.readable_bytes = 0
        # Bytes [0, unverified_bytes) were not validated by this process (trusted at open).
        self.unverified_bytes = 0
        self.corruption: Problem | None = None
        self.next_offset = base_offset
        self.max_timestamp_ms = NO_TIMESTAMP
        self.offset_of_max_timestamp = base_offset
        self._last_indexed_position = 0
        self._first_batch_timestamp_ms: int | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | Path, base_offset: int, index_interval_bytes: int,
               now_ms: int) -> Segment:
        """Create empty .log/.index/.timeindex files (not yet fsynced, nor the directory).
        Raises OSError, leaving no file behind."""
        log_path = Path(directory) / segment_file_name(base_offset, LOG_SUFFIX)
        fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        segment = cls(directory, base_offset, index_interval_bytes, fd, now_ms)
        try:
            segment.offset_index.write()
            segment.time_index.write()
        except OSError:
            segment.delete()
            raise
        return segment

    @classmethod
    def open(cls, directory: str | Path, base_offset: int, index_interval_bytes: int) -> Segment:
        """Open an existing segment; nothing is loaded until load_indexes or recover."""
        log_path = Path(directory) / segment_file_name(base_offset, LOG_SUFFIX)
        fd = os.open(log_path, os.O_RDWR | os.O_CLOEXEC)
        created_ms = os.fstat(fd).st_mtime_ns // 1_000_000
        segment = cls(directory, base_offset, index_interval_bytes, fd, created_ms)
        segment.size_bytes = segment.readable_bytes = os.fstat(fd).st_size
        # Trusted after a clean shutdown, but bits can rot while stopped: reads of what was
        # there before this open are validated before they are served (recover() clears it).
        segment.unverified_bytes = segment.size_bytes
        return segment

    def load_indexes(self, next_offset: int | None) -> bool:
        """Trust the files: load both indexes and take the size from the .log.

        `next_offset` is the next segment's base offset for a sealed segment; None for the
        active one, whose end is found by walking the headers after its last index entry.
        False if an index or the walk does not fit the log: then call recover().
        """
        if not (self.offset_index.load() and self.time_index.load()):
            return False
        if next_offset is None:
            next_offset = self._walk_to_end(self.offset_index.last_position)
            if next_offset is None:
                return False
        if not (self.offset_index.is_consistent_with(next_offset, self.size_bytes)
                and self.time_index.is_consistent_with(next_offset)):
            return False
        self.next_offset = next_offset
        self.max_timestamp_ms, self.offset_of_max_timestamp = self.time_index.last_entry
        self._last_indexed_position = self.offset_index.last_position
        return True

    def recover(self, max_batch_bytes: int) -> ScanResult:
        """Scan the .log and rebuild both indexes in memory from its valid prefix, as
        appending those batches would have built them (seal() adds the final entry).

        The file itself is not changed: the caller truncates it (truncate_to) or marks the
        rest corrupt (mark_corrupt) depending on whether it may have been acknowledged.
        """
        scan = scan_log(self.path, self.base_offset, max_batch_bytes)
        rows = indexed_rows(scan.positions, self.index_interval_bytes)
        self.offset_index.rebuild(scan.last_offsets[rows], scan.positions[rows])
        self.time_index.rebuild(*time_index_entries(
            rows, scan.last_offsets, scan.max_timestamps_ms, sealed=False))
        self._last_indexed_position = int(scan.positions[rows[-1]]) if rows.size else 0
        self.size_bytes = scan.file_bytes
        self.readable_bytes = scan.valid_bytes
        self.unverified_bytes = 0  # the scan validated every batch it kept
        self.next_offset = scan.next_offset
        self.max_timestamp_ms, self.offset_of_max_timestamp = NO_TIMESTAMP, self.base_offset
        if scan.count:
            row = int(np.argmax(scan.max_timestamps_ms))
            if scan.max_timestamps_ms[row] > NO_TIMESTAMP:
                self.max_timestamp_ms = int(scan.max_timestamps_ms[row])
                self.offset_of_max_timestamp = int(scan.last_offsets[row])
        self._first_batch_timestamp_ms = (int(scan.max_timestamps_ms[0]) if scan.count
                                          else None)
        return scan

    def mark_corrupt(self, problem: Problem) -> None:
        """Serve nothing from problem.position on."""
        self.corruption = problem
        self.readable_bytes = min(self.readable_bytes, problem.position)

    def truncate_to(self, position: int) -> None:
        """Cut the .log to `position` bytes, which must be the end of the readable prefix
        as set by recover(): on return the file holds exactly the batches before it."""
        assert position == self.readable_bytes, (position, self.readable_bytes)
        os.ftruncate(self._fd, position)
        self.size_bytes = position

    def seal(self) -> None:
        """Record the final time index entry and write both indexes (no fsync), as Kafka
        does when a segment stops being active. On OSError nothing changed in memory."""
        added = self.time_index.maybe_append(self.max_timestamp_ms, self.offset_of_max_timestamp)
        try:
            self.offset_index.write()
            self.time_index.write()
        except OSError:
            if added:
                self.time_index.remove_last()
            raise

    def flush(self) -> None:
        """fdatasync the .log: on return every appended byte is durable."""
        os.fdatasync(self._fd)

    def flush_indexes(self) -> None:
        """Write and fsync both index files."""
        self.offset_index.flush()
        self.time_index.flush()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def delete(self) -> None:
        """Close and remove the three files (the .log first: leftover indexes are ignored)."""
        self.close()
        for path in (self.path, self.offset_index.path, self.time_index.path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def fileno(self) -> int:
        return self._fd

    # ---- appending ---------------------------------------------------------------------

    def append(self, batch: memoryview, base_offset: int, last_offset: int,
               max_timestamp_ms: int, partition_leader_epoch: int | None = None) -> int:
        """Write `batch` (one validated RecordBatch v2) at the end with its baseOffset
        replaced, and its partitionLeaderEpoch if given. Returns the batch's position.

        On OSError the file is cut back to its previous size and a DiskFullError or
        StorageError is raised: no byte of the batch stays and the segment stays usable.
        """
        assert base_offset == self.next_offset, (base_offset, self.next_offset)
        assert last_offset - self.base_offset <= INT32_MAX
        assert self.readable_bytes == self.size_bytes, "append after a corrupt region"
        position = self.size_bytes
        buffers = [_INT64.pack(base_offset), batch[LENGTH_OFFSET:]]
        if partition_leader_epoch is not None:
            epoch_end = PARTITION_LEADER_EPOCH_OFFSET + PARTITION_LEADER_EPOCH_LENGTH
            buffers[1:] = [batch[LENGTH_OFFSET:PARTITION_LEADER_EPOCH_OFFSET],
                           _INT32.pack(partition_leader_epoch), batch[epoch_end:]]
        try:
            _pwrite_all(self._fd, buffers, position)
        except OSError as err:
            self._cut_back(position, err)
            raise storage_error(err, f"appending to {self.path}") from err
        size = len(batch)
        self.size_bytes = self.readable_bytes = position + size
        self.next_offset = last_offset + 1
        if self._first_batch_timestamp_ms is None and position == 0:
            self._first_batch_timestamp_ms = max_timestamp_ms
        if max_timestamp_ms > self.max_timestamp_ms:
            self.max_timestamp_ms, self.offset_of_max_timestamp = max_timestamp_ms, last_offset
        if position - self._last_indexed_position > self.index_interval_bytes:
            self.offset_index.append(last_offset, position)
            self.time_index.maybe_append(self.max_timestamp_ms, self.offset_of_max_timestamp)
            self._last_indexed_position = position
        return position

    def _cut_back(self, position: int, err: OSError) -> None:
        try:
            os.ftruncate(self._fd, position)
        except OSError as cut_err:
            raise StorageError(cut_err.errno or 0,
                               f"cannot cut {self.path} back to {position} bytes after "
                               f"{err}: {cut_err}; reopen the log to recover") from err

    # ---- reading -----------------------------------------------------------------------

    def _headers(self, start: int, stop: int):
        """(position, base_offset, last_offset, max_timestamp_ms, size) of each batch from
        `start` (a batch boundary) to `stop`; ends early at a header that cannot be right."""
        chunk, chunk_start = b"", start
        position = start
        while position < stop:
            at = position - chunk_start
            if at + RECORD_BATCH_OVERHEAD > len(chunk):
                chunk = os.pread(self._fd, min(HEADER_CHUNK_BYTES, stop - position), position)
                chunk_start, at = position, 0
                if len(chunk) < RECORD_BATCH_OVERHEAD:
                    return
            size = LOG_OVERHEAD + _INT32.unpack_from(chunk, at + LENGTH_OFFSET)[0]
            if size < RECORD_BATCH_OVERHEAD or position + size > stop:
                return
            base_offset = _INT64.unpack_from(chunk, at + BASE_OFFSET_OFFSET)[0]
            last_offset = base_offset + _INT32.unpack_from(chunk, at + LAST_OFFSET_DELTA_OFFSET)[0]
            max_timestamp_ms = _INT64.unpack_from(chunk, at + MAX_TIMESTAMP_OFFSET)[0]
            yield position, base_offset, last_offset, max_timestamp_ms, size
            position += size

    def _walk_to_end(self, start: int) -> int | None:
        """Next offset after the batches from `start` to the end of the file, or None if
        their headers do not tile the file exactly."""
        if start == self.size_bytes:
            return self.base_offset if start == 0 else None
        end, next_offset = start, None
        for position, _, last_offset, _, size in self._headers(start, self.size_bytes):
            end, next_offset = position + size, last_offset + 1
        return next_offset if end == self.size_bytes else None

    def _corrupt(self, offset: int) -> CorruptDataError:
        if self.corruption is not None:
            return CorruptDataError(self.path, self.corruption.position, offset, self.next_offset)
        return CorruptDataError(self.path, self.readable_bytes, offset, self.next_offset)

    def find_position(self, offset: int) -> int:
        """Position of the batch holding `offset`, which must be in [base_offset,
        next_offset). Raises CorruptDataError if that batch is not in the readable prefix."""
        entry_offset, entry_position = self.offset_index.lookup(offset)
        if entry_offset == offset and entry_position < self.readable_bytes:
            return entry_position  # an entry names the batch whose last offset it is
        for position, _, last_offset, _, _ in self._headers(entry_position, self.readable_bytes):
            if last_offset >= offset:
                return position
        raise self._corrupt(offset)

    def whole_batches_end(self, position: int, max_bytes: int) -> int:
        """End of the last whole batch within max_bytes from `position` (a batch start in
        the readable prefix); at least one batch, however large."""
        limit = min(position + max_bytes, self.readable_bytes)
        # Batches before an indexed position <= limit all fit: walk only from there.
        start = max(position, self.offset_index.floor_position(limit))
        end = start
        for batch_position, _, _, _, size in self._headers(start, self.readable_bytes):
            if batch_position + size > limit and end > position:
                break
            end = batch_position + size
            if end >= limit:
                break
        if end == position:
            raise self._corrupt(self.next_offset)
        return end

    def file_region(self, offset: int, max_bytes: int) -> tuple[int, int]:
        """(position, length) of whole batches from the one holding `offset`, at most
        max_bytes unless the first batch alone is larger: for os.sendfile on fileno()."""
        position = self.find_position(offset)
        return position, self.whole_batches_end(position, max_bytes) - position

    def read(self, offset: int, max_bytes: int) -> tuple[int, bytes]:
        """(position, bytes) of whole batches from the one holding `offset`, as file_region.

        Bytes this process did not validate itself (trusted at open) are validated first;
        if they do not hold valid batches where the indexes say, StaleTrustError: the
        caller rescans the segment (as after a crash) and reads again."""
        position, length = self.file_region(offset, max_bytes)
        data = os.pread(self._fd, length, position)
        if len(data) != length:
            raise StorageError(0, f"{self.path} is shorter than expected at byte {position}")
        if position < self.unverified_bytes:
            buf = np.frombuffer(data, np.uint8)
            _, code, _ = kernels.verify_batches(buf, 0, buf.size, READ_BATCH_BYTES_MAX)
            if code != kernels.OK:
                raise StaleTrustError(f"{self.path}: {kernels.ERROR_NAMES[code]} in bytes read from {position}")
        return position, data

    def find_offset_by_timestamp(self, timestamp_ms: int, start_offset: int) -> int | None:
        """The first offset >= start_offset whose record timestamp is >= timestamp_ms in
        the readable prefix, or None. For a compressed batch, its base offset."""
        _, entry_offset = self.time_index.lookup(timestamp_ms)
        _, start = self.offset_index.lookup(max(entry_offset, start_offset))
        for position, base_offset, last_offset, max_ts_ms, size in self._headers(
                start, self.readable_bytes):
            if max_ts_ms >= timestamp_ms and last_offset >= start_offset:
                return self._first_record_at(position, size, timestamp_ms, start_offset)
        return None

    def _first_record_at(self, position: int, size: int, timestamp_ms: int,
                         start_offset: int) -> int:
        data = os.pread(self._fd, size, position)
        try:
            header, records = decode_batch(data)
        except (UnsupportedCompressionError, CorruptBatchError):
            # Records unreadable here: the batch's first offset never skips a match.
            return max(_INT64.unpack_from(data, BASE_OFFSET_OFFSET)[0], start_offset)
        for record in records:
            if record.offset >= start_offset and record.timestamp_ms >= timestamp_ms:
                return record.offset
        return max(header.last_offset, start_offset)

    # ---- time --------------------------------------------------------------------------

    @property
    def rolling_base_timestamp_ms(self) -> int:
        """The first batch's max timestamp (Kafka rolls by time from it), or -1."""
        if self._first_batch_timestamp_ms is None:
            if self.readable_bytes < RECORD_BATCH_OVERHEAD:
                return NO_TIMESTAMP
            header = os.pread(self._fd, RECORD_BATCH_OVERHEAD, 0)
            self._first_batch_timestamp_ms = _INT64.unpack_from(header, MAX_TIMESTAMP_OFFSET)[0]
        return self._first_batch_timestamp_ms

    @property
    def largest_timestamp_ms(self) -> int:
        """Age reference for retention: the max timestamp, or the file's mtime if none."""
        if self.max_timestamp_ms > NO_TIMESTAMP:
            return self.max_timestamp_ms
        return os.stat(self.path).st_mtime_ns // 1_000_000


def _pwrite_all(fd: int, buffers: list, position: int) -> None:
    """pwritev until every byte is written. A short write (the last free blocks of a
    full disk) is retried with the rest, and the retry raises the real error."""
    pending = list(buffers)
    while pending:
        written = os.pwritev(fd, pending, position)
        if written == 0:
            raise OSError(errno.ENOSPC, "no progress writing the batch")
        position += written
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if written:
            pending[0] = memoryview(pending[0])[written:]
