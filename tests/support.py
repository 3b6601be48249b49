"""Running a real appliance in tests: `ingest serve` as a subprocess on free loopback ports,
and a minimal raw client (one DEALER, the wire codec, nothing else)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import zmq

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec

# Heartbeats every 100 ms so that a stalled, killed or restarted worker shows quickly.
FAST_HEARTBEATS = """
[server]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
"""
# A cold numba cache compiles every kernel once (~10-30 s on 2 busy cores); `make test`
# warms it first, this covers a test run by hand on a fresh checkout.
READY_TIMEOUT_S = 120
PORTS_PER_APPLIANCE = 40


def _ephemeral_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port_block(size: int = PORTS_PER_APPLIANCE) -> int:
    """A base port whose next `size` ports are all free on loopback (best effort).

    Bases lie below the kernel's ephemeral range: a port inside it can be taken by any
    outgoing connection on the machine (a client's, a ZeroMQ reconnect) between this check
    and the appliance's bind."""
    high = _ephemeral_port_start() - size
    for _ in range(200):
        base = random.randrange(10_000, high)
        if all(_port_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Appliance:
    """One `ingest serve` process group; `start()` returns once every worker is up."""

    def __init__(self, data_dir: Path, workers: int = 2, config_text: str = "", env: dict | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.workers = workers
        self.port = free_port_block()
        self.metrics_port = self.port + PORTS_PER_APPLIANCE - 1
        self.bootstrap = f"tcp://127.0.0.1:{self.port}"
        self.config_text = config_text
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-serve.log"
        self.ctx = zmq.Context.instance()

    def start(self, wait: bool = True) -> "Appliance":
        argv = [sys.executable, "-m", "ingest.cli", "serve", "--data-dir", str(self.data_dir),
                "--workers", str(self.workers), "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        if self.config_text:
            config = self.data_dir.parent / f"{self.data_dir.name}.toml"
            config.write_text(self.config_text)
            argv += ["--config", str(config)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **self.env})
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()  # never leave a half-started appliance running behind a failed test
                raise
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ingest serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                meta = self.metadata(timeout_ms=500)
                if all(w["up"] for w in meta["workers"]):
                    return meta
            except TimeoutError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"appliance not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, endpoint: str, message, timeout_ms: int = 5000):
        """One request/reply on a fresh DEALER; returns the decoded reply."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            sock.send(message if isinstance(message, bytes) else message.encode())
            if not sock.poll(timeout_ms):
                raise TimeoutError(f"no reply from {endpoint}")
            return wire.decode_reply(sock.recv())
        finally:
            sock.close()

    def metadata(self, timeout_ms: int = 5000) -> dict:
        return self.request(self.bootstrap, wire.MetadataRequest(correlation_id=1), timeout_ms).document

    def worker_endpoints(self, worker_id: int) -> tuple[str, str]:
        """(push, requests) endpoints of a worker."""
        return (f"tcp://127.0.0.1:{self.port + 1 + 2 * worker_id}",
                f"tcp://127.0.0.1:{self.port + 2 + 2 * worker_id}")

    def owner_router(self, partition: int) -> str:
        count = self.workers if isinstance(self.workers, int) else self.metadata()["worker_count"]
        return self.worker_endpoints(partition % count)[1]

    def worker_pids(self) -> dict[int, int]:
        return {w["id"]: w["pid"] for w in self.metadata()["workers"]}

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the supervisor and wait; returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """kill -9 of the whole process group: supervisor and every worker at once."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


def fetch_all(app: Appliance, topic: str, partition: int, offset: int = 0) -> list[batch_codec.Record]:
    """Every record of a partition from `offset` on, read with FETCH from its owner."""
    records = []
    while True:
        reply = app.request(app.owner_router(partition),
                            wire.FetchRequest(topic=topic, partition=partition, offset=offset, max_bytes=1 << 20))
        assert isinstance(reply, wire.FetchReply), reply
        data = bytes(reply.records)
        for pos, _header in batch_codec.iter_batches(data):
            _, recs = batch_codec.decode_batch(data, pos)
            records.extend(r for r in recs if r.offset >= offset)
        if records:
            offset = records[-1].offset + 1
        if offset >= reply.log_end_offset:
            return records


def create_topic(app: Appliance, topic: str, partitions: int) -> None:
    """Create the topic and wait until the worker owning each partition knows it (the
    supervisor's reply comes first; the topic table reaches the workers a moment later)."""
    reply = app.request(app.bootstrap, wire.CreateTopicRequest(topic=topic, partitions=partitions))
    assert isinstance(reply, wire.CreateTopicReply), reply

    def known(partition: int) -> bool:
        request = wire.ListOffsetsRequest(topic=topic, partition=partition, timestamp_ms=wire.LATEST_TIMESTAMP)
        return isinstance(app.request(app.owner_router(partition), request), wire.ListOffsetsReply)

    for p in range(partitions):
        assert eventually(lambda: known(p), timeout_s=10), f"{topic}-{p} never reached its worker"


def eventually(condition, timeout_s: float = 5.0) -> bool:
    """True once condition() is (metrics arrive with the next heartbeat, not at once)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class IdempotentSender:
    """Acked, idempotent producer over raw frames: resends the same batch until acked."""

    def __init__(self, app: Appliance, topic: str, partition: int, producer_id: int) -> None:
        self.app, self.topic, self.partition, self.producer_id = app, topic, partition, producer_id
        self.acked: dict[bytes, int] = {}
        self.sequence = 0
        self.stop = False

    def run(self, batches: int, records_per_batch: int) -> None:
        for b in range(batches):
            if self.stop:
                return
            values = [b"p%d-b%d-r%d" % (self.partition, b, r) for r in range(records_per_batch)]
            records = [batch_codec.Record(0, int(time.time() * 1000), None, v) for v in values]
            batch = batch_codec.encode_batch(records, producer_id=self.producer_id, producer_epoch=0,
                                             base_sequence=self.sequence)
            try:
                reply = self._send_until_acked(batch)
            except SystemExit:
                return
            self.sequence += records_per_batch
            for i, v in enumerate(values):
                self.acked[v] = reply.base_offset + i

    def _send_until_acked(self, batch: bytes):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.stop:
            try:
                reply = self.app.request(self.app.owner_router(self.partition),
                                         wire.BatchMessage(topic=self.topic, partition=self.partition, batch=batch,
                                                           acks=wire.Durability.FSYNC), timeout_ms=1000)
            except TimeoutError:
                continue  # the worker is down or restarting: resend the same bytes
            if isinstance(reply, wire.ProduceReply):
                assert reply.durability == wire.Durability.FSYNC
                return reply
            # A topic just created reaches the workers a moment later: retry that too, as
            # the SDK does.
            assert ErrorCode(reply.error_code).retriable or reply.error_code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, reply
            time.sleep(0.05)
        if self.stop:
            raise SystemExit  # told to stop mid-send: this batch is simply not acked
        raise AssertionError("batch never acked")


@contextmanager
def small_tmpfs(parent: Path, size_bytes: int):
    """A tmpfs of size_bytes mounted at parent/small-disk (root), unmounted afterwards:
    a disk that fills up for real."""
    mount = parent / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
