"""Where ingest's time goes in one row of bench/compare.py: py-spy on the client and workers.

    python -m bench.profile_ingest [--payload "1 KB binary"] [--acks fsync] [--seconds 8]

Starts `ingest serve` (one worker per core), then for ``--seconds`` runs one Python
producer process sending the payload with Producer.send() in a loop (as the benchmark's
row does) while py-spy samples it and every worker (`py-spy record --format raw`, native
frames off, ``--nonblocking`` so the sampled process is never paused). Prints, per process,
the functions where samples ended (self time) and the share of samples under a few
functions of interest (inclusive time).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.payloads import PAYLOADS
from tests.support import Appliance

SAMPLING_RATE_HZ = 200
TOP_FUNCTIONS = 12

_CLIENT = """
import sys, time
from ingest import Producer
from bench.payloads import PAYLOADS
payload, acks, seconds = PAYLOADS[sys.argv[1]], sys.argv[2], float(sys.argv[3])
acks = int(acks) if acks.isdigit() else acks
with Producer(sys.argv[4], acks=acks) as producer:
    producer.send("profile", b"warm-up").result(30)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(10_000):
            producer.send("profile", payload)
        sent += 10_000
    started = time.monotonic()
    producer.flush()
print(f"client: {sent:,} records in {seconds + time.monotonic() - started:.1f} s")
"""


def summarize(raw: Path, label: str) -> list[str]:
    """Self time by leaf function, from py-spy's raw (collapsed stack) output."""
    self_samples: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        leaf = stack.split(";")[-1]
        self_samples[leaf.split(" (")[0] + " (" + leaf.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"] \
            += samples
    lines = [f"{label}: {total} samples"]
    for function, samples in self_samples.most_common(TOP_FUNCTIONS):
        lines.append(f"  {samples / max(1, total):6.1%}  {function}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile_ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--payload", default="1 KB binary", choices=list(PAYLOADS))
    parser.add_argument("--acks", default="fsync")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance(Path(tmp) / "data", workers=os.cpu_count() or 1).start()
        try:
            duration = str(int(args.seconds) + 1)
            workers = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", duration, "--rate",
                                         str(SAMPLING_RATE_HZ), "--nonblocking", "--format", "raw", "-o",
                                         f"{tmp}/worker-{wid}.txt"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                       for wid, pid in app.worker_pids().items()]
            time.sleep(0.5)
            subprocess.run([py_spy, "record", "--rate", str(SAMPLING_RATE_HZ), "--nonblocking", "--format", "raw",
                            "-o", f"{tmp}/client.txt", "--", sys.executable, "-c", _CLIENT, args.payload, args.acks,
                            str(args.seconds), app.bootstrap], check=True, stderr=subprocess.DEVNULL)
            for process in workers:
                process.wait(60)
        finally:
            app.stop()
        print(f"py-spy, {SAMPLING_RATE_HZ} Hz, {args.payload}, acks={args.acks}, {args.seconds:.0f} s")
        for path in sorted(Path(tmp).glob("*.txt")):
            print("\n".join(summarize(path, path.stem)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
