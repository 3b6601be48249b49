"""Closing partitions, as a SIGTERM drain does: written since open vs untouched since open.

    .venv/bin/python -m bench.bench_partition_close [--partitions N] [--repeats R] [--dir DIR]
                                                    [--append bench/RESULTS.md]

N partitions (one worker's share) are created, one acks=fsync-like batch of an idempotent
producer is appended to each and flushed, and all are closed ("written"); then they are
reopened (trusted: clean shutdown) and closed again without a write ("untouched"). Both
phases run in the same process on the same files, R times; each row is the median run.
Reported: milliseconds per partition and fsync/fdatasync calls per partition (counted by
wrapping os.fsync and os.fdatasync, which still run).
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_log_append import filesystem_of
from ingest.shards.batch import Record, encode_batch, parse_header
from ingest.shards.log import LogConfig
from ingest.shards.partition import Partition

FIRST_TIMESTAMP_MS = 1_700_000_000_000


class SyncCounter:
    """Counts fsync and fdatasync calls made while active; the real calls still run."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = {name: getattr(os, name) for name in ("fsync", "fdatasync")}

    def __enter__(self) -> "SyncCounter":
        for name, real in self._real.items():
            setattr(os, name, self._counting(real))
        return self

    def _counting(self, real):
        def call(fd):
            self.calls += 1
            return real(fd)
        return call

    def __exit__(self, *exc_info) -> None:
        for name, real in self._real.items():
            setattr(os, name, real)


def open_all(directory: Path, partitions: int) -> list[Partition]:
    return [Partition(directory, f"t{i}", 0, LogConfig(), FIRST_TIMESTAMP_MS) for i in range(partitions)]


def close_all(parts: list[Partition]) -> tuple[float, int]:
    """(seconds, fsync calls) to close every partition."""
    with SyncCounter() as syncs:
        started = time.perf_counter()
        for part in parts:
            part.close()
        return time.perf_counter() - started, syncs.calls


def run_once(directory: Path, partitions: int) -> dict[str, tuple[float, int]]:
    parts = open_all(directory, partitions)
    for i, part in enumerate(parts):
        batch = encode_batch([Record(0, FIRST_TIMESTAMP_MS, None, b"v" * 100)], producer_id=i,
                             producer_epoch=0, base_sequence=0)
        part.append(batch, parse_header(batch), FIRST_TIMESTAMP_MS)
        part.log.flush()
    written = close_all(parts)
    untouched = close_all(open_all(directory, partitions))
    return {"written since open": written, "untouched since open": untouched}


def report(runs: list[dict], partitions: int, repeats: int, base: Path) -> str:
    lines = ["## Partition close in a drain: written vs untouched (bench/bench_partition_close.py)", "",
             f"`.venv/bin/python -m bench.bench_partition_close --partitions {partitions} --repeats {repeats}`", "",
             f"{platform.processor() or platform.machine()}; files on {filesystem_of(base)}; {partitions} partitions per run, "
             f"median of {repeats} runs.", "",
             "| partitions closed | ms per partition | fsyncs per partition | vs written |",
             "|---|---:|---:|---:|"]
    medians = {}
    for key in runs[0]:
        seconds = statistics.median(r[key][0] for r in runs)
        syncs = statistics.median(r[key][1] for r in runs)
        medians[key] = (seconds, syncs)
    written_s = medians["written since open"][0]
    for key, (seconds, syncs) in medians.items():
        lines.append(f"| {key} | {seconds / partitions * 1000:.3f} | {syncs / partitions:.1f} | "
                     f"{seconds / written_s:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--append", metavar="PATH", help="append the markdown report here")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        directory = Path(tempfile.mkdtemp(prefix="partition-close-", dir=args.dir))
        try:
            runs.append(run_once(directory, args.partitions))
        finally:
            shutil.rmtree(directory)
    text = report(runs, args.partitions, args.repeats, args.dir)
    print(text)
    if args.append:
        with open(args.append, "a") as results_file:  # opened late: others append too
            results_file.write("\n" + text)


if __name__ == "__main__":
    main()
