"""`ingest check DATA_DIR`: verify every segment of every partition, offline.

Checks that every batch is valid (the numba scan: length, magic, CRC32C, records), that
offsets are contiguous between batches and between segments, and that every .index and
.timeindex entry agrees with the log. Reads only; never changes a file.

The active segment of a partition without a clean-shutdown marker is expected to be
stale (torn tail, indexes behind): the next open repairs it, so only its batches before a
torn tail are checked and its indexes are not.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.shards.index import NO_TIMESTAMP, OffsetIndex, TimeIndex
from ingest.shards.log import CLEAN_SHUTDOWN_FILE, MAX_BATCH_BYTES_LIMIT, RECOVERY_POINT_FILE
from ingest.shards.segment import (
    INDEX_SUFFIX,
    LOG_SUFFIX,
    TIME_INDEX_SUFFIX,
    Problem,
    ScanResult,
    parse_segment_file_name,
    scan_log,
    segment_file_name,
)

__all__ = ["Problem", "check_data_dir", "check_partition_dir", "main"]

# <topic>-<partition>, as Kafka names partition directories.
PARTITION_DIR_RE = re.compile(r"^(?P<topic>.+)-(?P<partition>\d+)$")


@dataclass(slots=True)
class CheckStats:
    partitions: int = 0
    segments: int = 0
    batches: int = 0
    log_bytes: int = 0


def check_data_dir(path: str | os.PathLike) -> list[Problem]:
    """Every problem found in every partition directory under `path`; [] if all is well."""
    return _check_data_dir(Path(path), CheckStats())


def _check_data_dir(path: Path, stats: CheckStats) -> list[Problem]:
    problems: list[Problem] = []
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and PARTITION_DIR_RE.match(entry.name):
            stats.partitions += 1
            problems += check_partition_dir(entry, stats)
    return problems


def check_partition_dir(directory: str | os.PathLike,
                        stats: CheckStats | None = None) -> list[Problem]:
    """Every problem in one partition directory."""
    directory = Path(directory)
    stats = stats if stats is not None else CheckStats()
    problems: list[Problem] = []
    base_offsets = sorted(b for b in map(parse_segment_file_name, os.listdir(directory))
                          if b is not None)
    clean = (directory / CLEAN_SHUTDOWN_FILE).exists()
    problems += _check_recovery_point(directory)
    expected_base: int | None = None
    for i, base_offset in enumerate(base_offsets):
        path = str(directory / segment_file_name(base_offset, LOG_SUFFIX))
        scan = scan_log(path, base_offset, MAX_BATCH_BYTES_LIMIT)
        stats.segments += 1
        stats.batches += scan.count
        stats.log_bytes += scan.file_bytes
        if expected_base is not None and base_offset != expected_base:
            problems.append(Problem(path, 0, expected_base,
                                    f"segment starts at offset {base_offset} but the previous "
                                    f"one ends before offset {expected_base}"))
        unrecovered = i == len(base_offsets) - 1 and not clean
        if scan.error is not None:
            note = " (torn tail of an unclean shutdown: the next open cuts it)" if unrecovered else ""
            problems.append(Problem(path, scan.valid_bytes, scan.next_offset, scan.error + note))
        if not unrecovered:
            sealed = i < len(base_offsets) - 1 or clean
            problems += _check_offset_index(directory, base_offset, scan)
            problems += _check_time_index(directory, base_offset, scan, sealed)
        expected_base = scan.next_offset if scan.error is None else None
    return problems


def _check_recovery_point(directory: Path) -> list[Problem]:
    path = directory / RECOVERY_POINT_FILE
    try:
        int(path.read_text().strip())
    except FileNotFoundError:
        return []
    except ValueError:
        return [Problem(str(path), 0, 0, "not a decimal offset: the next open scans every "
                                         "segment")]
    return []


def _load_index(index: OffsetIndex | TimeIndex, base_offset: int) -> Problem | None:
    if not os.path.exists(index.path):
        return Problem(index.path, 0, base_offset, "missing: the next open rebuilds it")
    size = os.path.getsize(index.path)
    if size % index.ENTRY_BYTES:
        return Problem(index.path, size - size % index.ENTRY_BYTES, base_offset,
                       f"size {size} is not a whole number of {index.ENTRY_BYTES}-byte entries")
    if not index.load():
        return Problem(index.path, 0, base_offset, "entries are not in increasing order")
    return None


def _check_offset_index(directory: Path, base_offset: int, scan: ScanResult) -> list[Problem]:
    """Each entry must name a batch of the log: (its last offset, its position)."""
    index = OffsetIndex(str(directory / segment_file_name(base_offset, INDEX_SUFFIX)), base_offset)
    problem = _load_index(index, base_offset)
    if problem is not None:
        return [problem]
    for k, (offset, position) in enumerate(index.entries()):
        row = int(np.searchsorted(scan.positions, position))
        if row >= scan.count or scan.positions[row] != position:
            return [Problem(index.path, k * index.ENTRY_BYTES, offset,
                            f"entry points at byte {position} of the log, which is not the "
                            "start of a valid batch")]
        if scan.last_offsets[row] != offset:
            return [Problem(index.path, k * index.ENTRY_BYTES, offset,
                            f"entry says offset {offset} but the batch at byte {position} "
                            f"ends at offset {int(scan.last_offsets[row])}")]
    return []


def _check_time_index(directory: Path, base_offset: int, scan: ScanResult,
                      sealed: bool) -> list[Problem]:
    """Each entry (T, O): O is in the log, T is the largest timestamp up to O's batch and
    that batch is where it was reached; a sealed segment's last entry is its largest."""
    index = TimeIndex(str(directory / segment_file_name(base_offset, TIME_INDEX_SUFFIX)),
                      base_offset)
    problem = _load_index(index, base_offset)
    if problem is not None:
        return [problem]
    running_ms = np.maximum.accumulate(scan.max_timestamps_ms)
    for k, (timestamp_ms, offset) in enumerate(index.entries()):
        row = int(np.searchsorted(scan.last_offsets, offset))
        if row >= scan.count or scan.base_offsets[row] > offset:
            return [Problem(index.path, k * index.ENTRY_BYTES, offset,
                            "entry names an offset that is not in the log")]
        if running_ms[row] != timestamp_ms or scan.max_timestamps_ms[row] != timestamp_ms:
            return [Problem(index.path, k * index.ENTRY_BYTES, offset,
                            f"entry says timestamp {timestamp_ms} but the largest timestamp "
                            f"up to offset {offset} is {int(running_ms[row])}")]
    largest_ms = int(running_ms[-1]) if scan.count else NO_TIMESTAMP
    last_ms = index.last_entry[0]
    if sealed and largest_ms > NO_TIMESTAMP and last_ms != largest_ms:
        return [Problem(index.path, max(len(index) - 1, 0) * index.ENTRY_BYTES, base_offset,
                        f"last entry has timestamp {last_ms} but the segment's largest is "
                        f"{largest_ms}: retention would misjudge the segment's age")]
    return []


def main(argv: list[str] | None = None) -> int:
    """`ingest check DATA_DIR`: one line per problem and exit 1, or a summary and exit 0."""
    parser = argparse.ArgumentParser(
        prog="ingest check",
        description="Verify every segment of every partition under DATA_DIR, offline.")
    parser.add_argument("data_dir", help="the appliance's data directory")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"ingest check: {data_dir} is not a directory", file=sys.stderr)
        return 2
    stats = CheckStats()
    problems = _check_data_dir(data_dir, stats)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {data_dir}", file=sys.stderr)
        return 1
    print(f"ok: {stats.partitions} partition(s), {stats.segments} segment(s), "
          f"{stats.batches} batches, {stats.log_bytes} bytes checked in {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
