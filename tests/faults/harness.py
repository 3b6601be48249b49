"""Tools of the fault tests: the quick/soak switch, acked producers that survive faults,
the verdict on what a partition holds, and the ledger every scenario writes its numbers to.

Quick mode (the default, part of `make test`) runs few rounds with short durations; soak
mode (`INGEST_SOAK=1`, `make soak`) runs each scenario's soak figures. Randomness comes
from INGEST_FAULT_SEED (default below), so a failing run can be replayed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec
from ingest.shards.check import check_data_dir
from ingest.shards.layout import RECORD_BATCH_OVERHEAD
from tests.support import Appliance

SOAK = os.environ.get("INGEST_SOAK", "").strip() not in ("", "0")
MODE = "soak" if SOAK else "quick"
SEED = int(os.environ.get("INGEST_FAULT_SEED", "20240611"))

# A request to a live worker is answered in milliseconds; on this shared 2-core machine a
# group commit under load can take a second. Past this the producer resends the same bytes
# (idempotence makes that safe), as a client would after a lost reply.
REQUEST_TIMEOUT_MS = 2000
# How long one batch may go unacked (worker restarts back off up to 5 s, and a restart
# under load on 2 cores takes a few seconds more) before the test calls it a failure.
BATCH_ACK_DEADLINE_S = 90
# A fetch asks for this much: big enough that a verification reads a partition in few
# round trips, below the worker's 8 MiB cap.
FETCH_BYTES = 4 << 20
# Wait between retries of a retriable error (THROTTLED, SHUTTING_DOWN, DISK_FULL).
RETRY_BACKOFF_S = 0.05
# Log end offsets that have not moved for this long have taken in every queued frame
# (a worker drains its queues in milliseconds once the senders stop).
SETTLED_S = 2.0


def by_mode(quick, soak):
    """The quick figure, or the soak figure under INGEST_SOAK=1."""
    return soak if SOAK else quick


def rng_for(name: str) -> random.Random:
    """A generator seeded by the run's seed and the scenario, stable across runs."""
    return random.Random(f"{SEED}:{name}")


# ---- acked producers -------------------------------------------------------------------


