"""Stream processors end to end: records pushed over ZeroMQ into a real appliance, the
sink read back with the SDK, compared with a brute-force computation over the source."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time

import orjson
import pytest
import zmq

from ingest import Consumer, Producer
from ingest.net import wire
from tests.support import FAST_HEARTBEATS, Appliance, eventually, fetch_all, metric_value
from tests.test_streams_windows import brute_force

WINDOW_MS, HOP_MS, GRACE_MS = 1000, 500, 300
BASE_MS = 1_700_000_000_000
PARTITIONS = 2

CONFIG = FAST_HEARTBEATS + f"""
[[topic]]
name = "telemetry"
partitions = {PARTITIONS}

[[processor]]
name = "temp-windows"
kind = "aggregate"
source = "telemetry"
sink = "temp-windows"
fields = ["temp_c"]
window_ms = {WINDOW_MS}
advance_ms = {HOP_MS}
grace_ms = {GRACE_MS}
aggregations = ["count", "min", "max", "sum", "mean", "first", "last"]

[[topic]]
name = "readings-bin"
partitions = {PARTITIONS}

[[processor]]
name = "bin-windows"
kind = "aggregate"
source = "readings-bin"
sink = "bin-windows"
format = "binary"
fields = ["temp_c"]
layout = {{ temp_c = "f32@2" }}
byte_order = "big"
window_ms = {WINDOW_MS}
advance_ms = {HOP_MS}
grace_ms = {GRACE_MS}
aggregations = ["count", "min", "max", "sum", "mean", "first", "last"]

[[processor]]
name = "hot"
kind = "alert"
source = "telemetry"
sink = "hot"
where = "temp_c > 80 and temp_c <= 95"

[[processor]]
name = "compact"
kind = "extract"
source = "telemetry"
sink = "compact"
fields = ["temp_c", "meta.fw"]
"""


def readings(count: int, seed: int) -> list[tuple[bytes, int, float]]:
    """(key, timestamp_ms, temp_c): mostly in order, some out of order within and beyond
    the grace period."""
    rng = random.Random(seed)
    out, t = [], BASE_MS
    for _ in range(count):
        t += rng.randrange(0, 40)
        skew = rng.choice([0, 0, 0, 0, rng.randrange(0, GRACE_MS), rng.randrange(GRACE_MS, 4 * WINDOW_MS)])
        out.append((b"dev-%d" % rng.randrange(12), t - skew, round(rng.uniform(0, 100), 2)))
    return out


def value_of(temp_c: float, fw: int = 7) -> bytes:
    return orjson.dumps({"temp_c": temp_c, "meta": {"fw": fw}, "pad": "x" * 40})


def binary_value_of(temp_c: float) -> bytes:
    """A fixed layout: 2 bytes of flags, temp_c as a big-endian float32, padding."""
    return b"\x00\x01" + struct.pack(">f", temp_c) + bytes(10)


def push(app: Appliance, rows, topic: str = "telemetry", encode=value_of) -> None:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(app.worker_endpoints(0)[0])
    for key, t, temp in rows:
        sock.send(wire.RecordMessage(topic=topic, key=key, value=encode(temp), timestamp_ms=t).encode())
    sock.close(linger=10_000)


def read_with_sdk(app: Appliance, topic: str, partition: int, expected: int, timeout_s: float = 60) -> list:
    """Records of one partition through the SDK's Consumer, once `expected` are there."""
    assert eventually(lambda: len(fetch_all(app, topic, partition)) >= expected, timeout_s), \
        f"{topic}-{partition}: {len(fetch_all(app, topic, partition))} of {expected} records"
    out = []
    with Consumer(app.bootstrap, topic, from_beginning=True, partitions=[partition]) as consumer:
        for record in consumer.records(idle_timeout_ms=1000):
            out.append(record)
    return out


def temp_of(value: bytes) -> float:
    return struct.unpack(">f", value[2:6])[0] if value[:2] == b"\x00\x01" else orjson.loads(value)["temp_c"]


def expected_windows(source_records) -> tuple[list[tuple], int]:
    """Closed windows of one partition in emission order (start, key) and late records."""
    rows = [(r.key, r.timestamp_ms, temp_of(r.value)) for r in source_records]
    closed, late, _ = brute_force(rows, WINDOW_MS, HOP_MS, GRACE_MS)
    return sorted((start, key, summary) for (start, key), summary in closed.items()), late


def as_window(record) -> tuple:
    doc = orjson.loads(record.value)
    t = doc["temp_c"]
    assert doc["window_end_ms"] == doc["window_start_ms"] + WINDOW_MS
    assert t["mean"] == pytest.approx(t["sum"] / doc["count"])
    return doc["window_start_ms"], record.key, (doc["count"], t["min"], t["max"], t["sum"], t["first"], t["last"])


