"""Disk full: acked producers get DISK_FULL, nothing acked before is lost, health says so,
and produce resumes by itself once space is free again."""

import os
import time

import pytest

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec
from tests.support import Appliance, create_topic, eventually, fetch_all, metric_value, small_tmpfs

TMPFS_BYTES = 6 << 20


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, TMPFS_BYTES) as mount:
        yield mount


def produce(app, value: bytes):
    batch = batch_codec.encode_batch([batch_codec.Record(0, int(time.time() * 1000), None, value)])
    return app.request(app.owner_router(0), wire.BatchMessage(topic="full", partition=0, batch=batch,
                                                              acks=wire.Durability.FSYNC))


def test_disk_full_refuses_with_disk_full_keeps_acked_and_resumes_when_space_returns(small_disk):
    ballast = small_disk / "ballast"
    app = Appliance(small_disk / "data", workers=1,
                    config_text="[server]\nheartbeat_interval_ms = 100\n").start()
    try:
        create_topic(app, "full", 1)
        with open(ballast, "wb") as f:  # leave about 1 MiB for the log
            f.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - (1 << 20)))
        acked, value = [], os.urandom(16 << 10)
        for i in range(200):
            reply = produce(app, value + b"%d" % i)
            if isinstance(reply, wire.ErrorReply):
                assert reply.error_code == ErrorCode.DISK_FULL, reply
                break
            acked.append((reply.base_offset, value + b"%d" % i))
        else:
            pytest.fail("the disk never filled")
        assert acked, "nothing fitted before the disk was full"
        # the next heartbeat carries the flag to the supervisor
        assert eventually(lambda: app.http_status("/healthz") == 503)
        assert metric_value(app.metrics_text(), "ingest_disk_full") == 1
        assert isinstance(produce(app, value + b"again"), wire.ErrorReply)  # a full-size batch still does not fit

        ballast.unlink()
        reply = produce(app, b"after")
        assert isinstance(reply, wire.ProduceReply), reply
        assert eventually(lambda: app.http_status("/healthz") == 200)
        stored = {r.offset: r.value for r in fetch_all(app, "full", 0)}
        for offset, v in acked:
            assert stored[offset] == v
        assert stored[reply.base_offset] == b"after"
        assert len(stored) == len(acked) + 1  # the refused appends left nothing behind
        assert app.stop() == 0
    finally:
        app.kill()
