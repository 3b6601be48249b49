"""`ingest bridge mqtt` between Debian's mosquitto (started here on a free loopback port,
persistence in a temporary directory) and a real `ingest serve`; MQTT messages are
published by a paho client and read back through the SDK.

Needs the mosquitto package (tests/install-deps.sh) and paho-mqtt (the `test` extra)."""

from __future__ import annotations

import json
import signal
import sys
import threading

import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2

from ingest.bridge.mqtt import PENDING_MESSAGES_MAX_DEFAULT
from ingest.cli import main
from ingest.net import wire
from tests.readback import read_back
from tests.mqtt_support import Bridge, Mosquitto, Publisher
from tests.support import FAST_HEARTBEATS, Appliance, create_topic, eventually, free_port_block


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    appliance = Appliance(tmp_path_factory.mktemp("bridge-appliance") / "data", workers=2,
                          config_text=FAST_HEARTBEATS)
    appliance.start()
    yield appliance
    assert appliance.stop(signal.SIGTERM) == 0, appliance.log()[-4000:]


def stored(app: Appliance, topic: str, partitions: int) -> int:
    """Records stored in the topic so far: the sum of its partitions' log end offsets."""
    total = 0
    for p in range(partitions):
        reply = app.request(app.owner_router(p), wire.ListOffsetsRequest(
            topic=topic, partition=p, timestamp_ms=wire.LATEST_TIMESTAMP))
        total += reply.offset
    return total


def kafka_partition(key: bytes, partitions: int) -> int:
    return (kafka_murmur2(key) & 0x7FFFFFFF) % partitions


def test_mqtt_messages_arrive_once_keyed_by_topic_level_and_survive_a_clean_restart(app, broker, tmp_path):
    create_topic(app, "mqtt-readings", 4)
    publisher = Publisher(broker)
    publisher.publish("sensors/dev-r/status", b'{"i":-1}', retain=True)  # a last-known value
    bridge = Bridge(app, broker, tmp_path / "bridge.log", "--topics", "sensors/#", "--topic", "mqtt-readings",
                    "--key-from", "topic-level:2", "--client-id", "bridge-once").start()
    try:
        for i in range(200):
            publisher.publish(f"sensors/dev-{i % 10}/temp", json.dumps({"i": i}).encode())
        publisher.publish("elsewhere/dev-1/temp", b"not subscribed")
        records = read_back(app.bootstrap, "mqtt-readings", 201)
        assert sorted(json.loads(r.value)["i"] for r in records) == list(range(-1, 200))  # each once
        for r in records:
            i = json.loads(r.value)["i"]
            device, kind = ("dev-r", "status") if i < 0 else (f"dev-{i % 10}", "temp")
            assert r.key == device.encode()
            assert r.partition == kafka_partition(r.key, 4)
            assert dict(r.headers) == {"mqtt_topic": f"sensors/{device}/{kind}".encode(),
                                       **({"mqtt_retain": b"1"} if i < 0 else {})}
        assert bridge.stop() == 0, bridge.log()

        # The session outlives the bridge: what is published meanwhile waits in the broker.
        for i in range(200, 250):
            publisher.publish(f"sensors/dev-{i % 10}/temp", json.dumps({"i": i}).encode())
        bridge.start()
        publisher.publish("sensors/dev-0/temp", b'{"i":250}')  # after the (re)subscription
        records = read_back(app.bootstrap, "mqtt-readings", 252)
        # Once each; the retained message is not sent again to the resumed subscription.
        assert sorted(json.loads(r.value)["i"] for r in records) == list(range(-1, 251))
        assert "session resumed" in bridge.log()
        assert bridge.stop() == 0, bridge.log()
    finally:
        publisher.close()
        bridge.kill()


def test_bridge_kill_9_under_load_loses_no_message(app, broker, tmp_path):
    """MQTT 3.1.1 (clean_session false). Messages stored in ingest whose PUBACK the kill
    prevented are delivered again: at-least-once, each redelivery marked with mqtt_dup."""
    create_topic(app, "mqtt-load", 2)
    total = 5000
    bridge = Bridge(app, broker, tmp_path / "bridge.log", "--topics", "load/+", "--topic", "mqtt-load",
                    "--client-id", "bridge-kill", "--mqtt-version", "3.1.1").start()
    publisher = Publisher(broker)
    published = threading.Event()

    def publish_all() -> None:
        for i in range(total):
            publisher.publish(f"load/{i % 7}", b"%d" % i)
        published.set()

    thread = threading.Thread(target=publish_all)
    thread.start()
    try:
        assert eventually(lambda: stored(app, "mqtt-load", 2) >= total // 10, timeout_s=30)
        bridge.kill()  # kill -9 while messages stream in (published, queued in the broker, in flight)
        assert stored(app, "mqtt-load", 2) < total, "the bridge had caught up before the kill: publish more"
        bridge.start()
        thread.join(60)
        assert published.is_set()
        records = read_back(app.bootstrap, "mqtt-load", total)
        assert bridge.stop() == 0, bridge.log()
    finally:
        published.set()
        thread.join(10)
        publisher.close()
        bridge.kill()
    values = [int(r.value) for r in records]
    assert set(values) == set(range(total))  # nothing lost
    assert all(r.key == b"load/%d" % (v % 7) for r, v in zip(records, values))  # --key-from mqtt-topic
    seen, duplicates = set(), 0
    for r, v in zip(records, values):
        if v in seen:
            duplicates += 1
            assert dict(r.headers).get("mqtt_dup") == b"1", "a second copy that is not a redelivery"
        seen.add(v)
    # Only messages received and not yet acked at the kill can be stored twice.
    assert duplicates <= PENDING_MESSAGES_MAX_DEFAULT, (duplicates, bridge.log())
    print(f"bridge kill -9: {total} messages, {duplicates} stored twice (redelivered)")


def test_bridge_errors_are_one_clear_line(app, broker, capsys, monkeypatch):
    def bridge(*options: str) -> tuple[int, str]:
        code = main(["bridge", "mqtt", "--bootstrap", app.bootstrap, "--topics", "a/#", *options])
        return code, capsys.readouterr().err

    code, err = bridge("--broker", f"127.0.0.1:{free_port_block(1)}")
    assert code == 1 and "cannot reach the MQTT broker" in err
    code, err = bridge("--broker", f"127.0.0.1:{broker.port}", "--key-from", "topic-level:0")
    assert code == 1 and "--key-from 'topic-level:0'" in err
    code, err = bridge("--broker", "localhost")
    assert code == 1 and "use HOST:PORT" in err
    code, err = bridge("--broker", f"127.0.0.1:{broker.port}", "--pending-messages-max", "70000")
    assert code == 1 and "--pending-messages-max 70000: use 1..65535" in err
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)  # as if paho-mqtt were not installed
    code, err = bridge("--broker", f"127.0.0.1:{broker.port}")
    assert code == 1 and "pip install 'ingest[mqtt]'" in err
