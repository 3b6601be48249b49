"""Bounded topic creation ([limits] topics_max) and drains of many idle partitions, on a
real appliance: topics past the limit are refused with TOPIC_LIMIT_REACHED (CREATE_TOPIC)
or dropped and counted (PUSH auto-create); a SIGTERM drain closes partitions nobody
wrote to since their last clean close without rewriting or fsyncing their files."""

from __future__ import annotations

import os
import time

import zmq

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec
from tests.support import Appliance, create_topic, eventually, fetch_all, metric_value

# Far inside systemd's TimeoutStopSec (and the appliance's own 20 s drain bound) even on
# a busy 2-core machine; the file checks below are the exact part of the promise.
IDLE_DRAIN_S_MAX = 10.0
IDLE_TOPICS = 150  # x 2 partitions


def topic_limit_drops(app: Appliance) -> float:
    return metric_value(app.metrics_text(), "ingest_records_dropped_total", reason="topic_limit")


def test_topics_past_topics_max_are_refused_to_clients_and_dropped_and_counted_for_push(tmp_path):
    app = Appliance(tmp_path / "data", workers=2, config_text="[limits]\ntopics_max = 3\n").start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        create_topic(app, "a", 2)
        create_topic(app, "b", 2)
        push.connect(app.worker_endpoints(0)[0])
        # Two new topics race for the last place: one is created and keeps its records,
        # the other's records (3 RECORD frames, or one BATCH frame of 2) are counted.
        for value in (b"c1", b"c2", b"c3"):
            push.send(wire.RecordMessage(topic="c", partition=0, value=value).encode())
        batch = batch_codec.encode_batch([batch_codec.Record(0, 5, None, b"d1"), batch_codec.Record(1, 6, None, b"d2")])
        push.send(wire.BatchMessage(topic="d", partition=0, batch=batch).encode())

        def settled() -> bool:
            topics = app.metadata()["topics"]
            new = [t for t in ("c", "d") if t in topics]
            stored = sum(len(fetch_all(app, t, 0)) for t in new)
            return len(topics) == 3 and len(new) == 1 and stored + topic_limit_drops(app) == 5
        assert eventually(settled, timeout_s=15), (app.metadata()["topics"], topic_limit_drops(app))

        reply = app.request(app.bootstrap, wire.CreateTopicRequest(topic="e", partitions=2))
        assert isinstance(reply, wire.ErrorReply) and reply.error_code == ErrorCode.TOPIC_LIMIT_REACHED, reply
        assert "topics_max is 3" in reply.message
        existing = app.request(app.bootstrap, wire.CreateTopicRequest(topic="a", partitions=2))
        assert isinstance(existing, wire.CreateTopicReply) and existing.document["created"] is False

        dropped = topic_limit_drops(app)
        push.send(wire.RecordMessage(topic="f", partition=0, value=b"f").encode())
        push.send(wire.RecordMessage(topic="a", partition=0, value=b"still served").encode())
        assert eventually(lambda: topic_limit_drops(app) == dropped + 1, timeout_s=10)
        assert eventually(lambda: [r.value for r in fetch_all(app, "a", 0)] == [b"still served"], timeout_s=10)
        assert sorted(app.metadata()["topics"]) == sorted(["a", "b", *(t for t in "cd" if t in app.metadata()["topics"])])
        assert app.stop() == 0
    finally:
        push.close()
        app.kill()


def partition_files(data_dir) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file in every partition directory."""
    files = {}
    for entry in os.scandir(data_dir):
        if entry.is_dir():
            for f in os.scandir(entry.path):
                st = f.stat()
                files[f"{entry.name}/{f.name}"] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return files


def test_a_sigterm_drain_of_many_idle_partitions_is_quick_and_rewrites_none_of_their_files(tmp_path):
    app = Appliance(tmp_path / "data", workers=2, config_text=f"[limits]\ntopics_max = {IDLE_TOPICS}\n").start()
    try:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(app.bootstrap)
        for i in range(IDLE_TOPICS):
            sock.send(wire.CreateTopicRequest(topic=f"idle{i}", partitions=2).encode())
            assert sock.poll(10_000) and isinstance(wire.decode_reply(sock.recv()), wire.CreateTopicReply)
        sock.close()
        create_topic(app, f"idle{IDLE_TOPICS - 1}", 2)  # waits until both workers know the last one
        for p in (0, 1):  # a few written partitions (with an idempotent producer) among the idle ones
            batch = batch_codec.encode_batch([batch_codec.Record(0, 5, None, b"v")], producer_id=7 + p,
                                             producer_epoch=0, base_sequence=0)
            reply = app.request(app.owner_router(p), wire.BatchMessage(topic="idle0", partition=p, batch=batch,
                                                                       acks=wire.Durability.FSYNC))
            assert isinstance(reply, wire.ProduceReply), reply
        assert app.stop() == 0
        at_first_stop = partition_files(app.data_dir)
        assert len(at_first_stop) >= IDLE_TOPICS * 2 * 3

        app.start()
        assert "recovered by scanning" not in app.log()
        started = time.monotonic()
        assert app.stop() == 0
        drain_s = time.monotonic() - started
        assert partition_files(app.data_dir) == at_first_stop, "a drain rewrote files of partitions nobody wrote to"
        assert drain_s < IDLE_DRAIN_S_MAX, f"SIGTERM drain of {IDLE_TOPICS * 2} idle partitions took {drain_s:.1f} s"
        # Exactly the files of the first, full close: every partition is marked clean.
        assert sum(name.endswith("/clean-shutdown") for name in at_first_stop) == IDLE_TOPICS * 2
    finally:
        app.kill()