class AckedProducer:
    """An idempotent producer in a thread: one partition, one batch in flight, the same
    bytes resent until acked (as Kafka's idempotent producer does), across worker and
    appliance restarts. Records every acked value -> offset and every value ever sent.

    Values are unique per (producer_id, batch, record) and padded with bytes derived from
    them, so a corrupt record can never pass for a produced one.
    """

    def __init__(self, app: Appliance, topic: str, partition: int, producer_id: int,
                 acks: int = wire.Durability.FSYNC, records_per_batch: int = 5,
                 value_bytes: int = 40, max_batches: int | None = None) -> None:
        self.app, self.topic, self.partition = app, topic, partition
        self.producer_id, self.acks = producer_id, acks
        self.records_per_batch, self.value_bytes = records_per_batch, value_bytes
        self.max_batches = max_batches
        self.acked: dict[bytes, int] = {}
        self.sent: set[bytes] = set()
        self.batches_acked = 0
        self.resends = 0
        self.retriable_errors: dict[str, int] = {}  # error name -> replies
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"producer-{producer_id}", daemon=True)
        self._correlation_id = 0

    # ---- control -----------------------------------------------------------------------

    def start(self) -> AckedProducer:
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the thread to stop after the batch in flight (which may stay unacked)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30) -> None:
        """request_stop() and wait."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"producer {self.producer_id} did not stop")

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def acked_snapshot(self) -> dict[bytes, int]:
        with self._lock:
            return dict(self.acked)

    def sent_snapshot(self) -> set[bytes]:
        with self._lock:
            return set(self.sent)

    def wait_acked(self, batches: int, timeout_s: float) -> bool:
        """True once `batches` more batches are acked than when called."""
        target = self.batches_acked + batches
        deadline = time.monotonic() + timeout_s
        while self.batches_acked < target and time.monotonic() < deadline:
            if self.error is not None or not self.alive:
                return False
            time.sleep(0.02)
        return self.batches_acked >= target

    # ---- the thread --------------------------------------------------------------------

    def values(self, batch_number: int) -> list[bytes]:
        out = []
        for r in range(self.records_per_batch):
            head = b"%d:%d:%d:" % (self.producer_id, batch_number, r)
            pad = (head * (1 + self.value_bytes // len(head)))[: max(0, self.value_bytes - len(head))]
            out.append(head + pad)
        return out

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.app.owner_router(self.partition))
        try:
            sequence, b = 0, 0
            while not self._stop.is_set() and (self.max_batches is None or b < self.max_batches):
                values = self.values(b)
                records = [batch_codec.Record(0, int(time.time() * 1000), None, v) for v in values]
                batch = batch_codec.encode_batch(records, producer_id=self.producer_id, producer_epoch=0,
                                                 base_sequence=sequence)
                with self._lock:
                    self.sent.update(values)
                reply = self._send_until_acked(sock, batch)
                if reply is None:
                    return  # stopped with this batch unacked
                with self._lock:
                    for i, v in enumerate(values):
                        self.acked[v] = reply.base_offset + i
                    self.batches_acked += 1
                sequence += self.records_per_batch
                b += 1
        except BaseException as e:  # reported by the test through .error
            self.error = e
        finally:
            sock.close()

    def _send_until_acked(self, sock, batch: bytes):
        """The ProduceReply for `batch`, or None if stopped first. Replies to earlier
        attempts of the same batch count (same bytes: the same offsets)."""
        deadline = time.monotonic() + BATCH_ACK_DEADLINE_S
        attempts: set[int] = set()
        while time.monotonic() < deadline:
            if self._stop.is_set():
                return None
            self._correlation_id = (self._correlation_id + 1) % (1 << 31)
            cid = self._correlation_id
            attempts.add(cid)
            if len(attempts) > 1:
                self.resends += 1
            sock.send(wire.BatchMessage(topic=self.topic, partition=self.partition, batch=batch,
                                        acks=self.acks, correlation_id=cid).encode())
            until = time.monotonic() + REQUEST_TIMEOUT_MS / 1000
            while (left_ms := int((until - time.monotonic()) * 1000)) > 0:
                if not sock.poll(min(left_ms, 100)):
                    if self._stop.is_set():
                        return None
                    continue
                reply = wire.decode_reply(sock.recv())
                if isinstance(reply, wire.ProduceReply) and reply.correlation_id in attempts:
                    if reply.durability < self.acks:
                        raise AssertionError(f"asked acks={self.acks}, reply says {reply.durability}")
                    return reply
                if isinstance(reply, wire.ErrorReply) and reply.correlation_id == cid:
                    code = ErrorCode(reply.error_code)
                    if not code.retriable:
                        raise AssertionError(f"producer {self.producer_id}: non-retriable {reply}")
                    self.retriable_errors[code.name] = self.retriable_errors.get(code.name, 0) + 1
                    time.sleep(RETRY_BACKOFF_S)
                    break  # resend now
        raise AssertionError(f"producer {self.producer_id}: batch never acked in {BATCH_ACK_DEADLINE_S} s")


def start_producers(app: Appliance, topic: str, partitions: list[int], first_id: int, **kwargs) -> list[AckedProducer]:
    return [AckedProducer(app, topic, p, first_id + i, **kwargs).start() for i, p in enumerate(partitions)]


def stop_producers(producers: list[AckedProducer]) -> None:
    for p in producers:
        p.request_stop()
    for p in producers:
        p.stop()
    failures = [f"producer {p.producer_id}: {p.error!r}" for p in producers if p.error is not None]
    if failures:
        raise AssertionError("; ".join(failures))


def check_producers_healthy(producers: list[AckedProducer]) -> None:
    failures = [f"producer {p.producer_id}: {p.error!r}" for p in producers if p.error is not None]
    if failures:
        raise AssertionError("; ".join(failures))


# ---- reading back ----------------------------------------------------------------------


@dataclass
class Stored:
    """What a partition serves: records by offset, and whatever could not be decoded."""

    records: list[batch_codec.Record] = field(default_factory=list)
    corrupt_batches: int = 0  # batches served with a bad CRC or bad records
    errors: list[str] = field(default_factory=list)  # error replies met (offset: message)


def fetch_partition(app: Appliance, topic: str, partition: int, start: int = 0,
                    skip_to: list[int] | None = None) -> Stored:
    """Every record served from `start` to the log end. A fetch error (a corrupt region
    is answered with STORAGE_ERROR) jumps to the next offset of `skip_to` (segment base
    offsets) if there is one, else ends the read."""
    out, offset = Stored(), start
    sock = app.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(app.owner_router(partition))
    try:
        while True:
            sock.send(wire.FetchRequest(topic=topic, partition=partition, offset=offset,
                                        max_bytes=FETCH_BYTES).encode())
            if not sock.poll(15_000):
                raise TimeoutError(f"no fetch reply from {topic}-{partition} at offset {offset}")
            reply = wire.decode_reply(sock.recv())
            if isinstance(reply, wire.ErrorReply):
                out.errors.append(f"{offset}: {ErrorCode(reply.error_code).name} {reply.message}")
                later = [o for o in (skip_to or []) if o > offset]
                if not later:
                    return out
                offset = min(later)
                continue
            assert isinstance(reply, wire.FetchReply), reply
            data = bytes(reply.records)
            offset = _decode_into(out, data, offset)
            if offset >= reply.log_end_offset or not data:
                return out
    finally:
        sock.close()


def fetch_once(app: Appliance, topic: str, partition: int, offset: int, max_bytes: int) -> Stored:
    """One fetch at `offset`, as a consumer resuming from a committed offset does."""
    out = Stored()
    reply = app.request(app.owner_router(partition), wire.FetchRequest(topic=topic, partition=partition,
                                                                        offset=offset, max_bytes=max_bytes),
                        timeout_ms=15_000)
    if isinstance(reply, wire.ErrorReply):
        out.errors.append(f"{offset}: {ErrorCode(reply.error_code).name} {reply.message}")
        return out
    _decode_into(out, bytes(reply.records), offset)
    return out


def _decode_into(out: Stored, data: bytes, offset: int) -> int:
    """Append the records of `data` at or after `offset`; returns the next offset to ask."""
    pos = 0
    while pos + RECORD_BATCH_OVERHEAD <= len(data):
        header = batch_codec.parse_header(data, pos)
        if header.size_bytes < RECORD_BATCH_OVERHEAD or pos + header.size_bytes > len(data):
            out.corrupt_batches += 1  # a header whose length cannot be right
            return offset + 1
        try:
            _, records = batch_codec.decode_batch(data, pos)
        except batch_codec.CorruptBatchError:
            out.corrupt_batches += 1
            records = []
        out.records.extend(r for r in records if r.offset >= offset)
        offset = max(offset, header.last_offset + 1)
        pos += header.size_bytes
    return offset


def log_end_offsets(app: Appliance, topic: str, partitions: int) -> list[int]:
    return [app.request(app.owner_router(p), wire.ListOffsetsRequest(topic=topic, partition=p,
                                                                     timestamp_ms=wire.LATEST_TIMESTAMP)).offset
            for p in range(partitions)]


def settled(app: Appliance, topic: str, partitions: int, timeout_s: float = 120) -> int:
    """Sum of log end offsets once they stop moving for SETTLED_S (queued frames all
    taken in)."""
    last, still_since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = sum(log_end_offsets(app, topic, partitions))
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since > SETTLED_S:
            return now
        time.sleep(0.2)
    raise AssertionError(f"{topic}: log end offsets still moving after {timeout_s} s")


@dataclass
class Verdict:
    """Acked records checked, and those not found exactly once at their acked offset."""

    acked: int = 0
    lost: list = field(default_factory=list)  # (value, acked offset, offsets found)
    duplicated: list = field(default_factory=list)  # (value, offsets): any sent value stored twice
    foreign: list = field(default_factory=list)  # (offset, value) nobody sent
    corrupt_served: int = 0

    def add(self, other: Verdict) -> None:
        self.acked += other.acked
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.foreign += other.foreign
        self.corrupt_served += other.corrupt_served

    def summary(self) -> str:
        return (f"{self.acked} acked checked: {len(self.lost)} lost, {len(self.duplicated)} stored twice, "
                f"{len(self.foreign)} unexpected, {self.corrupt_served} corrupt batches served")

    def assert_clean(self) -> None:
        assert not self.lost, f"{self.summary()}; lost e.g. {self.lost[:3]}"
        assert not self.duplicated, f"{self.summary()}; stored twice e.g. {self.duplicated[:3]}"
        assert not self.foreign, f"{self.summary()}; unexpected e.g. {self.foreign[:3]}"
        assert not self.corrupt_served, self.summary()


def verify_partition(app: Appliance, topic: str, partition: int, producers: list[AckedProducer],
                     acked: dict[bytes, int] | None = None, start: int = 0) -> Verdict:
    """Read the partition from `start` and judge it: each acked value (default: every
    producer's acked records at or after `start`) exactly once at its acked offset, no
    value stored twice, nothing stored that no producer sent."""
    mine = [p for p in producers if p.topic == topic and p.partition == partition]
    if acked is None:
        acked = {}
        for p in mine:
            acked.update(p.acked_snapshot())
    acked = {v: o for v, o in acked.items() if o >= start}
    stored = fetch_partition(app, topic, partition, start)
    sent: set[bytes] = set()  # after the fetch: producers may still be sending
    for p in mine:
        sent |= p.sent_snapshot()
    offsets_of: dict[bytes, list[int]] = {}
    verdict = Verdict(acked=len(acked), corrupt_served=stored.corrupt_batches)
    for r in stored.records:
        offsets_of.setdefault(r.value, []).append(r.offset)
        if r.value not in sent:
            verdict.foreign.append((r.offset, r.value))
    for value, offset in acked.items():
        if offset not in offsets_of.get(value, ()):
            verdict.lost.append((value, offset, offsets_of.get(value)))
    verdict.duplicated = [(v, o) for v, o in offsets_of.items() if len(o) > 1]
    return verdict


def verify(app: Appliance, topic: str, partitions, producers: list[AckedProducer]) -> Verdict:
    total = Verdict()
    for p in partitions:
        total.add(verify_partition(app, topic, p, producers))
    return total


# ---- rounds of faults under load ------------------------------------------------------


# Small segments so that segments roll under load and recovery meets sealed segments,
# recovery points and rolls cut short by the kill; fast heartbeats so a restarted worker
# shows up (and metrics arrive) quickly.
CONFIG = """
[server]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000

[storage]
segment_bytes = 262144
"""
PARTITIONS = 4
# Soak runs verify everything every this many rounds, and only what is new in between
# (a full read of a log that grows every round would dominate a 200-round run).
FULL_CHECK_EVERY_ROUNDS = 10
# A restarted worker or appliance must serve again within this (cold numba cache, a
# recovery scan and the supervisor's restart backoff, on a busy 2-core machine).
RESTART_TIMEOUT_S = 60


class RoundChecker:
    """Verifies, after each round, the records acked before its fault; keeps the union
    of every value found lost or stored twice over all rounds."""

    def __init__(self, app: Appliance, topic: str, producers) -> None:
        self.app, self.topic, self.producers = app, topic, producers
        self.verified_end: dict[int, int] = {}
        self.lost: set = set()
        self.duplicated: set = set()
        self.bad_rounds: list[int] = []
        self.checks = 0

    def snapshot(self) -> dict[int, dict[bytes, int]]:
        by_partition: dict[int, dict[bytes, int]] = {}
        for p in self.producers:
            by_partition.setdefault(p.partition, {}).update(p.acked_snapshot())
        return by_partition

    def check(self, round_number: int, snapshot: dict[int, dict[bytes, int]]) -> None:
        """Verify `snapshot` (acked before round `round_number`'s fault): all of each log
        in quick mode and every FULL_CHECK_EVERY_ROUNDS in soak mode, else what is new."""
        full = not SOAK or (round_number + 1) % FULL_CHECK_EVERY_ROUNDS == 0
        verdict = Verdict()
        for partition, acked in snapshot.items():
            start = 0 if full else self.verified_end.get(partition, 0)
            verdict.add(verify_partition(self.app, self.topic, partition, self.producers, acked, start))
            self.verified_end[partition] = max(acked.values(), default=-1) + 1
        self.checks += verdict.acked
        self.lost |= {v for v, *_ in verdict.lost}
        self.duplicated |= {v for v, _ in verdict.duplicated}
        if verdict.lost or verdict.duplicated or verdict.foreign or verdict.corrupt_served:
            self.bad_rounds.append(round_number)

    def finish(self, row, final: Verdict) -> None:
        self.lost |= {v for v, *_ in final.lost}
        self.duplicated |= {v for v, _ in final.duplicated}
        account(row, final)
        row.lost, row.duplicated = len(self.lost), len(self.duplicated)
        row.notes["per_round_checks"] = self.checks
        assert not self.bad_rounds, f"rounds with lost or duplicated records: {self.bad_rounds}"


def wait_for_progress(producers, batches: int = 2) -> None:
    for p in producers:
        if not p.wait_acked(batches, RESTART_TIMEOUT_S):
            check_producers_healthy(producers)
            raise AssertionError(f"producer {p.producer_id} made no progress")


def ingest_check(data_dir) -> subprocess.CompletedProcess:
    """`ingest check DATA_DIR` as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "ingest.cli", "check", str(data_dir)],
                          capture_output=True, text=True)


