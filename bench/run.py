"""`make bench`: every benchmark in one run, one after the other, on this machine.

Each benchmark prints its own table with ratios measured in the same run; this runner
only sequences them (in separate processes, so none inherits another's JIT or sockets)
and stops at the first failure. Copy the tables, with the command, into bench/RESULTS.md.
"""

import subprocess
import sys

BENCHMARKS = [
    ("storage kernels", ["bench.bench_storage_kernels"]),
    ("log append", ["bench.bench_log_append", "--seconds", "2", "--repeats", "1"]),
    ("intake (PUSH)", ["bench.bench_intake", "--records", "1000000"]),
    ("SDK", ["bench.bench_sdk"]),
    ("MQTT bridge", ["bench.bench_mqtt_bridge"]),  # needs mosquitto: tests/device-deps.sh
]


def main() -> int:
    for name, argv in BENCHMARKS:
        print(f"\n=== {name}: python -m {' '.join(argv)}", flush=True)
        code = subprocess.call([sys.executable, "-m", *argv])
        if code != 0:
            print(f"benchmark {name} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
