"""A worker process: owns partitions p with p % workers == worker_id, one event loop.

The loop (zmq.Poller) does, in order: intake from PULL sockets (single records are
batched by a kernel, whole batches validated by a kernel), requests from the ROUTER
(acked produce, fetch, offsets), group commit (one fdatasync per log per
flush_interval_ms, then the acks=fsync replies it covers), long-poll fetches whose data
arrived, heartbeats with a metrics snapshot to the supervisor.

Nothing here is shared with another process: the worker alone opens its partitions' files.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import orjson
import zmq

from ingest import config as config_mod
from ingest.clock import mono_ms, now_ms
from ingest.errors import DiskFullError, InvalidBatchError, RecordBatchTooLargeError
from ingest.net import wire
from ingest.net.errors import ErrorCode, IngestError
from ingest.shards import intake, kernels
from ingest.shards.flusher import Flusher
from ingest.shards.intake import RecordIntake
from ingest.shards.kafka_listener import KafkaListener
from ingest.shards.partition import Partition
from ingest.security import CurveGuard
from ingest.shards.probe import Probe
from ingest.shards.producer_state import InvalidProducerEpochError, OutOfOrderSequenceError
from ingest.shards.requests import RequestHandler
from ingest.streams.runtime import StreamsRuntime
from ingest.replication.worker import WorkerReplication
from ingest.topics import owner_of, raw_listener_of
from ingest.uplink.task import WorkerUplinks

log = logging.getLogger("ingest.worker")

# Frames batched by one intake pass: large enough to amortise the per-pass cost over
# thousands of records, small enough that one busy socket cannot starve the others or
# delay a due fsync by more than a few milliseconds.
PULL_FRAMES_PER_TURN = 4096
# Longest a fire-and-forget frame waits for others to share its intake pass (acks=0
# promises nothing, so a millisecond of latency buys fewer, larger appends).
INTAKE_LINGER_MS = 1
PULL_FRAMES_PER_CHUNK = 256
ROUTER_REQUESTS_PER_TURN = 1024
# Records from PUSH frames for a topic that is being created wait here, at most this many.
UNKNOWN_TOPIC_PARKED_MAX = 100_000
# How long a draining worker keeps trying to hand queued forwarded batches to their owner.
# (While running, a full forward queue, [limits] forward_sndhwm, drops and counts.)
FORWARD_LINGER_MS = 1000
# Bytes one inbox holds at most: bounds the memory of frames waiting for intake when
# frames are large (batches), where PULL_FRAMES_PER_TURN alone would allow gigabytes.
PULL_BYTES_PER_TURN = 16 << 20
# A draining worker waits this long for fsyncs in flight (a healthy disk needs milliseconds).
DRAIN_FLUSH_TIMEOUT_S = 10
# "Active producers" are the idempotent producer ids seen within this window.
ACTIVE_PRODUCER_WINDOW_MS = 5 * 60 * 1000
# Poll timeout with nothing to flush and no fetch waiting: bounds how late a heartbeat is.
IDLE_POLL_MS = 100


class Inbox:
    """Frames taken from one PULL socket, waiting to be batched by intake.

    Intake costs a fixed tens of microseconds per pass (numpy, kernel dispatch, one write)
    on top of its per-record cost, so frames linger up to INTAKE_LINGER_MS to share a
    pass; bounded by PULL_FRAMES_PER_TURN and PULL_BYTES_PER_TURN.
    """

    __slots__ = ("raw_topic", "frames", "size_bytes", "since_ms")

    def __init__(self, raw_topic: str | None) -> None:
        self.raw_topic = raw_topic  # None: RECORD/BATCH frames; else each frame is a value
        self.frames: list[bytes] = []
        self.size_bytes = 0
        self.since_ms = 0

    def add(self, chunk: list[bytes]) -> None:
        self.frames += chunk
        self.size_bytes += sum(map(len, chunk))

    def full(self) -> bool:
        return len(self.frames) >= PULL_FRAMES_PER_TURN or self.size_bytes >= PULL_BYTES_PER_TURN

    def take(self) -> list[bytes]:
        frames, self.frames, self.size_bytes = self.frames, [], 0
        return frames


class Worker:
    def __init__(self, worker_id: int, incarnation: int, config, control_endpoint: str) -> None:
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.config = config
        self.workers = config.worker_count
        self.control_endpoint = control_endpoint
        self.ctx = zmq.Context()
        self.probe = Probe()
        self.topics: dict[str, dict] | None = None  # None until the supervisor sends the table
        self.partitions: dict[tuple[str, int], Partition] = {}
        # Every PULL socket (the worker's own, raw listeners) and its frames awaiting intake.
        self.inboxes: dict[zmq.Socket, Inbox] = {}
        self.pull: zmq.Socket | None = None  # bound once the partitions are open
        self.forward: dict[int, zmq.Socket] = {}
        self.parked: dict[str, list[bytes]] = {}
        self.parked_records: dict[str, int] = {}  # records in the parked frames, by topic
        self.parked_count = 0
        self.disk_full = False
        self.stopping = False
        self.exit_code = 0
        # Partitions with appends not yet fsynced: the group commit looks at these only.
        self.dirty: set[Partition] = set()
        self.flusher = Flusher(self.ctx, f"worker-{worker_id}")
        self.acks_releasable = False
        self.poller = zmq.Poller()
        self.intake = RecordIntake(self)
        self.requests = RequestHandler(self)
        self.uplinks = WorkerUplinks(config.uplinks, worker_id, self.probe, config.server.data_dir)
        self.streams = StreamsRuntime(self)  # processors of partitions owned here
        self.replication = WorkerReplication(self)
        self._ppid = os.getppid()
        self.kafka: KafkaListener | None = None  # [kafka] enabled: bound with the other sockets

    # ---- start-up ----------------------------------------------------------------------

    def start(self) -> None:
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.connect(self.control_endpoint)
        self._send_control({"t": "hello", "pid": os.getpid()})
        while self.topics is None:
            if not self.control.poll(10_000):
                raise SystemExit("worker: no topic table from the supervisor")
            self._on_control()
        kernels.warm_up()
        intake.warm_up()
        self.streams.warm_up()
        self.guard = CurveGuard(self.ctx, self.config.security)
        self._bind()
        self._send_control({"t": "ready"})
        log.info("worker %d ready: %d partitions", self.worker_id, len(self.partitions))

    def _socket(self, kind: int, endpoint: str, rcvhwm: int) -> zmq.Socket:
        s = self.guard.serve(self.ctx.socket(kind))
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, rcvhwm)
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        s.bind(endpoint)
        self.poller.register(s, zmq.POLLIN)
        return s

    def _bind(self) -> None:
        limits = self.config.limits
        self.pull = self._socket(zmq.PULL, self.config.endpoint(self.config.worker_pull_port(self.worker_id)),
                                 limits.pull_rcvhwm)
        self.inboxes[self.pull] = Inbox(None)
        self.router = self._socket(zmq.ROUTER, self.config.endpoint(self.config.worker_router_port(self.worker_id)),
                                   limits.router_rcvhwm)
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.flusher.wake, zmq.POLLIN)
        self._bind_raw_listeners()
        if self.config.kafka.enabled:
            self.kafka = KafkaListener(self)

    def _bind_raw_listeners(self) -> None:
        bound = {box.raw_topic for box in self.inboxes.values()}
        for name, t in self.topics.items():
            if t.get("raw_port") and name not in bound and raw_listener_of(name, self.workers) == self.worker_id:
                s = self._socket(zmq.PULL, self.config.endpoint(t["raw_port"]), self.config.limits.pull_rcvhwm)
                self.inboxes[s] = Inbox(name)

    def _open_partitions(self) -> None:
        t = now_ms()
        for name, topic in self.topics.items():
            for p in range(self.worker_id, topic["partitions"], self.workers):
                if (name, p) not in self.partitions:
                    self.partitions[(name, p)] = Partition(
                        self.config.server.data_dir, name, p, self.config.storage, t)
                    self.uplinks.attach(self.partitions[(name, p)])
        self.streams.attach()

    # ---- control channel ---------------------------------------------------------------

    def _send_control(self, msg: dict) -> None:
        msg |= {"worker": self.worker_id, "incarnation": self.incarnation}
        self.control.send(orjson.dumps(msg))

    def _on_control(self) -> None:
        while True:
            try:
                msg = orjson.loads(self.control.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if msg["t"] == "topics":
                self.topics = msg["topics"]
                self._open_partitions()
                if self.pull is not None:  # later topics may bring raw listeners
                    self._bind_raw_listeners()
                self._release_parked()
                if "replication" in msg:
                    self.replication.apply(msg["replication"])
            elif msg["t"] == "replication":
                self.replication.apply(msg["replication"])
            elif msg["t"] == "topic_refused":
                self._drop_parked(msg["topic"])
            elif msg["t"] == "shutdown":
                self.stopping = True

    def report_fenced(self, leader_epoch: int) -> None:
        """A follower knows a newer leader epoch: tell the supervisor (it demotes us)."""
        self._send_control({"t": "fenced", "leader_epoch": leader_epoch})

    def request_topic(self, topic: str) -> None:
        self._send_control({"t": "create_topic", "topic": topic})

    def park(self, topic: str, frame: bytes, records: int = 1) -> None:
        """Hold a PUSH frame for a topic being created; drop and count past the bounds
        (frames parked, [limits] topics_max, which the supervisor enforces too)."""
        if topic not in self.parked and len(self.topics) >= self.config.limits.topics_max:
            self.probe.dropped("topic_limit", records)
            return
        if self.parked_count >= UNKNOWN_TOPIC_PARKED_MAX:
            self.probe.dropped("unknown_topic_backlog", records)
            return
        if topic not in self.parked:
            self.request_topic(topic)
        self.parked.setdefault(topic, []).append(frame)
        self.parked_records[topic] = self.parked_records.get(topic, 0) + records
        self.parked_count += 1

    def _drop_parked(self, topic: str) -> None:
        """The supervisor refused to create `topic`: its parked records are dropped."""
        self.parked_count -= len(self.parked.pop(topic, ()))
        self.probe.dropped("topic_limit", self.parked_records.pop(topic, 0))

    def _release_parked(self) -> None:
        ready = [t for t in self.parked if t in self.topics]
        for topic in ready:
            frames = self.parked.pop(topic)
            self.parked_records.pop(topic, None)
            self.parked_count -= len(frames)
            self.intake.on_frames(frames, mono_ms(), now_ms())

    # ---- ownership and forwarding ------------------------------------------------------

    def owns(self, partition: int) -> bool:
        return owner_of(partition, self.workers) == self.worker_id

    def forward_batch(self, topic: str, partition: int, batch: bytes, records: int) -> None:
        """Hand a batch for a partition another worker owns to that worker's PULL."""
        owner = owner_of(partition, self.workers)
        sock = self.forward.get(owner)
        if sock is None:
            sock = self.forward[owner] = self.guard.connect_as_appliance(self.ctx.socket(zmq.PUSH))
            sock.setsockopt(zmq.SNDHWM, self.config.limits.forward_sndhwm)
            sock.setsockopt(zmq.LINGER, FORWARD_LINGER_MS)
            sock.connect(self.config.local_endpoint(self.config.worker_pull_port(owner)))
        frame = wire.encode(wire.BatchMessage(topic=topic, partition=partition, batch=batch, acks=0))
        try:
            sock.send(frame, zmq.NOBLOCK)
            self.probe.count("forwarded_records_total", records)
        except zmq.Again:
            self.probe.dropped("forward_queue_full", records)

    # ---- appends and group commit ------------------------------------------------------

    def append(self, part: Partition, batch, header, t_ms: int) -> tuple[int, int, bool]:
        """Append to a partition; maps refusals and disk errors to IngestError codes."""
        self.replication.check_leader(part.index)
        try:
            result = part.append(batch, header, t_ms, self.replication.append_epoch())
        except RecordBatchTooLargeError as e:
            self.probe.invalid("too_large")
            raise IngestError(ErrorCode.MESSAGE_TOO_LARGE, str(e), part.index) from None
        except InvalidBatchError as e:
            self.probe.invalid(e.reason)
            raise IngestError(ErrorCode.CORRUPT_MESSAGE, str(e), part.index) from None
        except (OutOfOrderSequenceError, InvalidProducerEpochError) as e:
            code = ErrorCode.OUT_OF_ORDER_SEQUENCE if isinstance(e, OutOfOrderSequenceError) else ErrorCode.INVALID_PRODUCER_EPOCH
            raise IngestError(code, str(e), part.index) from None
        except DiskFullError:
            if not self.disk_full:
                log.error("disk full while appending to %s-%d", part.topic, part.index)
            self.disk_full = True
            raise IngestError(ErrorCode.DISK_FULL, "no space left on the appliance's disk", part.index) from None
        except OSError as e:  # StorageError, LogOfflineError
            log.error("I/O error appending to %s-%d: %s", part.topic, part.index, e)
            raise IngestError(ErrorCode.STORAGE_ERROR, str(e), part.index) from None
        if self.disk_full:
            log.info("disk has space again: appends resumed")
            self.disk_full = False
        if not result[2]:
            self.dirty.add(part)
            self.probe.records_in(part.topic, header.last_offset_delta + 1, header.size_bytes)
        return result

    def flush_due_logs(self, force: bool = False) -> None:
        """Group commit: start one fdatasync per log whose policy says it is due.

        The common case (only the active segment has unsynced bytes) goes to the flusher
        thread; a flush that must also sync a rolled segment, a new file or the recovery
        point runs here, synchronously (once per segment roll).
        """
        t = mono_ms()
        for part in list(self.dirty):
            if part in self.flusher.in_flight or not (force or part.log.flush_due(t)):
                continue
            self.dirty.discard(part)
            try:
                job = part.log.flush_start()
                if job is not None:
                    self.flusher.submit(part, *job)
                    continue
                started = time.perf_counter()
                part.log.flush()
            except OSError as e:
                self._on_flush_failed(part, e)
                continue
            self._on_flushed(part, time.perf_counter() - started)

    def on_flush_results(self) -> None:
        for result in self.flusher.take_results():
            if result.error is not None:
                result.part.log.flush_failed(result.error)
                self._on_flush_failed(result.part, result.error)
            else:
                result.part.log.flush_done(result.target_offset)
                self._on_flushed(result.part, result.seconds)

    def _finish_flushes(self, timeout_s: float = DRAIN_FLUSH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while self.flusher.in_flight and time.monotonic() < deadline:
            self.flusher.wake.poll(10)
            self.on_flush_results()

    def _on_flushed(self, part: Partition, seconds: float) -> None:
        self.probe.fsync(seconds)
        self.acks_releasable = True
        self.streams.on_flushed(part)
        try:
            part.after_flush(now_ms())
        except OSError as e:  # a producer-state snapshot is an optimisation: retry later
            log.warning("producer state snapshot of %s-%d failed: %s", part.topic, part.index, e)

    def _on_flush_failed(self, part: Partition, error: OSError) -> None:
        # After a failed fsync the kernel may have dropped dirty pages: only a restart
        # (recovery scan) can tell what is on disk. Fail what waits on this log and let
        # the supervisor restart the worker.
        log.error("fsync of %s-%d failed: %s; restarting the worker", part.topic, part.index, error)
        self.requests.fail_pending(part, ErrorCode.STORAGE_ERROR, str(error))
        self.dirty.discard(part)
        self.exit_code = 1
        self.stopping = True

    def next_flush_in_ms(self) -> int:
        t = mono_ms()
        return min((part.log.flush_wait_ms(t) for part in self.dirty), default=IDLE_POLL_MS)

    # ---- loop --------------------------------------------------------------------------

    def _drain_pull(self, sock: zmq.Socket) -> None:
        """Move queued frames into the socket's inbox, up to the inbox's bounds."""
        box = self.inboxes[sock]
        recv = sock.recv
        if not box.frames:
            box.since_ms = mono_ms()
        # The inner loop is the per-record cost of intake: a recv and an append, nothing
        # else. The byte bound is checked once per chunk.
        while not box.full():
            chunk: list[bytes] = []
            append = chunk.append
            try:
                for _ in range(PULL_FRAMES_PER_CHUNK):
                    append(recv(zmq.NOBLOCK))
            except zmq.Again:
                box.add(chunk)
                return
            box.add(chunk)

    def _process_inboxes(self, t_ms: int, force: bool = False) -> None:
        """Hand full or lingering inboxes to intake: one kernel pass per inbox."""
        for box in self.inboxes.values():
            if box.frames and (force or box.full() or t_ms - box.since_ms >= INTAKE_LINGER_MS):
                frames = box.take()
                if box.raw_topic is None:
                    self.intake.on_frames(frames, t_ms, now_ms())
                else:
                    self.intake.on_raw_frames(box.raw_topic, frames, now_ms())

    def _linger_wait_ms(self, t_ms: int) -> int:
        waits = [box.since_ms + INTAKE_LINGER_MS - t_ms for box in self.inboxes.values() if box.frames]
        return max(0, min(waits)) if waits else IDLE_POLL_MS

    def _drain_router(self) -> None:
        for _ in range(ROUTER_REQUESTS_PER_TURN):
            try:
                identity, frame = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:
                self.probe.invalid("multipart")
                continue
            self.requests.on_request(identity.bytes, frame)

    def heartbeat(self) -> None:
        t = now_ms()
        gauges = []
        for part in self.partitions.values():
            gauges += part.gauges(t, self.replication.high_watermark(part))
        gauges += self.replication.gauges(t)
        worker = {"worker": str(self.worker_id)}
        active = len({pid for part in self.partitions.values()
                      for pid in part.producers.active_ids(t - ACTIVE_PRODUCER_WINDOW_MS)})
        gauges += [("disk_full", worker, 1.0 if self.disk_full else 0.0),
                   ("inflight_bytes", worker, self.requests.inflight_bytes),
                   ("active_producers", worker, active)]
        gauges += self.uplinks.gauges(t)
        stream_gauges, stream_counters = self.streams.metrics(t)
        snapshot = self.probe.snapshot(gauges + stream_gauges)
        snapshot["counters"] += stream_counters
        storage = {"segments_rolled_total": 0, "segments_deleted_total": 0, "recovery_truncated_bytes_total": 0}
        for part in self.partitions.values():
            for name in storage:
                storage[name] += getattr(part.log.probe, name)
        snapshot["counters"] += [(name, {}, value) for name, value in storage.items()]
        self._send_control({"t": "heartbeat", "metrics": snapshot,
                            "status": {"disk_full": self.disk_full, "partitions": len(self.partitions)}})

    def run(self) -> None:
        self.start()
        heartbeat_ms = self.config.server.heartbeat_interval_ms
        next_heartbeat = 0
        while not self.stopping:
            t = mono_ms()
            timeout = min(self.next_flush_in_ms(), self.requests.next_deadline_in_ms(t),
                          self._linger_wait_ms(t), self.uplinks.wait_ms(t, heartbeat_ms),
                          self.streams.wait_ms(heartbeat_ms),
                          self.replication.next_deadline_in_ms(t))
            if self.kafka is not None:
                timeout = min(timeout, self.kafka.wait_ms(t, IDLE_POLL_MS))
            events = dict(self.poller.poll(timeout))
            if self.kafka is not None:
                self.kafka.on_events(events)
            for sock in self.inboxes:
                if sock in events:
                    self._drain_pull(sock)
            self._process_inboxes(mono_ms())
            if self.router in events:
                self._drain_router()
            if self.control in events:
                self._on_control()
            if self.flusher.wake in events:
                self.on_flush_results()
            self.flush_due_logs()
            self.streams.run_due()  # processors of flushed source partitions
            if self.acks_releasable:
                self.acks_releasable = False
                self.requests.release_durable_acks()
            self.requests.serve_waiting(mono_ms())
            if self.kafka is not None:
                self.kafka.pump(mono_ms())
            self.uplinks.pump(mono_ms())
            self.replication.step(events)
            t = mono_ms()
            if t >= next_heartbeat:
                self.heartbeat()
                next_heartbeat = t + heartbeat_ms
                if os.getppid() != self._ppid:
                    log.error("supervisor is gone: draining")
                    self.stopping = True
                self._apply_retention()
                self.guard.maybe_reload()
        self.drain()

    def _apply_retention(self) -> None:
        for part in self.partitions.values():
            if part not in self.flusher.in_flight:  # its fd must stay open until the flush returns
                part.log.apply_retention(now_ms(), self.uplinks.keep_from(part, self.disk_full))

    def drain(self) -> None:
        """Stop intake, take what is queued, fsync, answer, mark clean, exit."""
        for sock in self.inboxes:
            self.poller.unregister(sock)
            self._drain_pull(sock)
            sock.close(linger=0)
        self._process_inboxes(mono_ms(), force=True)
        self._drain_router()
        self._finish_flushes()
        self.flush_due_logs(force=True)  # every log with unsynced appends is in self.dirty
        self._finish_flushes()
        self.requests.release_durable_acks()
        self.requests.fail_waiting(ErrorCode.SHUTTING_DOWN)
        if self.kafka is not None:
            self.kafka.pump(mono_ms())  # acks=-1 made durable by the last flush, long polls (stopping)
            self.kafka.close()
        self.uplinks.close()
        self.streams.close()
        for part in self.partitions.values():
            try:
                part.close()
            except OSError as e:  # an offline log: the next start recovers it by a scan
                log.error("closing %s-%d: %s", part.topic, part.index, e)
                self.exit_code = 1
        for sock in self.forward.values():
            sock.close()
        self.replication.close()
        self.flusher.close()
        self.router.close(linger=200)
        self.control.close()
        self.guard.close()
        self.ctx.term()
        log.info("worker %d drained", self.worker_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ingest-worker")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--incarnation", type=int, default=1)
    parser.add_argument("--control", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s worker-{args.worker_id} %(levelname)s %(message)s")
    config = config_mod.from_dict(orjson.loads(os.environ["INGEST_CONFIG_JSON"]))
    # A finished fdatasync waits for the GIL to report back; the default 5 ms switch
    # interval would add up to 5 ms to every acks=fsync reply.
    sys.setswitchinterval(0.0005)
    worker = Worker(args.worker_id, args.incarnation, config, args.control)
    # The supervisor's shutdown message is the normal path; SIGTERM (systemd KillMode=mixed
    # sends it to the main process only) or a lone kill also drains.
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which drains us
    worker.run()
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
