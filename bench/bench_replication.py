"""Replicated acks=all next to a lone appliance's acks=fsync, in one run on this machine.

    python -m bench.bench_replication [--records N] [--latency-sends N] [--repeats R] [--append FILE]

Started here, each with `--workers 2` and a temporary data directory: one lone appliance,
and a leader/follower pair (min_insync_replicas = 2, so every acks=all reply means the
batch is fsynced on both). All three share this machine's cores with the client.

1. Throughput: records/s of 100-B values with 10-B keys sent by the SDK Producer from one
   Python thread, from the first send() to flush() returning with every record
   acknowledged: acks=fsync to the lone appliance, acks=all to the leader. Runs alternate
   (fsync, all, fsync, all, ...); the median of each is reported with their ratio.
2. Latency: one 100-record batch at a time (send_batch, wait for its ack), p50/p99 of the
   round trip, acks=fsync (lone) and acks=all (pair).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from ingest import Producer
from tests.support import Appliance, eventually

TOPIC = "bench"
KEYS = [b"device-%03d" % i for i in range(1000)]


def _pair_config(peer: Appliance, role: str) -> str:
    return (f'[replication]\nrole = "{role}"\npeers = ["{peer.bootstrap}"]\n'
            "min_insync_replicas = 2\nreplica_lag_max_ms = 10000\n")


def _throughput(bootstrap: str, acks: str, values: list) -> float:
    with Producer(bootstrap, acks=acks) as producer:
        started = time.perf_counter()
        for i, value in enumerate(values):
            producer.send(TOPIC, value, key=KEYS[i % 1000])
        producer.flush()
        return len(values) / (time.perf_counter() - started)


def _latencies_ms(bootstrap: str, acks: str, sends: int) -> list[float]:
    values = [os.urandom(100) for _ in range(100)]
    out = []
    with Producer(bootstrap, acks=acks) as producer:
        for _ in range(sends):
            started = time.perf_counter()
            producer.send_batch(TOPIC, values).result(timeout=30)
            out.append((time.perf_counter() - started) * 1000)
    return out


def _in_sync(leader: Appliance) -> bool:
    text = leader.metrics_text()
    rows = [line for line in text.splitlines() if line.startswith("ingest_partition_in_sync_replicas{")]
    return bool(rows) and all(line.endswith(" 2.0") for line in rows)


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lone = Appliance(Path(tmp) / "lone", workers=2)
        leader = Appliance(Path(tmp) / "leader", workers=2)
        follower = Appliance(Path(tmp) / "follower", workers=2)
        leader.config_text = _pair_config(follower, "leader")
        follower.config_text = _pair_config(leader, "follower")
        try:
            for app in (lone, leader, follower):
                app.start()
            for app in (lone, leader):
                with Producer(app.bootstrap) as p:
                    p.send(TOPIC, b"warm-up").result(timeout=30)
            if not eventually(lambda: _in_sync(leader), timeout_s=60):
                raise RuntimeError("the follower never joined the in-sync set")
            values = [os.urandom(args.value_bytes) for _ in range(args.records)]
            rates = {"fsync": [], "all": []}
            for _ in range(args.repeats):
                rates["fsync"].append(_throughput(lone.bootstrap, "fsync", values))
                rates["all"].append(_throughput(leader.bootstrap, "all", values))
            latency = {"fsync": _latencies_ms(lone.bootstrap, "fsync", args.latency_sends),
                       "all": _latencies_ms(leader.bootstrap, "all", args.latency_sends)}
        finally:
            for app in (lone, leader, follower):
                app.kill()
    return {"rates": rates, "latency": latency}


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(args, result: dict) -> str:
    fsync = statistics.median(result["rates"]["fsync"])
    replicated = statistics.median(result["rates"]["all"])
    lat = result["latency"]
    lines = [
        f"`.venv/bin/python -m bench.bench_replication --records {args.records} --latency-sends "
        f"{args.latency_sends} --repeats {args.repeats} --append bench/RESULTS.md`",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared by the three appliances "
        f"and the client; {args.value_bytes}-B values, 10-B keys; median of {args.repeats} alternating runs.",
        "",
        "| produce | records/s | vs lone acks=fsync | batch of 100: p50 | p99 |",
        "|---|---:|---:|---:|---:|",
        f"| lone appliance, acks=fsync | {fsync:,.0f} | 1.00x | {_p(lat['fsync'], .5):.1f} ms | {_p(lat['fsync'], .99):.1f} ms |",
        f"| leader + follower, acks=all (min_insync_replicas 2) | {replicated:,.0f} | {replicated / fsync:.2f}x "
        f"| {_p(lat['all'], .5):.1f} ms | {_p(lat['all'], .99):.1f} ms |",
        "",
        f"Target acks=all >= 60% of acks=fsync records/s: {'met' if replicated >= 0.6 * fsync else 'not met'} "
        f"({replicated / fsync:.0%}).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_replication", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--latency-sends", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append", help="append the section to this Markdown file")
    args = parser.parse_args(argv)
    text = report(args, run(args))
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(f"\n## Replication: acks=all on a leader/follower pair (bench/bench_replication.py)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
