"""Replication between two appliances on loopback: a leader and a follower, each with its
own data directory and ports, both real `ingest serve` process groups."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ingest import Consumer, Producer
from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.replication.epochs import CHECKPOINT_FILE
from ingest.shards import batch as batch_codec
from tests.support import Appliance, create_topic, eventually, metric_value

TOPIC = "telemetry"
PARTITIONS = 2
# Short enough that a test sees a stalled follower leave the in-sync set within seconds.
REPLICA_LAG_MAX_MS = 5000


def _config(peer: Appliance, role: str, min_insync: int = 2) -> str:
    return f"""
[server]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000

[replication]
role = "{role}"
peers = ["{peer.bootstrap}"]
min_insync_replicas = {min_insync}
replica_lag_max_ms = {REPLICA_LAG_MAX_MS}
peer_check_interval_ms = 200
fetch_max_wait_ms = 200
high_watermark_checkpoint_interval_ms = 200
"""


@pytest.fixture
def pair(tmp_path):
    """(leader, follower), not started; each lists the other as its peer."""
    a = Appliance(tmp_path / "a", workers=2)
    b = Appliance(tmp_path / "b", workers=2)
    a.config_text = _config(b, "leader")
    b.config_text = _config(a, "follower")
    yield a, b
    for app in (a, b):
        if app.process is not None:
            try:
                os.killpg(app.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        app.kill()


def _start_both(*apps: Appliance) -> None:
    for app in apps:
        app.start(wait=False)
    for app in apps:
        app.wait_ready()


def _role(app: Appliance) -> dict:
    return app.metadata()["replication"]


def _is_follower_at(app: Appliance, epoch: int) -> bool:
    role = _role(app)
    return role["role"] == "follower" and role["leader_epoch"] == epoch


def _produce(app: Appliance, partition: int, batch: bytes, acks: int, timeout_ms: int = 5000):
    return app.request(app.owner_router(partition),
                       wire.BatchMessage(topic=TOPIC, partition=partition, batch=batch, acks=acks),
                       timeout_ms=timeout_ms)


def _batch(values: list[bytes], producer_id: int = -1, sequence: int = -1) -> bytes:
    records = [batch_codec.Record(0, int(time.time() * 1000), None, v) for v in values]
    if producer_id < 0:
        return batch_codec.encode_batch(records)
    return batch_codec.encode_batch(records, producer_id=producer_id, producer_epoch=0, base_sequence=sequence)


def _visible(app: Appliance, partition: int) -> list[bytes]:
    """Every value a consumer can read from the partition (below the high watermark)."""
    values, offset = [], 0
    while True:
        reply = app.request(app.owner_router(partition),
                            wire.FetchRequest(topic=TOPIC, partition=partition, offset=offset, max_bytes=1 << 20))
        assert isinstance(reply, wire.FetchReply), reply
        data = bytes(reply.records)
        for pos, _header in batch_codec.iter_batches(data):
            values += [r.value for r in batch_codec.decode_batch(data, pos)[1] if r.offset >= offset]
            offset = _header.last_offset + 1
        if offset >= reply.high_watermark:
            return values


def _log_end(app: Appliance, partition: int) -> int:
    reply = app.request(app.owner_router(partition),
                        wire.ListOffsetsRequest(topic=TOPIC, partition=partition, timestamp_ms=wire.LATEST_TIMESTAMP))
    return reply.offset


def _segment_bytes(app: Appliance, partition: int) -> bytes:
    directory = app.data_dir / f"{TOPIC}-{partition}"
    return b"".join(p.read_bytes() for p in sorted(directory.glob("*.log")))


def _caught_up(leader: Appliance, follower: Appliance) -> bool:
    text = follower.metrics_text()
    return all(metric_value(text, "ingest_log_end_offset", topic=TOPIC, partition=str(p)) == _log_end(leader, p)
               and metric_value(text, "ingest_replica_lag_records", topic=TOPIC, partition=str(p)) == 0
               for p in range(PARTITIONS))


def _in_sync(leader: Appliance, count: int) -> bool:
    text = leader.metrics_text()
    return all(metric_value(text, "ingest_partition_in_sync_replicas", topic=TOPIC, partition=str(p)) == count
               for p in range(PARTITIONS))


def _promote(app: Appliance) -> str:
    out = subprocess.run([sys.executable, "-m", "ingest.cli", "promote", "--bootstrap", app.bootstrap],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


class AcksAllSender(threading.Thread):
    """An idempotent producer of one partition over raw frames: sends numbered batches with
    acks=all to whichever appliance `target()` names, resending the same bytes until a
    reply, and records the offset of every acknowledged value."""

    def __init__(self, target, partition: int, producer_id: int) -> None:
        super().__init__(daemon=True)
        self.target, self.partition, self.producer_id = target, partition, producer_id
        self.acks = wire.Durability.ALL
        self.acked: dict[bytes, int] = {}
        self.sent: set[bytes] = set()
        self.stop = threading.Event()
        self.sequence = 0

    def run(self) -> None:
        b = 0
        while not self.stop.is_set():
            values = [b"p%d-b%d-r%d" % (self.partition, b, r) for r in range(10)]
            batch = _batch(values, self.producer_id, self.sequence)
            self.sent.update(values)
            reply = self._until_acked(batch)
            if reply is None:
                return
            self.sequence += len(values)
            for i, v in enumerate(values):
                self.acked[v] = reply.base_offset + i
            b += 1

    def _until_acked(self, batch: bytes):
        while not self.stop.is_set():
            try:
                reply = _produce(self.target(), self.partition, batch, self.acks, timeout_ms=1000)
            except TimeoutError:
                continue  # the leader is gone: resend the same bytes to whoever leads now
            if isinstance(reply, wire.ProduceReply):
                return reply
            assert ErrorCode(reply.error_code).retriable, reply
            time.sleep(0.05)
        return None


def test_acks_all_records_survive_kill_9_of_the_leader_exactly_once_and_the_old_leader_is_fenced(pair):
    leader, follower = pair
    _start_both(leader, follower)
    assert _role(leader)["role"] == "leader" and _role(follower)["role"] == "follower"
    create_topic(leader, TOPIC, PARTITIONS)
    assert eventually(lambda: TOPIC in follower.metadata()["topics"], timeout_s=10)
    assert eventually(lambda: _in_sync(leader, 2), timeout_s=20), leader.metrics_text()
    # Only the configured peers fetch as followers: a client posing as one is refused.
    impostor = wire.ReplicaFetchRequest(TOPIC, 0, 0, 1 << 20, 0, 0, "impostor")
    refused = leader.request(leader.owner_router(0), impostor)
    assert isinstance(refused, wire.ErrorReply) and refused.error_code == ErrorCode.INVALID_REQUEST, refused

    current = {"app": leader}
    senders = [AcksAllSender(lambda: current["app"], p, 1000 + p) for p in range(PARTITIONS)]
    for s in senders:
        s.start()
    assert eventually(lambda: all(len(s.acked) >= 200 for s in senders), timeout_s=30)

    leader.kill()  # kill -9 of every process of the leader, under load
    acked_before_kill = {v: o for s in senders for v, o in s.acked.items()}
    assert "leader at leader epoch 1" in _promote(follower)
    role = _role(follower)
    assert (role["role"], role["leader_epoch"]) == ("leader", 1)
    # The follower alone is not min_insync_replicas = 2: what was in flight is resent
    # with acks=fsync, as a producer that accepts less durability would.
    for s in senders:
        s.acks = wire.Durability.FSYNC
    current["app"] = follower
    assert eventually(lambda: all(len(s.acked) >= len(acked_before_kill) // PARTITIONS + 50 for s in senders),
                      timeout_s=30)
    for s in senders:
        s.stop.set()
        s.join(10)

    for p, s in enumerate(senders):
        stored = _visible(follower, p)
        assert len(stored) == len(set(stored)), "a record is stored twice"
        for value, offset in s.acked.items():
            assert stored.count(value) == 1, (value, offset, stored[offset - 3:offset + 3], len(stored),
                                              value in acked_before_kill)
        assert set(stored) <= s.sent
    for value, offset in acked_before_kill.items():
        p = int(value.split(b"-")[0][1:])
        assert _visible(follower, p)[offset] == value  # at the offset it was acked with

    # The old leader comes back believing it leads epoch 0: it learns of epoch 1 before
    # its workers start, refuses produce and follows the new leader.
    leader.start()
    assert _role(leader)["role"] == "follower" and _role(leader)["leader_epoch"] == 1
    refused = _produce(leader, 0, _batch([b"to-the-old-leader"]), wire.Durability.FSYNC)
    assert isinstance(refused, wire.ErrorReply) and refused.error_code == ErrorCode.NOT_LEADER
    assert eventually(lambda: _caught_up(follower, leader), timeout_s=30)
    assert eventually(lambda: _in_sync(follower, 2), timeout_s=20)  # back in the in-sync set
    status = subprocess.run([sys.executable, "-m", "ingest.cli", "status", "--bootstrap", follower.bootstrap],
                            capture_output=True, text=True, timeout=30).stdout
    assert "replication: leader at leader epoch 1" in status and "in-sync replicas min 2" in status, status
    follower.stop()
    leader.stop()
    for p in range(PARTITIONS):
        assert _segment_bytes(leader, p) == _segment_bytes(follower, p)
        checkpoint = (follower.data_dir / f"{TOPIC}-{p}" / CHECKPOINT_FILE).read_text().split("\n")
        assert checkpoint[0] == "0" and [int(line.split()[0]) for line in checkpoint[2:] if line] == [0, 1]


def test_unreplicated_writes_of_an_old_leader_are_never_seen_and_truncated_when_it_returns(pair):
    leader, follower = pair
    _start_both(leader, follower)
    create_topic(leader, TOPIC, PARTITIONS)
    assert eventually(lambda: _in_sync(leader, 2), timeout_s=20), leader.metrics_text()
    for p in range(PARTITIONS):
        reply = _produce(leader, p, _batch([b"replicated-%d-%d" % (p, i) for i in range(5)]), wire.Durability.ALL)
        assert isinstance(reply, wire.ProduceReply) and reply.durability == wire.Durability.ALL, reply
    replicated_end = [_log_end(leader, p) for p in range(PARTITIONS)]
    assert replicated_end == [5, 5]

    # Freeze the follower: the link is as good as cut.
    os.killpg(follower.process.pid, signal.SIGSTOP)
    for p in range(PARTITIONS):
        reply = _produce(leader, p, _batch([b"unreplicated-%d" % p]), wire.Durability.WRITTEN)
        assert isinstance(reply, wire.ProduceReply) and reply.base_offset == 5
        # Consumers read below the high watermark: not what only the leader has.
        assert _visible(leader, p) == [b"replicated-%d-%d" % (p, i) for i in range(5)]
    # Not even after kill -9 of the worker that leads partition 0: the restarted worker
    # resumes the high watermark and in-sync set of its checkpoint.
    checkpoint = leader.data_dir / f"{TOPIC}-0" / "high-watermark-checkpoint"
    assert eventually(lambda: checkpoint.exists() and b'"high_watermark":5' in checkpoint.read_bytes(), timeout_s=15)
    killed = leader.worker_pids()[0]
    os.kill(killed, signal.SIGKILL)
    assert eventually(lambda: leader.worker_pids()[0] not in (None, killed)
                      and all(w["up"] for w in leader.metadata()["workers"]), timeout_s=60)
    assert _visible(leader, 0) == [b"replicated-0-%d" % i for i in range(5)]
    # acks=all neither hangs nor lies: once the follower has been out of sync for
    # replica_lag_max_ms, the reply is NOT_ENOUGH_REPLICAS.
    started = time.monotonic()
    reply = _produce(leader, 0, _batch([b"never-acked"]), wire.Durability.ALL, timeout_ms=REPLICA_LAG_MAX_MS + 10_000)
    assert isinstance(reply, wire.ErrorReply) and reply.error_code == ErrorCode.NOT_ENOUGH_REPLICAS, reply
    assert time.monotonic() - started < REPLICA_LAG_MAX_MS / 1000 + 5
    assert eventually(lambda: _in_sync(leader, 1), timeout_s=5)
    reply = _produce(leader, 1, _batch([b"refused"]), wire.Durability.ALL)
    assert isinstance(reply, wire.ErrorReply) and reply.error_code == ErrorCode.NOT_ENOUGH_REPLICAS

    # Both die; the follower never got those writes (a fetch reply sitting in its socket
    # when it was frozen dies with it). It comes back, is promoted and takes new writes.
    follower.kill()
    leader.kill()
    follower.start()
    assert _role(follower)["role"] == "follower"
    _promote(follower)
    for p in range(PARTITIONS):
        reply = _produce(follower, p, _batch([b"new-leader-%d" % p]), wire.Durability.FSYNC)
        assert isinstance(reply, wire.ProduceReply) and reply.base_offset == 5, reply

    leader.start()
    # Clients that list both appliances follow the leader through metadata, even with
    # the old leader (a follower now) listed first.
    both = f"{leader.bootstrap},{follower.bootstrap}"
    with Producer(both, acks="fsync") as producer:
        assert producer.send(TOPIC, b"via-metadata", partition=0).result(timeout=30) == (0, 6)
    with Consumer(both, TOPIC, from_beginning=True) as consumer:
        seen = [r.value for r in itertools.islice(consumer.records(idle_timeout_ms=10_000), 13)]
    assert sorted(seen) == sorted([b"replicated-%d-%d" % (p, i) for p in range(PARTITIONS) for i in range(5)]
                                  + [b"new-leader-0", b"new-leader-1", b"via-metadata"])
    assert eventually(lambda: _caught_up(follower, leader), timeout_s=30)

    # A planned switch-over, both running: the old leader is promoted again (epoch 2); the
    # current one sees a newer epoch at its next peer check and steps down by itself.
    assert "leader at leader epoch 2" in _promote(leader)
    assert eventually(lambda: _is_follower_at(follower, epoch=2), timeout_s=10)
    refused = _produce(follower, 1, _batch([b"to-the-replaced-leader"]), wire.Durability.WRITTEN)
    assert isinstance(refused, wire.ErrorReply) and refused.error_code == ErrorCode.NOT_LEADER
    reply = _produce(leader, 1, _batch([b"epoch-2"]), wire.Durability.FSYNC)
    assert isinstance(reply, wire.ProduceReply) and reply.base_offset == 6, reply
    assert eventually(lambda: _caught_up(leader, follower), timeout_s=30)
    follower.stop()
    leader.stop()
    for p in range(PARTITIONS):
        assert _segment_bytes(leader, p) == _segment_bytes(follower, p)
        values = [r.value for pos, _ in batch_codec.iter_batches(_segment_bytes(leader, p))
                  for r in batch_codec.decode_batch(_segment_bytes(leader, p), pos)[1]]
        assert values == ([b"replicated-%d-%d" % (p, i) for i in range(5)] + [b"new-leader-%d" % p]
                          + ([b"via-metadata"] if p == 0 else [b"epoch-2"]))
