"""Fire-and-forget records on a full disk: the accounting stays exact.

acks=0 promises nothing about storage, but every record a device managed to send must be
either stored or counted (`ingest_records_dropped_total`, `ingest_frames_invalid_total`),
also when the disk is full. Records go to one worker's PULL for both partitions, so half
of them are forwarded to the other worker as BATCH frames and meet the full disk there.
"""

from __future__ import annotations

import os
import time

import pytest
import zmq

from ingest.net import wire
from tests.faults.harness import by_mode, settled
from tests.support import Appliance, create_topic, metric_value, small_tmpfs

TMPFS_BYTES = 6 << 20
FREE_FOR_LOG_BYTES = 512 << 10
VALUE_BYTES = 1024
CONFIG = """
[server]
heartbeat_interval_ms = 100
"""
# Several heartbeats: every count a worker made is in the supervisor's metrics by then.
COUNTERS_SETTLE_S = 1.0


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, TMPFS_BYTES) as mount:
        yield mount


def test_push_records_on_a_full_disk_are_stored_or_counted_exactly(small_disk, ledger):
    row = ledger("PUSH (acks=0) onto a full disk, half of it forwarded between workers",
                 "every record sent is stored or counted as dropped or invalid")
    records = by_mode(4000, 40_000)  # several times what fits
    app = Appliance(small_disk / "data", workers=2, config_text=CONFIG)
    app.log_path = small_disk.parent / "serve.log"  # not on the full disk: the log must be whole
    app.start()
    try:
        create_topic(app, "pushfull", 2)
        stat = os.statvfs(small_disk)
        with open(small_disk / "ballast", "wb") as f:
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize - FREE_FOR_LOG_BYTES))
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 30_000)
        sock.connect(app.worker_endpoints(0)[0])
        sent = would_block = 0
        for i in range(records):
            frame = wire.RecordMessage(topic="pushfull", value=b"%08d" % i * (VALUE_BYTES // 8), partition=i % 2).encode()
            try:
                sock.send(frame, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                would_block += 1
        sock.close()  # lingers until every queued frame is handed over
        stored = settled(app, "pushfull", 2)

        time.sleep(COUNTERS_SETTLE_S)  # the last counts arrive with the next heartbeats
        text = app.metrics_text()
        dropped = metric_value(text, "ingest_records_dropped_total")
        invalid = metric_value(text, "ingest_frames_invalid_total")
        row.rounds = 1
        row.notes.update({"sent": sent, "would_block": would_block, "stored": stored,
                          "dropped": int(dropped), "invalid": int(invalid),
                          "dropped_by_reason": {r: int(metric_value(text, "ingest_records_dropped_total", reason=r))
                                                for r in ("disk_full", "storage_error", "forward_queue_full")}})
        assert metric_value(text, "ingest_disk_full") == 1 or dropped > 0, "the disk never filled"
        assert sent == stored + dropped + invalid, row.notes
        assert app.stop() == 0
    finally:
        app.kill()
