"""Cutting a closed partition's log back to an offset: a follower dropping history the
leader does not have (Kafka's Log.truncateTo after OffsetsForLeaderEpoch).

Works on the directory of a closed log; the caller reopens it, and the open's recovery
scan rebuilds what was derived from the cut part (indexes, producer state). Cuts happen on
batch boundaries: the batch holding `offset` goes too, so the new log end may be a little
below `offset`, never above it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ingest.shards.log import CLEAN_SHUTDOWN_FILE, MAX_BATCH_BYTES_LIMIT, fsync_directory
from ingest.shards.segment import (INDEX_SUFFIX, LOG_SUFFIX, TIME_INDEX_SUFFIX, parse_segment_file_name,
                                   scan_log, segment_file_name)

log = logging.getLogger("ingest.replication")


def truncate_log_dir(directory: Path, offset: int) -> int:
    """Remove every batch holding an offset >= `offset` from the closed log in
    `directory`; returns the new log end offset. The next open scans the last segment."""
    directory = Path(directory)
    bases = sorted(b for b in (parse_segment_file_name(p.name) for p in directory.iterdir()) if b is not None)
    if not bases:
        return 0
    kept = [b for b in bases if b < offset] or bases[:1]
    for base in bases[len(kept):]:
        _remove_segment(directory, base)
    last = kept[-1]
    path = directory / segment_file_name(last, LOG_SUFFIX)
    scan = scan_log(path, last, MAX_BATCH_BYTES_LIMIT)
    cut_bytes, new_end = scan.valid_bytes, scan.next_offset
    for position, base_offset, last_offset in zip(scan.positions, scan.base_offsets, scan.last_offsets):
        if last_offset >= offset:
            cut_bytes, new_end = int(position), int(base_offset)
            break
    os.truncate(path, cut_bytes)
    for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):  # rebuilt by the open's scan
        try:
            os.unlink(directory / segment_file_name(last, suffix))
        except FileNotFoundError:
            pass
    try:
        os.unlink(directory / CLEAN_SHUTDOWN_FILE)  # the next open must scan
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(directory)
    log.warning("%s: truncated to offset %d (asked for %d), %d segment(s) removed",
                directory, new_end, offset, len(bases) - len(kept))
    assert new_end <= max(offset, last)
    return new_end


def _remove_segment(directory: Path, base: int) -> None:
    for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
        try:
            os.unlink(directory / segment_file_name(base, suffix))
        except FileNotFoundError:
            pass


def restart_log_dir(directory: Path, offset: int) -> None:
    """Replace the closed log in `directory` by an empty one that starts at `offset`: a
    follower further behind than the leader's retention (Kafka's
    truncateFullyAndStartAt). Producer state and epochs go with the records."""
    directory = Path(directory)
    for path in directory.iterdir():
        if parse_segment_file_name(path.name) is not None:
            _remove_segment(directory, parse_segment_file_name(path.name))
    for name in (CLEAN_SHUTDOWN_FILE, "producer-state.json", "leader-epoch-checkpoint"):
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
    fd = os.open(directory / segment_file_name(offset, LOG_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    fsync_directory(directory)
    log.warning("%s: restarted empty at offset %d (the leader no longer has what came before)", directory, offset)
