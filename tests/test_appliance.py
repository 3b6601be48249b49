"""The appliance as processes: supervisor, workers, sockets, signals, systemd's notify socket.

Every test runs a real `ingest serve` on loopback and talks to it with raw ZeroMQ frames
built by the wire codec, the way a device or another client library would.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq
from kafka.partitioner.default import murmur2 as kafka_murmur2

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec
from tests.support import FAST_HEARTBEATS, Appliance, IdempotentSender, create_topic, eventually, fetch_all, metric_value

def test_push_records_land_on_kafkas_partitions_whichever_worker_receives_them(appliance):
    create_topic(appliance, "telemetry", 4)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(appliance.worker_endpoints(0)[0])  # every record to worker 0
    keys = [f"device-{i}".encode() for i in range(200)]
    for i in range(2000):
        push.send(wire.RecordMessage(topic="telemetry", key=keys[i % 200], value=b"r%d" % i).encode())
    push.close(linger=5000)
    expected = {p: [] for p in range(4)}
    for i in range(2000):
        expected[(kafka_murmur2(keys[i % 200]) & 0x7FFFFFFF) % 4].append(b"r%d" % i)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = {p: [r.value for r in fetch_all(appliance, "telemetry", p)] for p in range(4)}
        if sum(map(len, got.values())) >= 2000:
            break
        time.sleep(0.2)
    assert got == expected  # in order per partition, none lost, none extra
    assert eventually(lambda: metric_value(appliance.metrics_text(), "ingest_forwarded_records_total") > 0)


def test_unknown_topics_are_created_on_first_push(appliance):
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(appliance.worker_endpoints(1)[0])
    for i in range(10):
        push.send(wire.RecordMessage(topic="born-on-push", value=b"%d" % i).encode())
    push.close(linger=5000)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        topics = appliance.metadata()["topics"]
        if "born-on-push" in topics:
            n = topics["born-on-push"]["partitions"]
            values = sorted(r.value for p in range(n) for r in fetch_all(appliance, "born-on-push", p))
            if len(values) == 10:
                assert values == sorted(b"%d" % i for i in range(10))
                return
        time.sleep(0.2)
    pytest.fail("records pushed to a new topic never became readable")


def test_every_bad_request_gets_an_error_reply_with_a_code(appliance):
    create_topic(appliance, "t", 2)
    router0 = appliance.worker_endpoints(0)[1]
    cases = [
        (wire.FetchRequest(topic="missing", partition=0, offset=0, max_bytes=100, correlation_id=1),
         ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
        (wire.FetchRequest(topic="t", partition=1, offset=0, max_bytes=100, correlation_id=2), ErrorCode.NOT_OWNER),
        (wire.FetchRequest(topic="t", partition=0, offset=99, max_bytes=100, correlation_id=3),
         ErrorCode.OFFSET_OUT_OF_RANGE),
        (wire.RecordMessage(topic="t", value=b"x" * (2 << 20), partition=0, acks=2, correlation_id=4),
         ErrorCode.MESSAGE_TOO_LARGE),
    ]
    for request, code in cases:
        reply = appliance.request(router0, request)
        assert isinstance(reply, wire.ErrorReply) and reply.error_code == code, (request, reply)
        assert reply.correlation_id == request.correlation_id
    good = batch_codec.encode_batch([batch_codec.Record(0, 1, None, b"ok")])
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF  # the CRC no longer matches
    reply = appliance.request(router0, wire.BatchMessage(topic="t", partition=0, batch=bytes(corrupt), acks=2,
                                                         correlation_id=5))
    assert isinstance(reply, wire.ErrorReply) and reply.error_code == ErrorCode.CORRUPT_MESSAGE
    reply = appliance.request(router0, bytes([9]) + wire.PingRequest(correlation_id=6).encode()[1:])
    assert isinstance(reply, wire.ErrorReply) and reply.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert fetch_all(appliance, "t", 0) == []  # nothing refused was stored


def test_kill_9_of_a_worker_loses_and_duplicates_no_acked_record(appliance):
    create_topic(appliance, "acked", 2)
    senders = [IdempotentSender(appliance, "acked", p, producer_id=1000 + p) for p in range(2)]
    threads = [threading.Thread(target=s.run, args=(400, 5)) for s in senders]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = appliance.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert appliance.worker_pids()[0] != victim  # restarted by the supervisor
    for p, sender in enumerate(senders):
        stored = fetch_all(appliance, "acked", p)
        by_value = {}
        for r in stored:
            by_value.setdefault(r.value, []).append(r.offset)
        assert len(sender.acked) == 2000
        for value, offset in sender.acked.items():
            assert by_value.get(value) == [offset], (value, by_value.get(value), offset)
    assert eventually(lambda: metric_value(appliance.metrics_text(), "ingest_worker_restarts_total", worker="0") >= 1)


def test_sigterm_drains_writes_clean_markers_and_restart_skips_the_scan(tmp_path):
    app = Appliance(tmp_path / "data", workers=2).start()
    try:
        create_topic(app, "drained", 2)
        sender = IdempotentSender(app, "drained", 1, producer_id=7)
        sender.run(50, 10)
        assert app.stop() == 0
        for p in range(2):
            assert (tmp_path / "data" / f"drained-{p}" / "clean-shutdown").exists()
        app.start()
        assert "drained-1: clean shutdown, scan skipped" in app.log()
        stored = {r.value: r.offset for r in fetch_all(app, "drained", 1)}
        assert stored == sender.acked
    finally:
        app.kill()


def test_kill_9_of_the_whole_appliance_keeps_every_fsynced_ack(tmp_path):
    app = Appliance(tmp_path / "data", workers=2).start()
    try:
        create_topic(app, "crash", 2)
        senders = [IdempotentSender(app, "crash", p, producer_id=50 + p) for p in range(2)]
        threads = [threading.Thread(target=s.run, args=(10_000, 3)) for s in senders]
        for t in threads:
            t.start()
        time.sleep(1.5)
        app.kill()  # supervisor and workers at once, mid-write
        for s in senders:
            s.stop = True
        for t in threads:
            t.join(70)
        app.start()
        assert "recovered by scanning its tail" in app.log()
        for p, sender in enumerate(senders):
            stored = {r.value: r.offset for r in fetch_all(app, "crash", p)}
            assert sender.acked, "nothing was acked before the kill"
            for value, offset in sender.acked.items():
                assert stored.get(value) == offset
    finally:
        app.kill()
    check = subprocess.run([sys.executable, "-m", "ingest.cli", "check", str(tmp_path / "data")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sd_notify_ready_after_workers_and_watchdog_pauses_while_a_worker_is_stopped(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(0.2)
    app = Appliance(tmp_path / "data", workers=2, config_text=FAST_HEARTBEATS,
                    env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"})
    app.start(wait=False)
    try:
        messages = _collect(sock, until=lambda m: "READY=1" in m, timeout_s=60)
        assert any("READY=1" in m for m in messages)
        assert all(w["up"] for w in app.metadata()["workers"])  # READY only after every worker
        assert "WATCHDOG=1" in "".join(_collect(sock, timeout_s=1.0))
        stopped = app.worker_pids()[1]
        os.kill(stopped, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # past heartbeat_timeout_ms
            _collect(sock, timeout_s=0.1)  # drop what was queued before the stall was noticed
            assert "WATCHDOG=1" not in "".join(_collect(sock, timeout_s=1.5))
            assert app.http_status("/readyz") == 503
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert "WATCHDOG=1" in "".join(_collect(sock, timeout_s=2.0))
        assert app.stop() == 0
        assert "STOPPING=1" in "".join(_collect(sock, timeout_s=0.5))
    finally:
        app.kill()
        sock.close()


def _collect(sock, until=None, timeout_s: float = 1.0) -> list[str]:
    out, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until and until(out[-1]):
            break
    return out


def test_fuzzed_frames_on_every_endpoint_never_kill_a_worker(appliance, tmp_path):
    create_topic(appliance, "fuzz", 2)
    pids = appliance.worker_pids()
    rng = random.Random(11)
    seeds = [
        wire.RecordMessage(topic="fuzz", value=b"value", key=b"key", headers=(("h", b"v"),)).encode(),
        wire.BatchMessage(topic="fuzz", partition=0,
                          batch=batch_codec.encode_batch([batch_codec.Record(0, 5, b"k", b"v")])).encode(),
        wire.FetchRequest(topic="fuzz", partition=0, offset=0, max_bytes=1000).encode(),
        wire.OffsetCommitRequest(group="g", topic="fuzz", offsets=((0, 0),)).encode(),
        wire.ListOffsetsRequest(topic="fuzz", partition=0, timestamp_ms=-1).encode(),
        wire.CreateTopicRequest(topic="fuzz2", partitions=1).encode(),
        wire.MetadataRequest().encode(),
    ]
    ctx = zmq.Context.instance()
    endpoints = [appliance.bootstrap]
    for w in range(2):
        endpoints += appliance.worker_endpoints(w)
    sockets = []
    for ep in endpoints:
        s = ctx.socket(zmq.PUSH if ep in (appliance.worker_endpoints(0)[0], appliance.worker_endpoints(1)[0])
                       else zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        sockets.append(s)
    for _ in range(6000):
        frame = bytearray(rng.choice(seeds))
        mode = rng.randrange(3)
        if mode == 0:
            frame = frame[: rng.randrange(len(frame) + 1)]
        elif mode == 1:
            for _ in range(rng.randrange(1, 6)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        else:
            frame = bytearray(rng.randbytes(rng.randrange(0, 80)))
        rng.choice(sockets).send(bytes(frame))
    time.sleep(2.0)
    assert appliance.worker_pids() == pids, "a worker died of input"
    assert appliance.request(appliance.worker_endpoints(0)[1], wire.PingRequest(correlation_id=3))
    assert eventually(lambda: metric_value(appliance.metrics_text(), "ingest_frames_invalid_total") > 0)
    assert appliance.stop() == 0
    check = subprocess.run([sys.executable, "-m", "ingest.cli", "check", str(appliance.data_dir)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_expose_rates_offsets_latency_and_lag(appliance):
    from prometheus_client.parser import text_string_to_metric_families

    create_topic(appliance, "m", 2)
    sender = IdempotentSender(appliance, "m", 0, producer_id=99)
    sender.run(20, 5)
    reply = appliance.request(appliance.owner_router(0),
                              wire.OffsetCommitRequest(group="dashboards", topic="m", offsets=((0, 40),)))
    assert isinstance(reply, wire.OffsetCommitReply), reply

    def scraped():
        text = appliance.metrics_text()
        return text if metric_value(text, "ingest_consumer_group_lag_records", group="dashboards") == 60 else None

    assert eventually(scraped)
    text = appliance.metrics_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert metric_value(text, "ingest_records_received_total", topic="m") == 100
    assert metric_value(text, "ingest_log_end_offset", topic="m", partition="0") == 100
    assert metric_value(text, "ingest_log_flushed_offset", topic="m", partition="0") == 100
    assert metric_value(text, "ingest_produce_latency_seconds_count", acks="fsync") == 20
    assert metric_value(text, "ingest_fsync_duration_seconds_count") >= 1
    assert metric_value(text, "ingest_consumer_group_lag_seconds", group="dashboards") >= 0
    assert metric_value(text, "ingest_active_producers") == 1
    assert metric_value(text, "ingest_worker_up") == 2
    assert metric_value(text, "ingest_worker_resident_memory_bytes") > 0
    assert metric_value(text, "ingest_disk_free_bytes") > 0
    assert families["ingest_produce_latency_seconds"].type == "histogram"
    buckets = [s.value for s in families["ingest_produce_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative


def test_raw_listener_stores_each_frame_as_one_record_value(tmp_path):
    app = Appliance(tmp_path / "data", workers=2)
    raw_port = app.port + 30
    app.config_text = f'[[topic]]\nname = "raw"\npartitions = 2\nraw_port = {raw_port}\n'
    app.start()
    try:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{raw_port}")
        values = [b"\x00\x01binary-%d" % i for i in range(500)]
        before_ms = int(time.time() * 1000)
        for v in values:
            push.send(v)
        push.close(linger=5000)

        def stored():
            return [r for p in range(2) for r in fetch_all(app, "raw", p)]

        assert eventually(lambda: len(stored()) == 500, timeout_s=20)
        records = stored()
        assert sorted(r.value for r in records) == sorted(values)
        assert all(r.key is None and r.timestamp_ms >= before_ms for r in records)
        # one listener, so per-partition order is send order
        for p in range(2):
            got = [r.value for r in fetch_all(app, "raw", p)]
            assert got == [v for v in values if v in set(got)]
    finally:
        app.kill()


def test_workers_auto_gives_each_worker_only_its_own_partitions(tmp_path):
    app = Appliance(tmp_path / "data", workers="auto", config_text=FAST_HEARTBEATS)
    app.start()
    try:
        create_topic(app, "spread", 8)
        meta = app.metadata()
        count = meta["worker_count"]
        assert count == len(os.sched_getaffinity(0))

        def opened():
            return [w["status"].get("partitions") for w in app.metadata()["workers"]]

        assert eventually(lambda: opened() == [len(range(i, 8, count)) for i in range(count)]), opened()
    finally:
        app.kill()
