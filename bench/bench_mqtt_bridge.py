"""The MQTT bridge next to its ceiling, in one run on this machine.

    python -m bench.bench_mqtt_bridge [--messages N] [--payload-bytes B] [--repeats R]

A backlog of N QoS-1 messages waits in mosquitto (started here, loopback) for a persistent
session; then the consumer connects and drains it. Messages/s from the first message to
the last:

- ceiling: a plain paho subscriber that acks each message as it arrives (paho's
  automatic ack) and does nothing else;
- bridge: `ingest bridge mqtt` (a separate process), timed from the first record stored
  in ingest to the last, every record on disk (acks=fsync) before its PUBACK, with
  --pending-messages-max 200 and the default 1000 (the bound on duplicates after a crash).

Both for MQTT 5 (Receive Maximum 1000 for the paho subscriber) and MQTT 3.1.1 (mosquitto's
max_inflight_messages, 20 by default). Median of ``--repeats``. mosquitto, the appliance (2 workers) and the
consumer share the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from importlib.metadata import version as version_of
from pathlib import Path

import paho.mqtt.client as mqtt

from ingest.bridge.mqtt import PENDING_MESSAGES_MAX_DEFAULT
from ingest.net import wire
from tests.mqtt_support import Bridge, Mosquitto
from tests.support import Appliance, create_topic

PUBLISH_WINDOW = 1000  # the publisher's own in-flight messages while filling the backlog


def _client(client_id: str, version: str) -> mqtt.Client:
    v5 = version == "5"
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                       clean_session=None if v5 else False,
                       protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)


def _connect(client: mqtt.Client, port: int, version: str) -> None:
    if version == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        properties.ReceiveMaximum = PENDING_MESSAGES_MAX_DEFAULT
        client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    else:
        client.connect("127.0.0.1", port)


def _fill_backlog(broker: Mosquitto, topic: str, messages: int, payload: bytes) -> None:
    publisher = broker.client(f"bench-publisher-{time.monotonic_ns()}")
    publisher.max_inflight_messages_set(PUBLISH_WINDOW)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    infos = [publisher.publish(f"{topic}/{i % 100}", payload, qos=1) for i in range(messages)]
    for info in infos:
        info.wait_for_publish(60)
    publisher.disconnect()
    publisher.loop_stop()


def paho_ceiling(broker: Mosquitto, version: str, messages: int, payload: bytes, run: int) -> float:
    topic = f"ceiling{version.replace('.', '')}-{run}"
    client_id = f"bench-subscriber-{topic}"
    received = []
    done = threading.Event()

    def on_message(client, userdata, message) -> None:
        received.append(time.perf_counter())
        if len(received) == messages:
            done.set()

    subscribed = threading.Event()
    client = _client(client_id, version)
    client.on_subscribe = lambda *args: subscribed.set()
    _connect(client, broker.port, version)
    client.loop_start()
    client.subscribe(f"{topic}/#", 1)
    subscribed.wait(10)
    client.disconnect()
    client.loop_stop()
    _fill_backlog(broker, topic, messages, payload)
    client = _client(client_id, version)
    client.on_message = on_message
    _connect(client, broker.port, version)
    client.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"the subscriber got {len(received)} of {messages}")
    client.disconnect()
    client.loop_stop()
    return (messages - 1) / (received[-1] - received[0])


def _stored(app: Appliance, topic: str, partitions: int) -> int:
    total = 0
    for p in range(partitions):
        reply = app.request(app.owner_router(p), wire.ListOffsetsRequest(
            topic=topic, partition=p, timestamp_ms=wire.LATEST_TIMESTAMP))
        total += reply.offset
    return total


def bridge_rate(app: Appliance, broker: Mosquitto, log_dir: Path, version: str, messages: int,
                payload: bytes, run: int, pending_max: int) -> float:
    topic = f"bridge{version.replace('.', '')}-{pending_max}-{run}"
    create_topic(app, topic, 2)
    bridge = Bridge(app, broker, log_dir / f"{topic}.log", "--topics", f"{topic}/#", "--topic", topic,
                    "--client-id", f"bench-{topic}", "--mqtt-version", version,
                    "--pending-messages-max", str(pending_max)).start()
    assert bridge.stop() == 0  # the session exists; the backlog waits for it
    _fill_backlog(broker, topic, messages, payload)
    bridge.start()
    try:
        while _stored(app, topic, 2) == 0:
            time.sleep(0.002)
        first = time.perf_counter()
        while (count := _stored(app, topic, 2)) < messages:
            time.sleep(0.005)
        last = time.perf_counter()
        assert count == messages, count
        assert bridge.stop() == 0
    finally:
        bridge.kill()
    return messages / (last - first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    payload = b"x" * args.payload_bytes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "mosquitto").mkdir()
        broker = Mosquitto(tmp / "mosquitto")
        app = Appliance(tmp / "data", workers=2).start()
        try:
            rows = []
            for version in ("5", "3.1.1"):
                rates: dict[str, list[float]] = {"paho": [], "200": [], "1000": []}
                for run in range(args.repeats):  # interleaved: drifts in load hit all three
                    rates["paho"].append(paho_ceiling(broker, version, args.messages, payload, run))
                    for pending_max in (200, 1000):
                        rates[str(pending_max)].append(bridge_rate(
                            app, broker, tmp, version, args.messages, payload, run, pending_max))
                rows.append((version, {k: statistics.median(v) for k, v in rates.items()}))
        finally:
            app.stop()
            broker.stop()
    print(f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
          f"paho-mqtt {version_of('paho-mqtt')}; {args.messages} messages of {args.payload_bytes} B, "
          f"median of {args.repeats}\n")
    print("| MQTT | paho subscriber, auto-ack | bridge, pending max 200 | bridge, pending max 1000 "
          "| 1000 vs 200 | 1000 vs paho |")
    print("|---|---:|---:|---:|---:|---:|")
    for version, m in rows:
        print(f"| {version} | {m['paho']:,.0f} msg/s | {m['200']:,.0f} msg/s | {m['1000']:,.0f} msg/s "
              f"| {m['1000'] / m['200']:.2f}x | {m['1000'] / m['paho']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
