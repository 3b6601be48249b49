"""`ingest bridge mqtt` between Debian's mosquitto (started here on a free loopback port,
persistence in a temporary directory) and a real `ingest serve`; MQTT messages are
published by a paho client and read back through the SDK.

Needs the mosquitto package (tests/device-deps.sh) and paho-mqtt (the `test` extra)."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2

from ingest.bridge.mqtt import PENDING_MAX
from ingest.cli import main
from ingest.net import wire
from tests.readback import read_back
from tests.support import FAST_HEARTBEATS, Appliance, create_topic, eventually, free_port_block

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# The broker queues this many messages for the bridge while it is away (mosquitto's
# default of 1000 would drop the rest: the test publishes more while the bridge is down).
BROKER_QUEUED_MESSAGES_MAX = 100_000
START_TIMEOUT_S = 60


class Mosquitto:
    def __init__(self, directory: Path) -> None:
        self.port = free_port_block(1)
        self.directory = directory
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"user {getpass.getuser()}\n"  # as root it would switch to `mosquitto`
            "persistence true\n"
            f"persistence_location {directory}/\n"
            f"max_queued_messages {BROKER_QUEUED_MESSAGES_MAX}\n"
            f"log_dest file {directory}/mosquitto.log\n")
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        publisher = self.client("probe")
        if not eventually(lambda: _try_connect(publisher, self.port), timeout_s=20):
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log()}")
        publisher.disconnect()

    def client(self, client_id: str) -> mqtt.Client:
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _try_connect(client: mqtt.Client, port: int) -> bool:
    try:
        client.connect("127.0.0.1", port)
        return True
    except OSError:
        return False


class Publisher:
    """A paho client publishing at QoS 1, each publish confirmed by the broker."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = broker.client(f"publisher-{os.getpid()}-{time.monotonic_ns()}")
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), f"the broker did not confirm {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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


class Bridge:
    """`ingest bridge mqtt` as a process, logging to a file."""

    def __init__(self, app: Appliance, broker: Mosquitto, log_path: Path, *options: str) -> None:
        self.argv = [sys.executable, "-m", "ingest.cli", "bridge", "mqtt", "--broker", f"127.0.0.1:{broker.port}",
                     "--bootstrap", app.bootstrap, *options]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Bridge:
        log = open(self.log_path, "ab")
        start_offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if not eventually(lambda: "subscribed to" in self.log()[start_offset:] or self.process.poll() is not None,
                          timeout_s=START_TIMEOUT_S) or self.process.poll() is not None:
            self.kill()
            raise AssertionError(f"the bridge did not subscribe:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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
    bridge = Bridge(app, broker, tmp_path / "bridge.log", "--topics", "sensors/#", "--topic", "mqtt-readings",
                    "--key-from", "topic-level:2", "--client-id", "bridge-once").start()
    publisher = Publisher(broker)
    try:
        for i in range(200):
            publisher.publish(f"sensors/dev-{i % 10}/temp", json.dumps({"i": i}).encode())
        publisher.publish("elsewhere/dev-1/temp", b"not subscribed")
        records = read_back(app.bootstrap, "mqtt-readings", 200)
        assert sorted(json.loads(r.value)["i"] for r in records) == list(range(200))  # each once
        for r in records:
            device = f"dev-{json.loads(r.value)['i'] % 10}"
            assert r.key == device.encode()
            assert r.partition == kafka_partition(r.key, 4)
            assert dict(r.headers) == {"mqtt_topic": f"sensors/{device}/temp".encode()}
        assert bridge.stop() == 0, bridge.log()

        # The session outlives the bridge: what is published meanwhile waits in the broker.
        for i in range(200, 250):
            publisher.publish(f"sensors/dev-{i % 10}/temp", json.dumps({"i": i}).encode())
        bridge.start()
        records = read_back(app.bootstrap, "mqtt-readings", 250)
        assert sorted(json.loads(r.value)["i"] for r in records) == list(range(250))
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
    seen, duplicates = set(), 0
    for r, v in zip(records, values):
        if v in seen:
            duplicates += 1
            assert dict(r.headers).get("mqtt_dup") == b"1", "a second copy that is not a redelivery"
        seen.add(v)
    # Only messages received and not yet acked at the kill can be stored twice.
    assert duplicates <= PENDING_MAX, (duplicates, bridge.log())
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
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)  # as if paho-mqtt were not installed
    code, err = bridge("--broker", f"127.0.0.1:{broker.port}")
    assert code == 1 and "pip install 'ingest[mqtt]'" in err
