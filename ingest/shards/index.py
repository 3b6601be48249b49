"""Sparse offset and time indexes of one segment, in Kafka's file formats.

    NNNNNNNNNNNNNNNNNNNN.index      entries of 8 bytes, big-endian:
        relativeOffset int32   last offset of a batch, minus the segment's base offset
        position       int32   byte position of that batch in the .log
    NNNNNNNNNNNNNNNNNNNN.timeindex  entries of 12 bytes, big-endian:
        timestamp      int64   largest batch maxTimestamp seen so far in the segment
        relativeOffset int32   last offset of the batch that first reached it

Indexes are derived data: they carry no checksum and are rebuilt from the log whenever
they may be stale. Entries live in memory (two array('q') columns); the file is
append-only and written in bulk (`write`) when a segment is sealed or closed, since an
active segment's indexes are rebuilt by the scan after any unclean shutdown anyway.

Which batches get an entry follows Kafka's LogSegment: a batch is indexed when more than
index_interval_bytes of log lie between its position and the previous indexed batch's
position (or the segment start). The rule depends only on batch positions, so indexes
built while appending equal indexes rebuilt by a scan of the same bytes.
"""

import os
from array import array
from bisect import bisect_right

import numpy as np
from numba import njit

# Kafka's RecordBatch.NO_TIMESTAMP: a time index entry needs a timestamp above it.
NO_TIMESTAMP = -1
# Relative offsets and positions are int32 on disk.
INT32_MAX = 2**31 - 1


