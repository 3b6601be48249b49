"""A full disk at the worst moments for one partition's log, hit exactly: right after a
segment roll, when the group commit also has to write the segment's indexes and the
recovery point; and when a log that crashed is reopened on a full disk.

The promise (docs/ARCHITECTURE.md, Storage): a failed write answers DISK_FULL and
appends resume by themselves once space is free. A full disk must therefore never take a
log offline (only a failed fdatasync may: then the kernel may have dropped dirty pages),
and must never keep a worker from opening its logs, since retention, which frees space,
runs only in a worker that is up. tests/faults/test_disk_full_retention.py meets the
roll case only when the disk happens to fill right there; here a tmpfs is filled page by
page so that every case is met on every run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from ingest.errors import DiskFullError, LogOfflineError
from ingest.shards import batch as batch_codec
from ingest.shards.log import Log, LogConfig
from tests.support import small_tmpfs

TMPFS_BYTES = 1 << 20
# Small segments of ~6 KiB batches: a roll every five appends.
CONFIG = LogConfig(segment_bytes=32 << 10, flush_interval_ms=0)
# Free pages to leave when the roll comes: from none to more than the roll, the batch,
# both index files and the recovery point need together.
FREE_PAGES_TRIED = range(0, 12)


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, TMPFS_BYTES) as mount:
        yield mount


def leave_free_pages(mount: Path, pages: int) -> Path:
    """A ballast file that leaves exactly `pages` free pages on the tmpfs."""
    stat = os.statvfs(mount)
    ballast = mount / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * ((stat.f_bavail - pages) * stat.f_frsize))
    assert os.statvfs(mount).f_bavail == pages
    return ballast


def batch(i: int) -> bytes:
    return batch_codec.encode_batch([batch_codec.Record(0, int(time.time() * 1000), None, b"%06d" % i * 1000)])


def fill_to_the_roll(log: Log) -> int:
    """Append until the next batch rolls the segment; flush; returns batches appended."""
    n = 0
    while log.active.size_bytes + len(batch(n)) <= CONFIG.segment_bytes:
        log.append(batch(n))
        n += 1
    log.flush()
    return n


def read_all(log: Log) -> list[bytes]:
    values, offset = [], log.log_start_offset
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 20)
        for pos, header in batch_codec.iter_batches(data):
            values += [r.value for r in batch_codec.decode_batch(data, pos)[1]]
            offset = header.last_offset + 1
    return values


def test_a_full_disk_right_after_a_segment_roll_never_takes_the_log_offline(small_disk, ledger):
    row = ledger("disk full right after a segment roll (log level, every free-page count)",
                 "DISK_FULL, never an offline log; appends resume once space is free")
    outcomes = {}
    for free_pages in FREE_PAGES_TRIED:
        directory = small_disk / f"log-{free_pages}"
        log = Log(directory, CONFIG)
        appended = fill_to_the_roll(log)
        ballast = leave_free_pages(small_disk, free_pages)
        steps = []
        try:
            log.append(batch(appended))  # rolls, then writes into the new segment
            appended += 1
            steps.append("appended")
            log.flush()
            steps.append("flushed")
        except DiskFullError:
            steps.append("DISK_FULL")
        except LogOfflineError as e:
            steps.append(f"offline: {e}")
        outcomes[free_pages] = steps
        ballast.unlink()
        if not steps[-1].startswith("offline"):
            log.append(batch(appended))
            appended += 1
            log.flush()
            log.close()
            reopened = Log(directory, CONFIG)
            assert read_all(reopened) == [batch_codec.decode_batch(batch(i))[1][0].value for i in range(appended)]
            reopened.close()
        shutil.rmtree(directory)
        row.rounds += 1
    row.notes["outcomes"] = {k: " -> ".join(v) for k, v in outcomes.items()}
    offline = {k: v for k, v in outcomes.items() if v[-1].startswith("offline")}
    assert not offline, f"free pages -> what happened: {offline}"


def test_a_crashed_log_reopens_on_a_full_disk(small_disk, ledger):
    """A worker killed on a full disk must come back: its logs open (recovery may not be
    able to write indexes or the recovery point, which are only optimisations) and every
    flushed record is served; once space is free, appends go on. Once with the index
    files as the crash left them, once with them lost (recovery must rebuild them)."""
    row = ledger("crashed log reopened on a full disk (log level)",
                 "opens, serves every flushed record, appends once space is free")
    failures = []
    for variant in ("indexes as left", "indexes lost"):
        directory = small_disk / variant.replace(" ", "-")
        crashed = Log(directory, CONFIG)
        appended = sum(fill_to_the_roll(crashed) for _ in range(3))  # three segments, then two more batches
        crashed.append(batch(appended))
        crashed.append(batch(appended + 1))
        appended += 2
        crashed.flush()
        # Never closed: no clean-shutdown marker, as after kill -9.
        expected = [batch_codec.decode_batch(batch(i))[1][0].value for i in range(appended)]
        if variant == "indexes lost":
            for index in directory.glob("*index"):
                index.unlink()
        ballast = leave_free_pages(small_disk, 0)
        row.rounds += 1
        row.acked_checked += len(expected)
        try:
            log = Log(directory, CONFIG)
        except OSError as e:
            failures.append(f"{variant}: the log does not open on a full disk: {e}")
            ballast.unlink()
            continue
        served = read_all(log)
        row.lost += len(set(expected) - set(served))
        assert served == expected, variant
        ballast.unlink()
        log.append(batch(appended))
        log.flush()
        log.close()
    assert not failures, "\n".join(failures)
