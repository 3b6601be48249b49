"""MQTT for tests and benchmarks: Debian's mosquitto as a real broker (a free loopback
port, persistence in a temporary directory, enough queue for a client that is away), a
paho publisher, and `ingest bridge mqtt` as a process."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.support import Appliance, eventually, free_port_block

ROOT = Path(__file__).resolve().parent.parent

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# The broker queues this many messages for the bridge while it is away (mosquitto's
# default of 1000 would drop the rest: tests publish more than that while it is down).
BROKER_QUEUED_MESSAGES_MAX = 100_000
# Generous: the bridge imports the SDK (numba) before it connects.
START_TIMEOUT_S = 60


class Mosquitto:
    """One mosquitto process; ``stop()`` ends it."""

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

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"the broker did not confirm {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
