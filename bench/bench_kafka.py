"""confluent-kafka against the appliance's Kafka listener next to the SDK, same appliance,
same run, interleaved.

    python -m bench.bench_kafka [--records N] [--value-bytes B] [--repeats R]

`ingest serve --workers 2` with [kafka] enabled, a topic of 2 partitions. Each repeat runs,
in this order, on fresh topics:

1. SDK Producer, acks=fsync, N keyed records (futures not kept), until flush() returns.
2. confluent-kafka Producer, acks=all (= fsync here), linger.ms=5, N keyed records,
   until flush() returns (every delivery report in).
3. SDK Consumer poll_batch() reading the N records of 1 from the beginning.
4. confluent-kafka Consumer, assign() at offset 0, poll() one message at a time, N records.

Prints records/s (median of the repeats) and each row's ratio to the SDK row of the same
direction. Results go to bench/RESULTS.md by hand, with this command line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer as CkConsumer
from confluent_kafka import Producer as CkProducer
from confluent_kafka import TopicPartition

from ingest import Consumer, Producer
from tests.support import FAST_HEARTBEATS, Appliance, create_topic

PARTITIONS = 2
KAFKA_PORT_OFFSET = 30


def sdk_produce(app, topic: str, count: int, value: bytes) -> float:
    keys = [b"device-%d" % i for i in range(1000)]
    with Producer(app.bootstrap, acks="fsync") as producer:
        started = time.perf_counter()
        for i in range(count):
            producer.send(topic, value, key=keys[i % 1000])
        producer.flush(600)
        return time.perf_counter() - started


def ck_produce(app, topic: str, count: int, value: bytes) -> float:
    keys = [b"device-%d" % i for i in range(1000)]
    producer = CkProducer({"bootstrap.servers": app.kafka_bootstrap, "acks": "all", "linger.ms": 5,
                           "enable.idempotence": True, "queue.buffering.max.messages": 1_000_000})
    failed = []
    report = lambda err, _msg: err is not None and failed.append(err)  # noqa: E731
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, value, key=keys[i % 1000], on_delivery=report)
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(600) or failed:
        raise RuntimeError(f"confluent-kafka: {len(failed)} failed deliveries")
    return time.perf_counter() - started


def sdk_consume(app, topic: str, count: int) -> float:
    with Consumer(app.bootstrap, topic, from_beginning=True) as consumer:
        started = time.perf_counter()
        got = 0
        while got < count:
            chunk = consumer.poll_batch(timeout_ms=10_000)
            if chunk is None:
                raise RuntimeError(f"poll_batch: only {got} of {count} records")
            got += len(chunk)
        return time.perf_counter() - started


def ck_consume(app, topic: str, count: int) -> float:
    consumer = CkConsumer({"bootstrap.servers": app.kafka_bootstrap, "group.id": "bench",
                           "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    started = time.perf_counter()
    got = 0
    while got < count:
        m = consumer.poll(10)
        if m is None:
            raise RuntimeError(f"confluent-kafka poll: only {got} of {count} records")
        if m.error() is None:
            got += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    value = b"x" * args.value_bytes
    rows: dict[str, list[float]] = {"sdk_produce": [], "ck_produce": [], "sdk_consume": [], "ck_consume": []}
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance(Path(tmp) / "data", workers=2)
        app.kafka_bootstrap = f"127.0.0.1:{app.port + KAFKA_PORT_OFFSET}"
        app.config_text = f"{FAST_HEARTBEATS}\n[kafka]\nenabled = true\nport = {app.port + KAFKA_PORT_OFFSET}\n"
        app.start()
        try:
            for r in range(args.repeats):
                sdk_topic, ck_topic = f"sdk{r}", f"ck{r}"
                create_topic(app, sdk_topic, PARTITIONS)
                create_topic(app, ck_topic, PARTITIONS)
                rows["sdk_produce"].append(args.records / sdk_produce(app, sdk_topic, args.records, value))
                rows["ck_produce"].append(args.records / ck_produce(app, ck_topic, args.records, value))
                rows["sdk_consume"].append(args.records / sdk_consume(app, sdk_topic, args.records))
                rows["ck_consume"].append(args.records / ck_consume(app, sdk_topic, args.records))
        finally:
            app.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    for name, base in (("sdk_produce", "sdk_produce"), ("ck_produce", "sdk_produce"),
                       ("sdk_consume", "sdk_consume"), ("ck_consume", "sdk_consume")):
        runs = ", ".join(f"{x:,.0f}" for x in rows[name])
        print(f"{name:12s} {med[name]:>12,.0f} records/s  ratio {med[name] / med[base]:.2f}  runs {runs}")


if __name__ == "__main__":
    main()
