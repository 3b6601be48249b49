"""The SDK's paths measured on two source trees, interleaved: before/after a change, same session.

    git archive BASE | tar -x -C /tmp/base
    python -m bench.compare_trees --before /tmp/base --after . [--rounds R] [--records N] [--repeats K]

Each round runs every tree once, one after the other, in a subprocess whose working
directory is that tree (so it imports that tree's `ingest`, and its appliance runs that
tree's code). A run starts `ingest serve --workers 2` and measures, ``--repeats`` times
each: the raw PUSH->PULL ceiling, send() with acks=fsync (futures kept and not kept),
send_batch() of 10,000 (a list of bytes), Consumer iteration and poll_batch(), with
bench_sdk's own functions, so only what both trees have is compared.

Two numbers per path: records/s over the run's own ceiling (same-run ratio), and the
client process's CPU time per record (every thread of it; the appliance's processes are not
counted). On a machine shared with other work the second moves much less than the first:
it does not count the time the client waits for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("ceiling", "send_fsync_kept", "send_fsync_dropped", "send_batch_list", "iterate", "poll_batch")
LABELS = {"ceiling": "raw pyzmq PUSH->PULL (ceiling)",
          "send_fsync_kept": "send(), acks=fsync, futures kept",
          "send_fsync_dropped": "send(), acks=fsync, futures not kept",
          "send_batch_list": "send_batch() of 10,000 (list), acks=fsync",
          "iterate": "Consumer.records() iteration",
          "poll_batch": "Consumer.poll_batch()"}


def measure(records: int, repeats: int) -> dict[str, float]:
    """One tree (the working directory): median records/s and client CPU ns per record."""
    sys.path.insert(0, os.getcwd())
    from bench import bench_sdk as b
    from ingest.net.client import BootstrapClient
    from tests.support import Appliance

    values = [os.urandom(100) for _ in range(records)]
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance(Path(tmp) / "data", workers=2).start()
        try:
            with BootstrapClient(app.bootstrap) as bootstrap:
                for topic in ("fsync", "batch"):
                    bootstrap.create_topic(topic, 4)
            paths = {"ceiling": lambda: b.bench_zmq_ceiling(values),
                     "send_fsync_kept": lambda: b._produce(app.bootstrap, "fsync", "fsync", values, False),
                     "send_fsync_dropped": lambda: b._produce(app.bootstrap, "fsync", "fsync", values, False,
                                                              keep_futures=False),
                     "send_batch_list": lambda: b._produce(app.bootstrap, "batch", "fsync", values, True),
                     "iterate": lambda: b._consume(app.bootstrap, "fsync", records, False),
                     "poll_batch": lambda: b._consume(app.bootstrap, "fsync", records, True)}
            for _ in range(repeats):
                for name in PATHS:
                    started_cpu_s = time.process_time()
                    runs.setdefault(name, []).append(paths[name]())
                    runs.setdefault(name + "_cpu_ns", []).append((time.process_time() - started_cpu_s) / records * 1e9)
        finally:
            app.stop()
    return {name: statistics.median(values) for name, values in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compare_trees", description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="source tree of the baseline")
    parser.add_argument("--after", default=".", help="source tree with the change")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the per-tree child
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.records, args.repeats)))
        return 0
    if args.before is None:
        parser.error("--before is required")
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    child = [sys.executable, str(Path(__file__).resolve()), "--measure",
             "--records", str(args.records), "--repeats", str(args.repeats)]
    for _ in range(args.rounds):
        for name, tree in trees.items():
            done = subprocess.run(child, cwd=tree, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} ({tree}) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(report(args, trees, results))
    return 0


def report(args, trees: dict, results: dict[str, list[dict]]) -> str:
    def ratio(name: str, path: str) -> float:
        return statistics.median(r[path] / r["ceiling"] for r in results[name])

    def cpu(name: str, path: str) -> float:
        return statistics.median(r[path + "_cpu_ns"] for r in results[name])

    lines = [f"{args.rounds} interleaved rounds of {args.records:,} records x {args.repeats} repeats per tree; "
             f"medians. Ceilings (records/s): before {statistics.median(r['ceiling'] for r in results['before']):,.0f}, "
             f"after {statistics.median(r['ceiling'] for r in results['after']):,.0f}.",
             "",
             "| path | before, vs ceiling | after, vs ceiling | before, client CPU ns/record | "
             "after, client CPU ns/record | CPU after / before |",
             "|---|---:|---:|---:|---:|---:|"]
    for path in PATHS[1:]:
        lines.append(f"| {LABELS[path]} | {ratio('before', path):.2f}x | {ratio('after', path):.2f}x | "
                     f"{cpu('before', path):.0f} | {cpu('after', path):.0f} | "
                     f"{cpu('after', path) / cpu('before', path):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
