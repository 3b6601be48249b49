"""Disk full, and space coming back through retention rather than an operator
(tests/test_disk_full.py covers an operator deleting a file).

On a 6 MiB tmpfs nearly filled with ballast, an acked producer fills the rest: it gets
DISK_FULL and keeps retrying, as producers do. Old segments expire by retention_ms while
the disk is full; retention deletes them, and appends must resume by themselves. The
ballast stays: nothing but retention frees space. Every acked record retention did not
delete must be readable exactly once at its offset.
"""

from __future__ import annotations

import os
import time

import pytest

from ingest.net import wire
from tests.faults.harness import Verdict, account, by_mode, start_producers, stop_producers, verify_partition
from tests.support import Appliance, create_topic, eventually, small_tmpfs

TMPFS_BYTES = 6 << 20
# What the ballast leaves for the log: a few segments' worth.
FREE_FOR_LOG_BYTES = 1536 << 10
# retention_ms (3 s) plus heartbeats: afterwards only the active segment is left.
RETENTION_SETTLE_S = 4.5
# Segments expire this long after their newest record: longer than filling the free
# space takes, short enough for a quick test.
CONFIG = """
[server]
heartbeat_interval_ms = 100

[storage]
segment_bytes = 262144
retention_ms = 3000
"""


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, TMPFS_BYTES) as mount:
        yield mount


def test_disk_full_resumes_by_itself_once_retention_frees_space(small_disk, ledger):
    row = ledger("disk full, space freed by retention (not by an operator)",
                 "DISK_FULL is retriable; appends resume by themselves; retained acked records intact")
    seconds = by_mode(12, 120)
    app = Appliance(small_disk / "data", workers=1, config_text=CONFIG)
    app.log_path = small_disk.parent / "serve.log"  # not on the full disk: the log must be whole
    app.start()
    producers = []
    try:
        create_topic(app, "full", 1)
        stat = os.statvfs(small_disk)
        with open(small_disk / "ballast", "wb") as f:
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize - FREE_FOR_LOG_BYTES))
        producers = start_producers(app, "full", [0], first_id=6000, records_per_batch=1, value_bytes=16 << 10)
        producer = producers[0]
        assert eventually(lambda: producer.retriable_errors.get("DISK_FULL", 0) > 0 or producer.error, 30)
        assert producer.error is None, f"{producer.error}\n{app.log()[-3000:]}"
        acked_when_full = producer.batches_acked
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert producer.error is None, f"{producer.error}\n{app.log()[-3000:]}"
            time.sleep(0.2)
        stop_producers(producers)
        assert producer.batches_acked > acked_when_full + 10, "appends never resumed after the disk filled"
        # With the producers stopped nothing rolls any more: within retention_ms (3 s) plus
        # a heartbeat, retention has deleted every sealed segment and only the active one,
        # which retention never deletes, is left. Read the log start after that, from the
        # worker itself (a metrics snapshot may be a heartbeat old), so that retention
        # cannot move it while the records are read back.
        time.sleep(RETENTION_SETTLE_S)
        reply = app.request(app.owner_router(0), wire.ListOffsetsRequest(
            topic="full", partition=0, timestamp_ms=wire.EARLIEST_TIMESTAMP))
        start = reply.offset
        assert start > 0, "retention never deleted a segment"
        verdict: Verdict = verify_partition(app, "full", 0, producers, start=start)
        row.rounds = 1
        account(row, verdict)
        row.notes.update({"seconds": seconds, "disk_full_replies": producer.retriable_errors.get("DISK_FULL", 0),
                          "acked_then_deleted_by_retention": sum(o < start for o in producer.acked.values())})
        verdict.assert_clean()
        assert app.stop() == 0
    finally:
        for p in producers:
            p.request_stop()
        app.kill()
