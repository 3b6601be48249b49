"""Storage kernels, side by side: batch encoding and CRC32C on one core.

    .venv/bin/python -m bench.bench_storage_kernels [--records N] [--append bench/RESULTS.md]

Encoding: N records of a 100-byte value and an 8-byte key, 1000 records per batch, with
  - the numba kernel called directly (preallocated output: the appliance's worker path),
  - encode_columns (the SDK hot path: packed columns in, bytes out),
  - encode_batch (Record objects in, numba kernel inside),
  - encode_batch_py (the pure-Python reference encoder),
  - kafka-python's DefaultRecordBatchBuilder.
Every encoder's batches are checked to be byte-identical before any time is reported.
Reading: validate_batch, decode_columns, decode_batch and kafka-python's reader.
CRC32C: GB/s over a 1 MiB buffer, SSE4.2 path vs slicing-by-8 vs the `crc32c` package.
Times are the best of several repeats (the machine is shared); everything is one thread.
"""

import argparse
import platform
import sys
import time

import crc32c as crc32c_package
import numba
import numpy as np
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from ingest.shards import kernels
from ingest.shards.batch import Record, decode_batch, decode_columns, encode_batch, encode_batch_py, encode_columns

VALUE_BYTES = 100
KEY_BYTES = 8
RECORDS_PER_BATCH = 1000
CRC_BUFFER_BYTES = 1 << 20
TARGET_RECORDS_PER_S = 10_000_000
FIRST_TIMESTAMP_MS = 1_700_000_000_000
# kafka-python writes leader epoch 0 into new batches; use the same so bytes compare equal.
LEADER_EPOCH = 0