class _IndexFile:
    """Two int64 columns (keys strictly increasing) plus the file they are saved to."""

    ENTRY_BYTES = 0
    DISK_DTYPE: np.dtype

    def __init__(self, path: str, base_offset: int) -> None:
        self.path = path
        self.base_offset = base_offset
        self._keys = array("q")
        self._values = array("q")
        # The first _file_entries entries are on disk as they are in memory.
        self._file_entries = 0

    def __len__(self) -> int:
        return len(self._keys)

    def entries(self) -> list[tuple[int, int]]:
        return list(zip(self._keys, self._values))

    def _floor(self, key: int) -> int:
        """Row of the largest key <= `key`, or -1 if there is none."""
        return bisect_right(self._keys, key) - 1

    def _replace(self, keys: np.ndarray, values: np.ndarray) -> None:
        self._keys = array("q", np.asarray(keys, dtype=np.int64).tobytes())
        self._values = array("q", np.asarray(values, dtype=np.int64).tobytes())
        self._file_entries = 0

    def _truncate_rows(self, rows: int) -> None:
        del self._keys[rows:]
        del self._values[rows:]
        self._file_entries = min(self._file_entries, rows)

    def _encode(self, start: int) -> bytes:
        raise NotImplementedError

    def _decode(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def write(self) -> None:
        """Bring the file up to date with memory (page cache only, no fsync).

        On OSError the file is cut back to the entries it held before, so it never ends
        in a partial entry, and the error propagates; memory is unchanged.
        """
        file_bytes = self._file_entries * self.ENTRY_BYTES
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size != file_bytes:
                os.ftruncate(fd, file_bytes)
            data = self._encode(self._file_entries)
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], file_bytes + written)
            except OSError:
                os.ftruncate(fd, file_bytes)
                raise
            self._file_entries = len(self._keys)
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Write pending entries and fsync: on return the file on disk equals memory."""
        self.write()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> bool:
        """Read the file; True if it holds whole entries with strictly increasing keys.

        A missing or garbled file leaves the index empty and returns False: the caller
        rebuilds it from the log.
        """
        try:
            raw = np.fromfile(self.path, dtype=np.uint8)
        except FileNotFoundError:
            self._replace(np.empty(0), np.empty(0))
            return False
        if raw.size % self.ENTRY_BYTES:
            self._replace(np.empty(0), np.empty(0))
            return False
        keys, values = self._decode(raw)
        self._replace(keys, values)
        self._file_entries = len(self._keys)
        if keys.size > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            self._replace(np.empty(0), np.empty(0))
            return False
        return True

    def close(self) -> None:
        """Write pending entries; the index stays usable in memory."""
        self.write()

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class OffsetIndex(_IndexFile):
    """Offset -> position of the batch to start scanning from (Kafka's OffsetIndex)."""

    ENTRY_BYTES = 8
    DISK_DTYPE = np.dtype([("relative_offset", ">i4"), ("position", ">i4")])

    def append(self, last_offset: int, position: int) -> None:
        """Index the batch at `position` whose last offset is `last_offset`."""
        assert not self._keys or last_offset > self._keys[-1], (last_offset, self._keys[-1])
        assert not self._values or position > self._values[-1], (position, self._values[-1])
        assert 0 <= last_offset - self.base_offset <= INT32_MAX and 0 <= position <= INT32_MAX
        self._keys.append(last_offset)
        self._values.append(position)

    def lookup(self, offset: int) -> tuple[int, int]:
        """(offset, position) of the last entry with offset <= `offset`, or
        (base_offset, 0) if none: the batch holding `offset` starts at or after it."""
        row = self._floor(offset)
        if row < 0:
            return self.base_offset, 0
        return self._keys[row], self._values[row]

    def floor_position(self, position: int) -> int:
        """The largest indexed batch position <= `position`, or 0."""
        row = bisect_right(self._values, position) - 1
        return self._values[row] if row >= 0 else 0

    @property
    def last_position(self) -> int:
        return self._values[-1] if self._values else 0

    def truncate_to(self, offset: int) -> None:
        """Drop every entry whose offset is >= `offset`."""
        self._truncate_rows(bisect_right(self._keys, offset - 1))

    def rebuild(self, last_offsets: np.ndarray, positions: np.ndarray) -> None:
        self._replace(last_offsets, positions)

    def is_consistent_with(self, next_offset: int, log_bytes: int) -> bool:
        """Entries lie inside a log of `log_bytes` bytes ending before `next_offset`."""
        if not self._keys:
            return True
        positions = np.frombuffer(self._values, np.int64)
        return (
            self._keys[0] >= self.base_offset
            and self._keys[-1] < next_offset
            and positions[0] >= 0
            and positions[-1] < log_bytes
            and bool(np.all(positions[1:] > positions[:-1]))
        )

    def _encode(self, start: int) -> bytes:
        out = np.empty(len(self._keys) - start, dtype=self.DISK_DTYPE)
        out["relative_offset"] = np.frombuffer(self._keys, np.int64)[start:] - self.base_offset
        out["position"] = np.frombuffer(self._values, np.int64)[start:]
        return out.tobytes()

    def _decode(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = raw.view(self.DISK_DTYPE)
        return rows["relative_offset"].astype(np.int64) + self.base_offset, rows["position"]


class TimeIndex(_IndexFile):
    """Timestamp -> offset to start a time search from (Kafka's TimeIndex)."""

    ENTRY_BYTES = 12
    DISK_DTYPE = np.dtype([("timestamp", ">i8"), ("relative_offset", ">i4")])

    def maybe_append(self, timestamp_ms: int, offset: int) -> bool:
        """Add (timestamp_ms, offset) if timestamp_ms is above the last entry's; True if added."""
        last_timestamp_ms = self._keys[-1] if self._keys else NO_TIMESTAMP
        if timestamp_ms <= last_timestamp_ms:
            return False
        assert not self._values or offset > self._values[-1], (offset, self._values[-1])
        assert 0 <= offset - self.base_offset <= INT32_MAX
        self._keys.append(timestamp_ms)
        self._values.append(offset)
        return True

    def lookup(self, timestamp_ms: int) -> tuple[int, int]:
        """(timestamp, offset) of the last entry with timestamp <= `timestamp_ms`, or
        (NO_TIMESTAMP, base_offset) if none. Every batch before the one holding that
        offset has a max timestamp below the entry's, so a search may start there."""
        row = self._floor(timestamp_ms)
        if row < 0:
            return NO_TIMESTAMP, self.base_offset
        return self._keys[row], self._values[row]

    @property
    def last_entry(self) -> tuple[int, int]:
        if not self._keys:
            return NO_TIMESTAMP, self.base_offset
        return self._keys[-1], self._values[-1]

    def truncate_to(self, offset: int) -> None:
        """Drop every entry whose offset is >= `offset`."""
        keep = len(self._values)
        while keep and self._values[keep - 1] >= offset:
            keep -= 1
        self._truncate_rows(keep)

    def remove_last(self) -> None:
        self._truncate_rows(len(self._keys) - 1)

    def rebuild(self, timestamps_ms: np.ndarray, offsets: np.ndarray) -> None:
        self._replace(timestamps_ms, offsets)

    def is_consistent_with(self, next_offset: int) -> bool:
        """Offsets increase and lie inside [base_offset, next_offset)."""
        if not self._values:
            return True
        offsets = np.frombuffer(self._values, np.int64)
        return (
            self._values[0] >= self.base_offset
            and self._values[-1] < next_offset
            and bool(np.all(offsets[1:] > offsets[:-1]))
        )

    def _encode(self, start: int) -> bytes:
        out = np.empty(len(self._keys) - start, dtype=self.DISK_DTYPE)
        out["timestamp"] = np.frombuffer(self._keys, np.int64)[start:]
        out["relative_offset"] = np.frombuffer(self._values, np.int64)[start:] - self.base_offset
        return out.tobytes()

    def _decode(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = raw.view(self.DISK_DTYPE)
        return rows["timestamp"], rows["relative_offset"].astype(np.int64) + self.base_offset


@njit(cache=True)
def _indexed_rows(positions, index_interval_bytes, rows):
    count = 0
    last_indexed_position = 0
    for row in range(positions.size):
        if positions[row] - last_indexed_position > index_interval_bytes:
            rows[count] = row
            count += 1
            last_indexed_position = positions[row]
    return count


def indexed_rows(positions: np.ndarray, index_interval_bytes: int) -> np.ndarray:
    """Rows of the batches (given by their positions, increasing) that get an index entry:
    each is the first batch more than index_interval_bytes past the previous indexed one.
    A numba loop: a segment of small batches has millions of rows to walk on recovery."""
    rows = np.empty(positions.size, dtype=np.int64)
    count = _indexed_rows(np.ascontiguousarray(positions, dtype=np.int64),
                          np.int64(index_interval_bytes), rows)
    return rows[:count]


def time_index_entries(rows: np.ndarray, last_offsets: np.ndarray,
                       max_timestamps_ms: np.ndarray, sealed: bool
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, offsets) of the time index of a segment whose batches are given.

    At each indexed row the entry is (largest max timestamp so far, last offset of the
    first batch that reached it), kept only if it beats the previous entry; a sealed
    segment ends with the entry for its overall largest timestamp, as Kafka appends one
    when it rolls or closes a segment.
    """
    if last_offsets.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    running_ms = np.maximum.accumulate(np.maximum(max_timestamps_ms, NO_TIMESTAMP))
    previous_ms = np.concatenate(([NO_TIMESTAMP], running_ms[:-1]))
    reached = np.where(max_timestamps_ms > previous_ms, np.arange(last_offsets.size), 0)
    reached_row = np.maximum.accumulate(reached)
    if sealed:
        rows = np.concatenate((rows, [last_offsets.size - 1])).astype(np.int64)
    candidate_ms = running_ms[rows]
    candidate_offsets = last_offsets[reached_row[rows]]
    # Keep a candidate only if it beats every earlier one (maybe_append's rule).
    best_before = np.concatenate(([NO_TIMESTAMP], np.maximum.accumulate(candidate_ms)[:-1]))
    keep = candidate_ms > best_before
    return candidate_ms[keep], candidate_offsets[keep]
