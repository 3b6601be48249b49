"""Request/reply handling of a worker's ROUTER socket: produce, fetch, offsets.

Every request gets exactly one reply with an error code. acks=1 replies right after the
append; acks=fsync replies after the group commit that covers the batch; acks=all after
that and once every in-sync replica holds the batch (ingest/replication/; on a lone
appliance the in-sync set is this one). Consumers read below the high watermark; a fetch
with nothing to return waits (long poll) until data arrives or max_wait_ms passes.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass

import zmq

from ingest.clock import mono_ms, now_ms
from ingest.net import wire
from ingest.net.wire import Durability
from ingest.net.errors import ErrorCode, IngestError, WireError
from ingest.replication.leader import READY
from ingest.shards import batch as batch_codec
from ingest.errors import CorruptDataError, OffsetOutOfRangeError

log = logging.getLogger("ingest.requests")

# A long-polling fetch never waits longer than this, whatever the client asks: bounds how
# long a reply can be owed to a client that has since gone away.
FETCH_WAIT_MS_MAX = 30_000
# Fetches parked at once per worker; beyond it new ones are answered at once (empty).
WAITING_FETCHES_MAX = 10_000
FETCH_BYTES_MAX = 8 << 20
ACKS_LABELS = {Durability.WRITTEN: "1", Durability.FSYNC: "fsync", Durability.ALL: "all"}


@dataclass(slots=True)
class PendingAck:
    part: object
    last_offset: int
    identity: bytes
    reply: bytes
    size_bytes: int
    msg_type: int
    correlation_id: int
    arrived_s: float  # perf_counter at arrival, for the produce latency histogram
    acks: int


def error_reply(request, error: IngestError) -> bytes:
    """The error reply to `request` (anything with msg_type and correlation_id)."""
    return wire.ErrorReply(request.msg_type, error.code, error.message, error.partition,
                           request.correlation_id).encode()


@dataclass(slots=True)
class WaitingFetch:
    deadline_ms: int
    identity: bytes
    request: object
    part: object


class RequestHandler:
    def __init__(self, worker) -> None:
        self.w = worker
        self.pending: list[PendingAck] = []
        self.waiting: list[WaitingFetch] = []
        self.inflight_bytes = 0

    # ---- dispatch ----------------------------------------------------------------------

    def on_request(self, identity: bytes, frame) -> None:
        buffer = frame.buffer
        try:
            request = wire.decode_request(buffer)
            reply = self._dispatch(identity, request)
        except WireError as e:
            self.w.probe.invalid(ErrorCode(e.code).name.lower())
            reply = wire.error_reply_for(buffer, e)
        except IngestError as e:
            reply = wire.error_reply_for(buffer, e)
        except Exception:  # a bug must cost one request, never the worker and its partitions
            log.exception("request failed")
            reply = wire.error_reply_for(buffer, IngestError(ErrorCode.UNKNOWN_SERVER_ERROR, "internal error"))
        if reply is not None:
            self._send(identity, reply)

    def send(self, identity: bytes, reply: bytes) -> None:
        self._send(identity, reply)

    def _send(self, identity: bytes, reply: bytes) -> None:
        try:
            self.w.router.send_multipart([identity, reply], zmq.NOBLOCK, copy=len(reply) < 65536)
        except zmq.Again:
            self.w.probe.count("replies_dropped_total")  # the client's queue is full: it will time out

    def _dispatch(self, identity: bytes, request):
        if isinstance(request, (wire.BatchMessage, wire.RecordMessage)):
            return self._produce(identity, request)
        if isinstance(request, wire.FetchRequest):
            return self._fetch(identity, request)
        if isinstance(request, wire.ListOffsetsRequest):
            return self._list_offsets(request)
        if isinstance(request, wire.OffsetCommitRequest):
            return self._offset_commit(request)
        if isinstance(request, wire.OffsetFetchRequest):
            return self._offset_fetch(request)
        if isinstance(request, wire.PingRequest):
            return wire.PingReply(request.correlation_id).encode()
        if isinstance(request, (wire.ReplicaFetchRequest, wire.EpochEndOffsetRequest)):
            part = self.partition(request.topic, request.partition)
            return self.w.replication.on_request(identity, request, part)
        if isinstance(request, wire.MetadataRequest):
            raise IngestError(ErrorCode.INVALID_REQUEST, "ask the bootstrap endpoint for metadata")
        raise IngestError(ErrorCode.INVALID_REQUEST, f"{type(request).__name__} is not served by workers")

    # ---- partitions --------------------------------------------------------------------

    def partition(self, topic: str, index: int):
        """The owned partition, or IngestError saying why not."""
        t = self.w.topics.get(topic)
        if t is None or not 0 <= index < t["partitions"]:
            raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"{topic}-{index} does not exist", index)
        if not self.w.owns(index):
            raise IngestError(ErrorCode.NOT_OWNER, f"{topic}-{index} is owned by another worker", index)
        return self.w.partitions[(topic, index)]

    # ---- produce -----------------------------------------------------------------------

    def accept_batch(self, topic: str, partition: int, batch, t_ms: int):
        """Append one RecordBatch (the log validates it: CRC, records, bounds); returns
        (part, header, base, last, duplicate)."""
        part = self.partition(topic, partition)
        header = batch_codec.parse_header(batch)  # framing already checked by the wire codec
        base, last, duplicate = self.w.append(part, batch, header, t_ms)
        return part, header, base, last, duplicate

    def _produce(self, identity: bytes, msg):
        arrived_s = time.perf_counter()
        if msg.acks == Durability.NONE:
            raise IngestError(ErrorCode.INVALID_REQUEST, "acks=0 records go to the PULL endpoint, not requests")
        self.w.replication.check_leader(getattr(msg, "partition", -1))
        if isinstance(msg, wire.RecordMessage):
            topic, partition, batch = self.w.intake.single_record_batch(msg)
        else:
            topic, partition, batch = msg.topic, msg.partition, msg.batch
        size = len(batch)
        if msg.acks >= Durability.FSYNC and self.inflight_bytes + size > self.w.config.limits.inflight_bytes_max:
            self.w.probe.count("produce_requests_total", error="throttled")
            raise IngestError(ErrorCode.THROTTLED, "too many bytes awaiting fsync", partition)
        if msg.acks == Durability.ALL:
            self.w.replication.check_acks_all(self.partition(topic, partition))
        part, _header, base, last, duplicate = self.accept_batch(topic, partition, batch, now_ms())
        self.w.probe.count("produce_requests_total", error="none")
        if duplicate:
            self.w.probe.count("duplicate_batches_total")
        reply = wire.ProduceReply(msg.msg_type, partition, base, last, msg.acks, msg.correlation_id).encode()
        if msg.acks == Durability.WRITTEN or (part.log.flushed_offset > last and self._replicated(msg.acks, part, last)):
            self._observe_latency(msg.acks, arrived_s)
            return reply
        self.pending.append(PendingAck(part, last, identity, reply, size, msg.msg_type, msg.correlation_id,
                                       arrived_s, msg.acks))
        self.inflight_bytes += size
        return None

    def _replicated(self, acks: int, part, last_offset: int) -> bool:
        """acks=all: every in-sync replica holds the batch (raises NOT_ENOUGH_REPLICAS)."""
        return acks != Durability.ALL or self.w.replication.ack_status(part, last_offset) == READY

    def _observe_latency(self, acks: int, arrived_s: float) -> None:
        self.w.probe.observe("produce_latency_seconds", time.perf_counter() - arrived_s, acks=ACKS_LABELS[acks])

    def fail_pending(self, part, code: ErrorCode, message: str) -> None:
        """Answer every ack waiting on `part` with an error (its log went offline)."""
        error = IngestError(code, message, part.index)
        for ack in self.pending:
            if ack.part is part:
                self._send(ack.identity, error_reply(ack, error))
                self.inflight_bytes -= ack.size_bytes
        self.pending = [ack for ack in self.pending if ack.part is not part]

    def release_durable_acks(self) -> None:
        """Answer every acked produce that reached its level: acks=fsync once the group
        commit covers it, acks=all once the in-sync replicas hold it too."""
        if not self.pending:
            return
        still = []
        for ack in self.pending:
            try:
                done = ack.part.log.flushed_offset > ack.last_offset and self._replicated(ack.acks, ack.part, ack.last_offset)
            except IngestError as e:
                self._send(ack.identity, error_reply(ack, e))
                self.inflight_bytes -= ack.size_bytes
                continue
            if done:
                self._send(ack.identity, ack.reply)
                self.inflight_bytes -= ack.size_bytes
                self._observe_latency(ack.acks, ack.arrived_s)
            else:
                still.append(ack)
        self.pending = still

    # ---- fetch -------------------------------------------------------------------------

    def _fetch(self, identity: bytes, req):
        part = self.partition(req.topic, req.partition)
        self.w.replication.check_leader(req.partition)
        wait_ms = min(max(req.max_wait_ms, 0), FETCH_WAIT_MS_MAX)
        if (self.w.replication.high_watermark(part) <= req.offset <= part.log.log_end_offset and wait_ms > 0
                and len(self.waiting) < WAITING_FETCHES_MAX):
            self.waiting.append(WaitingFetch(mono_ms() + wait_ms, identity, req, part))
            return None
        return self._fetch_reply(req, part)

    def _fetch_reply(self, req, part) -> bytes:
        self.w.probe.count("fetch_requests_total")
        lg = part.log
        high_watermark = self.w.replication.high_watermark(part)
        try:
            data = lg.read(req.offset, min(max(req.max_bytes, 1), FETCH_BYTES_MAX))
        except OffsetOutOfRangeError as e:
            raise IngestError(ErrorCode.OFFSET_OUT_OF_RANGE, str(e), req.partition) from None
        except CorruptDataError as e:  # never served; the operator sees it in logs and `ingest check`
            raise IngestError(ErrorCode.STORAGE_ERROR, str(e), req.partition) from None
        if high_watermark < lg.log_end_offset:
            data = _below(data, high_watermark)
        return wire.FetchReply(req.partition, high_watermark, lg.log_start_offset, lg.log_end_offset,
                               data, req.correlation_id).encode()

    def serve_waiting(self, t_ms: int) -> None:
        if not self.waiting:
            return
        still = []
        for f in self.waiting:
            if (self.w.replication.high_watermark(f.part) > f.request.offset or t_ms >= f.deadline_ms
                    or self.w.stopping):
                try:
                    reply = self._fetch_reply(f.request, f.part)
                except IngestError as e:
                    reply = error_reply(f.request, e)
                self._send(f.identity, reply)
            else:
                still.append(f)
        self.waiting = still

    def next_deadline_in_ms(self, t_ms: int) -> int:
        if not self.waiting:
            return 1000
        return max(0, min(f.deadline_ms for f in self.waiting) - t_ms)

    def fail_waiting(self, code: ErrorCode, message: str = "the worker is stopping") -> None:
        stopping = IngestError(code, message)
        for f in self.waiting:
            self._send(f.identity, error_reply(f.request, stopping))
        self.waiting = []
        for ack in self.pending:
            self._send(ack.identity, error_reply(ack, stopping))
        self.pending = []

    # ---- offsets -----------------------------------------------------------------------

    def _list_offsets(self, req) -> bytes:
        part = self.partition(req.topic, req.partition)
        lg = part.log
        if req.timestamp_ms == wire.EARLIEST_TIMESTAMP:
            offset, ts = lg.log_start_offset, -1
        elif req.timestamp_ms == wire.LATEST_TIMESTAMP:
            offset, ts = self.w.replication.high_watermark(part), -1  # Kafka: the latest a consumer may read
        else:
            found = lg.offset_for_timestamp(req.timestamp_ms)
            offset, ts = (-1, -1) if found is None else (found, req.timestamp_ms)
        return wire.ListOffsetsReply(req.partition, offset, ts, req.correlation_id).encode()

    def _offset_commit(self, req) -> bytes:
        for partition, offset in req.offsets:
            part = self.partition(req.topic, partition)
            try:
                part.groups.commit(req.group, offset)
            except OSError as e:
                code = ErrorCode.DISK_FULL if e.errno == errno.ENOSPC else ErrorCode.STORAGE_ERROR
                raise IngestError(code, f"committing offsets: {e}", partition) from None
        return wire.OffsetCommitReply(req.correlation_id).encode()

    def _offset_fetch(self, req) -> bytes:
        t = self.w.topics.get(req.topic)
        if t is None:
            raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"topic {req.topic} does not exist")
        wanted = req.partitions or [p for p in range(t["partitions"]) if self.w.owns(p)]
        rows = []
        for p in wanted:
            committed = self.partition(req.topic, p).groups.get(req.group)
            rows.append((p, -1 if committed is None else committed))
        return wire.OffsetFetchReply(tuple(rows), req.correlation_id).encode()


def _below(data: bytes, high_watermark: int) -> bytes:
    """The whole batches of `data` that end below the high watermark (consumers never see
    what not every in-sync replica holds)."""
    end = 0
    for pos, header in batch_codec.iter_batches(data):
        if header.last_offset >= high_watermark:
            break
        end = pos + header.size_bytes
    return data[:end]