def assert_data_dir_checks_clean(data_dir) -> None:
    """What `ingest check` verifies, in this process (saves starting one)."""
    problems = check_data_dir(data_dir)
    assert not problems, "\n".join(map(str, problems))


# ---- files of a stopped appliance -------------------------------------------------------


def segment_files(data_dir: Path, topic: str, partition: int) -> list[Path]:
    """The partition's .log files, oldest first."""
    return sorted((data_dir / f"{topic}-{partition}").glob("*.log"))


def batches_in(path: Path) -> list[tuple[int, batch_codec.BatchHeader]]:
    """(position, header) of every whole valid batch at the start of a .log."""
    return list(batch_codec.iter_batches(path.read_bytes()))


# ---- the ledger ------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    promise: str
    test: str
    rounds: int = 0
    acked_checked: int = 0
    lost: int = 0
    duplicated: int = 0
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0
    outcome: str = "running"


class Ledger:
    """Numbers of every scenario run in this session, keyed by test node id."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def open(self, nodeid: str, scenario: str, promise: str) -> Row:
        row = self.rows[nodeid] = Row(scenario, promise, nodeid.rsplit("::", 1)[-1])
        row.notes["started"] = time.time()
        return row


LEDGER = Ledger()


def account(row: Row, verdict: Verdict) -> None:
    """Write a verdict's numbers into the row (before asserting, so failures show too)."""
    row.acked_checked = verdict.acked
    row.lost = len(verdict.lost)
    row.duplicated = len(verdict.duplicated)
    if verdict.foreign:
        row.notes["foreign_records"] = len(verdict.foreign)
    if verdict.corrupt_served:
        row.notes["corrupt_batches_served"] = verdict.corrupt_served
