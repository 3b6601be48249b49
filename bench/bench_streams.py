"""Windowed aggregation throughput on one core: the kernel, and whole processor steps.

    .venv/bin/python -m bench.bench_streams [--records N] [--append bench/RESULTS.md]

N readings from 1000 devices (8-byte keys), 50 per ms with up to 50 ms of disorder,
tumbling 1 s windows, grace 100 ms, count/min/max/sum/mean/first/last of two fields:
  - kernel: WindowedAggregate.add on ready columns (key ids, timestamps, float64 values);
  - binary processor step: 100-byte values (two float32 fields), from encoded
    RecordBatches: decode_columns + field gather + key ids + window kernel + output
    (JSON window records, or binary ones built by numpy);
  - JSON processor step: ~300-byte JSON values, the same path with orjson parsing;
  - a pure-Python per-record aggregation (dict of windows), the baseline of the ratios.
Best of several repeats (the machine is shared); every path's windows are checked equal.
"""

import argparse
import os
import platform
import struct
import sys
import time

import numba
import numpy as np
import orjson

from ingest.shards.batch import decode_columns, encode_columns
from ingest.streams import window_kernel
from ingest.streams.api import Batch
from ingest.streams.processors import Aggregate, Custom
from ingest.streams.spec import ProcessorConfig

KEYS = 1000
RECORDS_PER_BATCH = 1000
BINARY_VALUE_BYTES = 100
TARGET_BINARY = 5_000_000
TARGET_JSON = 700_000
REPEATS = 5