class Workload:
    """One batch's worth of records, in every input shape the encoders take."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        n = RECORDS_PER_BATCH
        self.values_buf = rng.integers(0, 256, n * VALUE_BYTES, dtype=np.uint8)
        self.keys_buf = np.frombuffer(b"".join(b"dev-%04d" % (i % 1000) for i in range(n)), np.uint8)
        self.value_offsets = np.arange(n, dtype=np.int64) * VALUE_BYTES
        self.value_lengths = np.full(n, VALUE_BYTES, dtype=np.int64)
        self.key_offsets = np.arange(n, dtype=np.int64) * KEY_BYTES
        self.key_lengths = np.full(n, KEY_BYTES, dtype=np.int64)
        self.timestamps_ms = FIRST_TIMESTAMP_MS + np.arange(n, dtype=np.int64)
        self.records = [
            Record(0, int(self.timestamps_ms[i]), self.keys_buf[i * KEY_BYTES:(i + 1) * KEY_BYTES].tobytes(),
                   self.values_buf[i * VALUE_BYTES:(i + 1) * VALUE_BYTES].tobytes())
            for i in range(n)
        ]
        self.no_headers = np.zeros(0, dtype=np.int64)
        bound = kernels.encoded_size_upper_bound(self.value_lengths, self.key_lengths, self.no_headers)
        self.out = np.empty(bound, dtype=np.uint8)


def encode_with_kernel(w: Workload) -> bytes:
    end = kernels.encode_records(
        w.values_buf, w.value_offsets, w.value_lengths, w.keys_buf, w.key_offsets, w.key_lengths,
        w.timestamps_ms, w.values_buf, w.no_headers, w.no_headers, 0, -1, -1, -1, LEADER_EPOCH, w.out, 0)
    return w.out[:end]


def encode_with_columns(w: Workload) -> bytes:
    return encode_columns(w.values_buf, w.value_offsets, w.value_lengths, w.keys_buf, w.key_offsets,
                          w.key_lengths, w.timestamps_ms, partition_leader_epoch=LEADER_EPOCH)


def encode_with_records(w: Workload) -> bytes:
    return encode_batch(w.records, partition_leader_epoch=LEADER_EPOCH)


def encode_with_python(w: Workload) -> bytes:
    return encode_batch_py(w.records, partition_leader_epoch=LEADER_EPOCH)


def encode_with_kafka_python(w: Workload) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 30)
    for i, record in enumerate(w.records):
        builder.append(i, record.timestamp_ms, record.key, record.value, [])
    return builder.build()


ENCODERS = [
    ("numba kernel (encode_records, preallocated out)", encode_with_kernel),
    ("encode_columns (numba, bytes out)", encode_with_columns),
    ("encode_batch (Record objects, numba)", encode_with_records),
    ("encode_batch_py (pure Python reference)", encode_with_python),
    ("kafka-python DefaultRecordBatchBuilder", encode_with_kafka_python),
]


def best_seconds(fn, calls: int, repeats: int) -> float:
    """Best time of `repeats` runs of `calls` calls each."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench_encoders(records_total: int) -> list[tuple[str, float]]:
    w = Workload()
    reference = bytes(encode_with_kafka_python(w))
    for name, encoder in ENCODERS:
        if bytes(encoder(w)) != reference:  # also warms (compiles) the kernels
            raise SystemExit(f"{name} does not write kafka-python's bytes: benchmark void")
    batches = max(1, records_total // RECORDS_PER_BATCH)
    rates = []
    for name, encoder in ENCODERS:
        fast = encoder in (encode_with_kernel, encode_with_columns)
        repeats = 5 if fast else 2  # the slow encoders take seconds per million records
        seconds = best_seconds(lambda: encoder(w), batches, repeats)
        rates.append((name, batches * RECORDS_PER_BATCH / seconds))
    return rates


def bench_readers(records_total: int) -> list[tuple[str, float]]:
    """Records/s reading back the same 1000-record batch, checks included."""
    batch = bytes(encode_with_kernel(Workload()))
    buf = np.frombuffer(batch, dtype=np.uint8)

    def validate() -> None:
        if kernels.validate_batch(buf, 0, buf.size, len(batch)) != kernels.OK:
            raise SystemExit("validate_batch rejects the benchmark batch")

    def kafka_python_read() -> None:
        reader = DefaultRecordBatch(batch)
        if not reader.validate_crc():
            raise SystemExit("kafka-python rejects the benchmark batch")
        for _ in reader:
            pass

    readers = [("validate_batch (numba: CRC + every record)", validate),
               ("decode_columns (numba: validate + columns)", lambda: decode_columns(batch)),
               ("decode_batch (Record objects)", lambda: decode_batch(batch)),
               ("kafka-python DefaultRecordBatch (CRC + iterate)", kafka_python_read)]
    batches = max(1, records_total // RECORDS_PER_BATCH)
    rates = []
    for name, reader in readers:
        reader()
        fast = "numba" in name
        seconds = best_seconds(reader, batches if fast else max(1, batches // 5), 5 if fast else 2)
        rates.append((name, (batches if fast else max(1, batches // 5)) * RECORDS_PER_BATCH / seconds))
    return rates


def bench_crc() -> list[tuple[str, float]]:
    buf = np.random.default_rng(2).integers(0, 256, CRC_BUFFER_BYTES, dtype=np.uint8)
    data = buf.tobytes()
    expected = crc32c_package.crc32c(data)
    package = "crc32c package (C, %s)" % ("hardware" if crc32c_package.hardware_based else "software")
    paths = [(package, lambda: crc32c_package.crc32c(data)),
             ("kernels.crc32c_sw (slicing-by-8)", lambda: kernels.crc32c_sw(buf, 0, buf.size, 0))]
    if kernels.HAS_SSE42:
        paths.insert(0, ("kernels.crc32c_hw (SSE4.2, 3 chains)", lambda: kernels.crc32c_hw(buf, 0, buf.size, 0)))
    rates = []
    for name, fn in paths:
        if fn() != expected:
            raise SystemExit(f"{name} computes a wrong CRC: benchmark void")
        calls = 20 if "sw" in name else 200
        rates.append((name, calls * CRC_BUFFER_BYTES / best_seconds(fn, calls, 5) / 1e9))
    return rates


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(records_total: int, encode_rates, read_rates, crc_rates, command: str) -> str:
    kernel_rate = encode_rates[0][1]
    kafka_rate = encode_rates[-1][1]
    lines = [
        f"## Storage kernels ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{command}`",
        "",
        f"CPU: {cpu_model()}; Python {platform.python_version()}, numba {numba.__version__}, "
        f"numpy {np.__version__}; SSE4.2: {kernels.HAS_SSE42}. One thread; best of several repeats.",
        "",
        f"Encoding {records_total:,} records ({VALUE_BYTES}-B value, {KEY_BYTES}-B key, "
        f"{RECORDS_PER_BATCH} per batch); all encoders write identical bytes:",
        "",
        "| encoder | records/s | vs kafka-python | vs numba kernel |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in encode_rates:
        lines.append(f"| {name} | {rate / 1e6:,.2f} M | {rate / kafka_rate:,.1f}x | {rate / kernel_rate:.3f}x |")
    verdict = "meets" if kernel_rate >= TARGET_RECORDS_PER_S else "MISSES"
    lines += ["", f"Numba kernel {verdict} the {TARGET_RECORDS_PER_S / 1e6:.0f} M records/s target.", "",
              "Reading the same batches back:", "",
              "| reader | records/s | vs kafka-python |", "|---|---:|---:|"]
    for name, rate in read_rates:
        lines.append(f"| {name} | {rate / 1e6:,.2f} M | {rate / read_rates[-1][1]:,.1f}x |")
    lines += ["", f"CRC32C over {CRC_BUFFER_BYTES >> 20} MiB:", "",
              "| implementation | GB/s | vs crc32c package |", "|---|---:|---:|"]
    package_rate = next(rate for name, rate in crc_rates if "package" in name)
    for name, rate in crc_rates:
        lines.append(f"| {name} | {rate:.2f} | {rate / package_rate:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records to encode per encoder")
    parser.add_argument("--append", metavar="PATH", help="append the markdown report to this file")
    args = parser.parse_args()
    command = ".venv/bin/python -m bench.bench_storage_kernels " + " ".join(sys.argv[1:])
    text = report(args.records, bench_encoders(args.records), bench_readers(args.records),
                  bench_crc(), command.strip())
    print(text)
    if args.append:
        with open(args.append, "a") as results:
            results.write("\n" + text)


if __name__ == "__main__":
    main()