def assert_windows_match(app: Appliance, source: str = "telemetry", sink: str = "temp-windows") -> int:
    """Sink windows of every partition == brute force over that source partition, in order."""
    late_total = 0
    for p in range(PARTITIONS):
        want, late = expected_windows(fetch_all(app, source, p))
        late_total += late
        got = [as_window(r) for r in read_with_sdk(app, sink, p, len(want))]
        assert len(got) == len(want)
        for (gs, gk, gv), (ws, wk, wv) in zip(got, want):
            assert (gs, gk) == (ws, wk)
            assert gv == pytest.approx(wv)
    return late_total


def cli(app: Appliance, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "ingest.cli", *args, "--bootstrap", app.bootstrap],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


CUSTOM = '''
import numpy as np
from ingest.streams import Batch, Output

def hot_batch(batch: Batch):
    return batch.json_field("temp_c") > 80

def fahrenheit_record(record):
    import orjson
    t = orjson.loads(record.value)["temp_c"]
    return Output(record.key, b"%.2f" % (t * 9 / 5 + 32), record.timestamp_ms)
'''


CUSTOM_PROCESSORS = """
[[processor]]
name = "hot-batch"
kind = "python"
source = "telemetry"
sink = "hot-batch"
function = "my_processors:hot_batch"
path = "{path}"

[[processor]]
name = "fahrenheit"
kind = "python"
mode = "record"
source = "telemetry"
sink = "fahrenheit"
function = "my_processors:fahrenheit_record"
path = "{path}"
"""


@pytest.fixture
def app(tmp_path):
    """An appliance running the declarative processors of CONFIG and the two custom
    processors of CUSTOM (one over batches, one per record)."""
    module_dir = tmp_path / "plugins"
    module_dir.mkdir()
    (module_dir / "my_processors.py").write_text(CUSTOM)
    a = Appliance(tmp_path / "data", workers=2, config_text=CONFIG + CUSTOM_PROCESSORS.format(path=module_dir)).start()
    yield a
    a.kill()


def test_aggregate_filter_extract_and_custom_processors_equal_brute_force(app):
    rows = readings(3000, seed=1)
    # A last reading far ahead per key closes every window the others opened.
    rows += [(b"dev-%d" % i, rows[-1][1] + 10 * WINDOW_MS, 20.0) for i in range(12)]
    push(app, rows)
    assert eventually(lambda: sum(len(fetch_all(app, "telemetry", p)) for p in range(PARTITIONS)) == len(rows), 30)
    late = assert_windows_match(app)
    assert late > 0  # the input has readings beyond the grace period
    # The same readings as fixed-layout binary values (big-endian float32 at byte 2).
    push(app, rows, "readings-bin", binary_value_of)
    assert eventually(lambda: sum(len(fetch_all(app, "readings-bin", p)) for p in range(PARTITIONS)) == len(rows), 30)
    assert assert_windows_match(app, "readings-bin", "bin-windows") == late
    for p in range(PARTITIONS):
        source = fetch_all(app, "telemetry", p)
        hot = [r for r in source if 80 < orjson.loads(r.value)["temp_c"] <= 95]
        got = read_with_sdk(app, "hot", p, len(hot))
        assert [(r.key, r.value, r.timestamp_ms) for r in got] == [(r.key, r.value, r.timestamp_ms) for r in hot]
        compact = read_with_sdk(app, "compact", p, len(source))
        assert [(r.key, orjson.loads(r.value)) for r in compact] == \
               [(r.key, {"temp_c": orjson.loads(r.value)["temp_c"], "meta.fw": 7}) for r in source]
        # Custom processors: a batch function (a mask) and a record function (new values).
        hot_batch = [(r.key, r.value) for r in source if orjson.loads(r.value)["temp_c"] > 80]
        assert [(r.key, r.value) for r in read_with_sdk(app, "hot-batch", p, len(hot_batch))] == hot_batch
        want = [(r.key, b"%.2f" % (orjson.loads(r.value)["temp_c"] * 9 / 5 + 32), r.timestamp_ms) for r in source]
        assert [(r.key, r.value, r.timestamp_ms) for r in read_with_sdk(app, "fahrenheit", p, len(source))] == want
    labels = {"processor": "temp-windows"}
    assert eventually(lambda: metric_value(app.metrics_text(), "ingest_processor_late_records_total", **labels) == late, 10)
    text = app.metrics_text()
    assert metric_value(text, "ingest_processor_lag_records", **labels) == 0
    assert metric_value(text, "ingest_processor_records_total", **labels) == len(rows)
    assert metric_value(text, "ingest_processor_position", **labels) == len(rows)
    # Only the windows of the last readings are still open: one per key per hop.
    assert metric_value(text, "ingest_processor_open_windows", **labels) == 12 * WINDOW_MS // HOP_MS
    # The same numbers through `ingest processors list|status`.
    listing = cli(app, "processors", "list")
    assert "temp-windows" in listing and "aggregate" in listing and "telemetry -> temp-windows" in listing
    status = [r for r in orjson.loads(cli(app, "processors", "status", "--json")) if r["processor"] == "temp-windows"]
    assert sorted(r["partition"] for r in status) == list(range(PARTITIONS))
    assert sum(r["position"] for r in status) == len(rows)
    assert sum(r["late_records"] for r in status) == late
    assert sum(r["open_windows"] for r in status) == 12 * WINDOW_MS // HOP_MS
    assert sum(r["lag_records"] for r in status) == 0
    table = cli(app, "processors", "status")
    assert "temp-windows" in table and "late" in table and "FAILED" not in table