def workload(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    # 50 readings per ms from the fleet: each device about 50 readings per 1 s window.
    timestamps = 1_700_000_000_000 + np.arange(n, dtype=np.int64) // 50 - rng.integers(0, 50, n)
    key_ids = rng.integers(0, KEYS, n)
    temp = rng.uniform(-20, 60, n).astype(np.float32).astype(np.float64)
    hum = rng.uniform(0, 100, n).astype(np.float32).astype(np.float64)
    return timestamps, key_ids, temp, hum


def config(fmt: str, output_format: str = "json") -> ProcessorConfig:
    return ProcessorConfig("bench", "aggregate", "a", "b", format=fmt, output_format=output_format,
                           fields=("temp_c", "humidity"),
                           layout={"temp_c": "f32@0", "humidity": "f32@4"}, window_ms=1000, grace_ms=100,
                           aggregations=("count", "min", "max", "sum", "mean", "first", "last"))


def encode(values: list[bytes], key_ids, timestamps) -> bytes:
    keys = [b"dev-%04d" % k for k in key_ids.tolist()]
    out = []
    for lo in range(0, len(values), RECORDS_PER_BATCH):
        hi = lo + RECORDS_PER_BATCH
        v, k = values[lo:hi], keys[lo:hi]
        vl = np.array([len(x) for x in v], np.int64)
        kl = np.array([len(x) for x in k], np.int64)
        out.append(encode_columns(b"".join(v), np.cumsum(vl) - vl, vl, b"".join(k), np.cumsum(kl) - kl, kl,
                                  timestamps[lo:hi], base_offset=lo))
    return b"".join(out)


def best(fn) -> tuple[float, float]:
    """(CPU seconds, wall seconds), each the best of REPEATS. CPU time is what one core
    spends (everything here is one thread); wall time also counts waiting for a core."""
    cpu, wall = [], []
    for _ in range(REPEATS):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return min(cpu), min(wall)


def orjson_only(data: bytes) -> None:
    """The floor of the JSON path: orjson.loads of every value, nothing else."""
    cols = decode_columns(np.frombuffer(data, np.uint8))
    raw = cols.buffer.tobytes()
    loads = orjson.loads
    for at, length in zip(cols.value_offsets.tolist(), cols.value_lengths.tolist()):
        loads(raw[at:at + length])


def run_kernel(timestamps, key_ids, values):
    from ingest.streams.aggregate import WindowedAggregate

    agg = WindowedAggregate(config("binary"))
    agg._grow(KEYS)
    agg._keys = [b"dev-%04d" % k for k in range(KEYS)]
    offsets = np.arange(timestamps.size, dtype=np.int64)
    out = []
    for lo in range(0, timestamps.size, 100_000):
        hi = lo + 100_000
        out += agg.add(key_ids[lo:hi], timestamps[lo:hi], offsets[lo:hi], values[:, lo:hi], True)
    return out


def run_processor(data: bytes, fmt: str, output_format: str = "json"):
    proc = Aggregate(config(fmt, output_format))
    buf = np.frombuffer(data, np.uint8)
    out = 0
    chunk = 1 << 20
    pos = 0
    while pos < buf.size:
        cols = decode_columns(buf[pos:pos + chunk])
        if cols.bytes_consumed == 0:
            break
        batch = Batch(cols.buffer, cols.offsets, cols.timestamps_ms, cols.key_offsets, cols.key_lengths,
                      cols.value_offsets, cols.value_lengths, cols.header_offsets, cols.header_lengths)
        out += len(proc.process(batch, live=True))
        pos += cols.bytes_consumed
    return out


def run_python(timestamps, key_ids, temp, hum):
    windows: dict = {}
    stream_time = -1
    emitted = 0
    for t, k, a, b in zip(timestamps.tolist(), key_ids.tolist(), temp.tolist(), hum.tolist()):
        stream_time = max(stream_time, t)
        start = t - t % 1000
        if start + 1100 <= stream_time:
            continue
        w = windows.get((k, start))
        if w is None:
            windows[(k, start)] = [1, a, a, a, a, a, b, b, b, b, b, t, t]
        else:
            w[0] += 1
            w[1] = min(w[1], a); w[2] = max(w[2], a); w[3] += a
            w[6] = min(w[6], b); w[7] = max(w[7], b); w[8] += b
            if t >= w[12]:
                w[12], w[5], w[10] = t, a, b
        if len(windows) > 4 * KEYS:
            for key in [key for key in windows if key[1] + 1100 <= stream_time]:
                del windows[key]
                emitted += 1
    return emitted


def run_custom(data: bytes, function: str, mode: str) -> int:
    proc = Custom(ProcessorConfig("bench", "python", "a", "b", function=f"bench.streams_custom:{function}", mode=mode))
    buf = np.frombuffer(data, np.uint8)
    out, pos = 0, 0
    while pos < buf.size:
        cols = decode_columns(buf[pos:pos + (1 << 20)])
        batch = Batch(cols.buffer, cols.offsets, cols.timestamps_ms, cols.key_offsets, cols.key_lengths,
                      cols.value_offsets, cols.value_lengths, cols.header_offsets, cols.header_lengths)
        out += len(proc.process(batch, live=True))
        pos += cols.bytes_consumed
    return out


def custom_rows(binary: bytes, data_json: bytes) -> dict[str, tuple[float, float]]:
    """{values: (batch CPU-seconds, record CPU-seconds)}; both select the same records."""
    out = {}
    for values, data in (("binary", binary), ("JSON", data_json)):
        assert run_custom(data, f"hot_batch_{values.lower()}", "batch") == \
            run_custom(data, f"hot_record_{values.lower()}", "record")
        out[values] = (best(lambda: run_custom(data, f"hot_batch_{values.lower()}", "batch"))[0],
                       best(lambda: run_custom(data, f"hot_record_{values.lower()}", "record"))[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--append")
    args = parser.parse_args()
    n = args.records
    timestamps, key_ids, temp, hum = workload(n)
    values = np.vstack([temp, hum])
    pad = bytes(BINARY_VALUE_BYTES - 8)
    binary = encode([struct.pack("<ff", a, b) + pad for a, b in zip(temp.tolist(), hum.tolist())], key_ids, timestamps)
    json_values = [orjson.dumps({"device": "dev-%04d" % k, "temp_c": a, "humidity": b, "fw": "2.4.1",
                                 "site": "plant-7/line-3", "battery_v": 3.61, "rssi_dbm": -71,
                                 "status": "ok", "note": "x" * 120})
                   for k, a, b in zip(key_ids.tolist(), temp.tolist(), hum.tolist())]
    json_bytes = sum(map(len, json_values)) / n
    data_json = encode(json_values, key_ids, timestamps)
    window_kernel.warm_up()
    windows = len(run_kernel(timestamps[:1000], key_ids[:1000], values[:, :1000]))
    assert run_processor(binary[:200_000], "binary") >= 0 and windows >= 0
    # Same windows from every compiled path.
    kernel_windows = len(run_kernel(timestamps, key_ids, values))
    assert run_processor(binary, "binary") == kernel_windows == run_processor(data_json, "json") \
        == run_processor(binary, "binary", "binary")
    rows = [("window kernel (ready columns)", best(lambda: run_kernel(timestamps, key_ids, values))),
            ("binary processor step (100-B values)", best(lambda: run_processor(binary, "binary"))),
            ("binary processor step, binary window records out", best(lambda: run_processor(binary, "binary", "binary"))),
            (f"JSON processor step ({json_bytes:.0f}-B values, orjson)", best(lambda: run_processor(data_json, "json"))),
            ("orjson.loads of every JSON value alone (the JSON floor)", best(lambda: orjson_only(data_json))),
            ("pure Python per record (dict of windows)", best(lambda: run_python(timestamps, key_ids, temp, hum)))]
    python_s = rows[-1][1]
    custom = custom_rows(binary, data_json)
    lines = [f"## Stream processing: windowed aggregation (bench/bench_streams.py)", "",
             f"`.venv/bin/python -m bench.bench_streams --records {n}` — {platform.machine()}, "
             f"Python {platform.python_version()}, numba {numba.__version__}; one thread, best of {REPEATS}. "
             f"{KEYS} keys, tumbling 1 s windows, grace 100 ms, 7 aggregations of 2 fields; "
             f"{kernel_windows:,} windows emitted by every path. Load average during the run: "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine): records per CPU-second "
             "is the per-core figure; wall-clock records/s also counts time spent waiting for a core.", "",
             "| path | records per CPU-second | wall-clock records/s | vs pure Python (CPU) |", "|---|---:|---:|---:|"]
    for name, (cpu_s, wall_s) in rows:
        lines.append(f"| {name} | {n / cpu_s / 1e6:.2f} M | {n / wall_s / 1e6:.2f} M | {python_s[0] / cpu_s:.1f}x |")
    b, j = max(n / rows[1][1][0], n / rows[2][1][0]), n / rows[3][1][0]
    lines += ["", f"Targets: binary >= {TARGET_BINARY / 1e6:.0f} M/s per core: "
              f"{'met' if b >= TARGET_BINARY else 'not met'} ({b / 1e6:.2f} M/s); JSON >= {TARGET_JSON / 1e6:.1f} M/s "
              f"per core: {'met' if j >= TARGET_JSON else 'not met'} ({j / 1e6:.2f} M/s)."]
    lines += ["", "Custom processors (ingest.streams): the same filter (temp_c > 50) as a batch function and as",
              "a record function, over the same batches:", "",
              "| function | values | records per CPU-second | batch vs record |", "|---|---|---:|---:|"]
    for values, (batch_s, record_s) in custom.items():
        lines.append(f"| batch (numpy mask) | {values} | {n / batch_s / 1e6:.2f} M | {record_s / batch_s:.1f}x |")
        lines.append(f"| record (Python per record) | {values} | {n / record_s / 1e6:.2f} M | 1.0x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
