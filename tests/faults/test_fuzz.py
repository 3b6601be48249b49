"""Fuzzed frames on every endpoint for a while (seconds in quick mode, ten minutes in
soak mode), with acked producers running alongside.

The generator is the one of tests/test_appliance.py (valid frames of every request type,
then cut short, a few bytes overwritten, or replaced by random bytes), plus RecordBatches
with flipped bits. The promises: no worker dies of input, every acked record of the
producers beside the fuzz is stored exactly once at its offset, the topics the fuzz
creates stop at [limits] topics_max, a SIGTERM drain afterwards exits 0, and the data
directory passes `ingest check`.
"""

from __future__ import annotations

import time

import psutil
import zmq

from ingest.config import LimitsConfig
from ingest.net import wire
from ingest.shards import batch as batch_codec
from tests.faults.harness import (
    CONFIG,
    account,
    assert_data_dir_checks_clean,
    by_mode,
    rng_for,
    start_producers,
    stop_producers,
    verify,
)
from tests.support import Appliance, create_topic, eventually, metric_value

# How often the test looks at the worker processes while fuzzing.
LIVENESS_CHECK_INTERVAL_S = 1.0
# How often it times a METADATA request on the bootstrap endpoint (which the fuzz floods
# too): the answer's latency is recorded, not judged; liveness is judged on processes.
BOOTSTRAP_PROBE_INTERVAL_S = 10.0
BOOTSTRAP_TIMEOUT_MS = 60_000


def seed_frames() -> list[bytes]:
    batch = batch_codec.encode_batch([batch_codec.Record(0, 5, b"k", b"v"), batch_codec.Record(0, 6, None, b"w")])
    return [
        wire.RecordMessage(topic="fuzz", value=b"value", key=b"key", headers=(("h", b"v"),)).encode(),
        wire.RecordMessage(topic="fuzz", value=b"acked", partition=1, acks=wire.Durability.FSYNC).encode(),
        wire.BatchMessage(topic="fuzz", partition=0, batch=batch).encode(),
        wire.BatchMessage(topic="fuzz", partition=1, batch=batch, acks=wire.Durability.WRITTEN).encode(),
        wire.FetchRequest(topic="fuzz", partition=0, offset=0, max_bytes=1000).encode(),
        wire.OffsetCommitRequest(group="g", topic="fuzz", offsets=((0, 0),)).encode(),
        wire.ListOffsetsRequest(topic="fuzz", partition=0, timestamp_ms=-1).encode(),
        wire.CreateTopicRequest(topic="fuzz2", partitions=1).encode(),
        wire.MetadataRequest().encode(),
    ]


def mutate(rng, seeds: list[bytes]) -> bytes:
    frame = bytearray(rng.choice(seeds))
    mode = rng.randrange(4)
    if mode == 0:
        frame = frame[: rng.randrange(len(frame) + 1)]
    elif mode == 1:
        for _ in range(rng.randrange(1, 6)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif mode == 2:
        frame = bytearray(rng.randbytes(rng.randrange(0, 80)))
    else:  # one flipped bit: most often inside a batch, where only the CRC can tell
        bit = rng.randrange(len(frame) * 8)
        frame[bit // 8] ^= 1 << (bit % 8)
    return bytes(frame)


def test_fuzzed_frames_never_kill_a_worker_nor_touch_acked_records(tmp_path, ledger):
    row = ledger("fuzzed frames on every endpoint, acked producers alongside",
                 "no worker dies of input; acked records intact; ingest check clean")
    rng = rng_for("fuzz")
    seconds = by_mode(4, 600)
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    producers, sockets = [], []
    try:
        create_topic(app, "fuzz", 2)
        create_topic(app, "acked", 2)
        pids = app.worker_pids()
        producers = start_producers(app, "acked", [0, 1], first_id=4000)
        ctx = zmq.Context.instance()
        pulls = {app.worker_endpoints(w)[0] for w in (0, 1)}
        for endpoint in [app.bootstrap, *app.worker_endpoints(0), *app.worker_endpoints(1)]:
            s = ctx.socket(zmq.PUSH if endpoint in pulls else zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            sockets.append(s)
        dealers = [s for s in sockets if s.type == zmq.DEALER]
        seeds = seed_frames()
        workers = {w: psutil.Process(pid) for w, pid in pids.items()}
        frames, deadline, next_check, next_probe, latency_s_max = 0, time.monotonic() + seconds, 0.0, 0.0, 0.0
        while time.monotonic() < deadline:
            for _ in range(500):
                try:
                    rng.choice(sockets).send(mutate(rng, seeds), zmq.NOBLOCK)
                    frames += 1
                except zmq.Again:
                    pass
            for s in dealers:  # read replies as a client would, so they never pile up
                while s.poll(0):
                    s.recv()
            if time.monotonic() >= next_check:
                dead = [w for w, p in workers.items() if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
                assert not dead, f"worker(s) {dead} died of input after {frames} frames"
                next_check = time.monotonic() + LIVENESS_CHECK_INTERVAL_S
            if time.monotonic() >= next_probe:
                started = time.monotonic()
                app.metadata(timeout_ms=BOOTSTRAP_TIMEOUT_MS)
                latency_s_max = max(latency_s_max, time.monotonic() - started)
                next_probe = time.monotonic() + BOOTSTRAP_PROBE_INTERVAL_S
        row.rounds = 1
        row.notes.update({"seconds": seconds, "frames": frames,
                          "bootstrap_metadata_latency_s_max": round(latency_s_max, 2)})
        time.sleep(1.0)
        assert {w["id"]: w["pid"] for w in app.metadata(timeout_ms=BOOTSTRAP_TIMEOUT_MS)["workers"]} == pids, \
            "a worker was restarted"
        stop_producers(producers)
        verdict = verify(app, "acked", [0, 1], producers)
        account(row, verdict)
        verdict.assert_clean()
        assert eventually(lambda: metric_value(app.metrics_text(), "ingest_frames_invalid_total") > 0)
        row.notes["frames_invalid"] = int(metric_value(app.metrics_text(), "ingest_frames_invalid_total"))
        row.notes["topics"] = len(app.metadata(timeout_ms=BOOTSTRAP_TIMEOUT_MS)["topics"])
        assert row.notes["topics"] <= LimitsConfig().topics_max, "topic creation is not bounded"
        started = time.monotonic()
        assert app.stop() == 0
        row.notes["drain_s"] = round(time.monotonic() - started, 2)
    finally:
        for p in producers:
            p.request_stop()
        for s in sockets:
            s.close()
        app.kill()
    assert_data_dir_checks_clean(tmp_path / "data")