def test_windows_are_exactly_once_across_kill_9_of_a_worker_and_of_the_appliance(tmp_path):
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    try:
        rows = readings(20_000, seed=2)
        rows += [(b"dev-%d" % i, rows[-1][1] + 10 * WINDOW_MS, 20.0) for i in range(12)]
        rng = random.Random(7)
        chunks = [rows[i:i + 5000] for i in range(0, len(rows), 5000)]
        for n, chunk in enumerate(chunks):
            with Producer(app.bootstrap, acks="fsync") as producer:
                futures = [producer.send("telemetry", value_of(temp), key=key, timestamp_ms=t)
                           for key, t, temp in chunk]
                for f in futures:
                    f.result(timeout=60)
            time.sleep(rng.uniform(0, 0.3))  # the processors are somewhere in this chunk
            if n == 1:
                pids = app.worker_pids()
                os.kill(pids[1], signal.SIGKILL)  # the supervisor restarts it
                app.wait_ready()
            elif n == 3:
                app.kill()  # the whole appliance, mid-processing
                app.start()
        assert_windows_match(app)
        for p in range(PARTITIONS):
            assert eventually(lambda: len(fetch_all(app, "compact", p)) == len(fetch_all(app, "telemetry", p)), 30)
            source = fetch_all(app, "telemetry", p)
            compact = fetch_all(app, "compact", p)
            assert [(r.key, orjson.loads(r.value)["temp_c"]) for r in compact] == \
                   [(r.key, orjson.loads(r.value)["temp_c"]) for r in source]
    finally:
        app.kill()


def test_a_new_processor_starts_at_the_earliest_or_latest_offset_as_configured(tmp_path):
    base = FAST_HEARTBEATS + """
[[topic]]
name = "telemetry"
partitions = 2
"""
    app = Appliance(tmp_path / "data", workers=2, config_text=base).start()
    try:
        push(app, [(b"dev-1", BASE_MS + i, 90.0) for i in range(50)])
        assert eventually(lambda: sum(len(fetch_all(app, "telemetry", p)) for p in range(2)) == 50, 30)
        app.stop()
        app.config_text = base + """
[[processor]]
name = "all-hot"
kind = "filter"
source = "telemetry"
sink = "all-hot"
where = "temp_c > 80"

[[processor]]
name = "new-hot"
kind = "filter"
source = "telemetry"
sink = "new-hot"
start = "latest"
where = "temp_c > 80"

[[processor]]
name = "never"
kind = "filter"
source = "telemetry"
sink = "never"
where = "temp_c > 1000"
"""
        app.start()
        push(app, [(b"dev-1", BASE_MS + 100 + i, 91.0) for i in range(5)])
        total = lambda topic: sum(len(fetch_all(app, topic, p)) for p in range(2))  # noqa: E731
        assert eventually(lambda: total("all-hot") == 55 and total("new-hot") == 5, 30)
        time.sleep(1)
        assert (total("all-hot"), total("new-hot")) == (55, 5)
        # A processor without output keeps its position too (checkpoint file): restarted,
        # it reads no source record again.
        never = {"processor": "never"}
        assert eventually(lambda: metric_value(app.metrics_text(), "ingest_processor_position", **never) == 55, 10)
        app.stop()
        app.start()
        assert eventually(lambda: metric_value(app.metrics_text(), "ingest_processor_position", **never) == 55, 10)
        assert metric_value(app.metrics_text(), "ingest_processor_records_total", **never) == 0
        assert total("never") == 0
    finally:
        app.kill()
