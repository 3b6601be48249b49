"""A follower worker's fetcher: copies the partitions this worker owns from the leader.

Runs on the worker's event loop (its DEALER sockets sit in the worker's poller): no thread,
no process of its own. Per partition, a small state machine:

    CHECK_EPOCH ─ EPOCH_END_OFFSET sent ─> (truncate if the leader's history ends earlier)
        ─> READY ─ REPLICA_FETCH sent ─> append the same bytes at the same offsets
        ─> FLUSHING (group commit) ─> READY ...

A fetch goes out only once everything appended before it is fsynced, so the offset a
fetch carries tells the leader what this follower holds on disk (that is what acks=all
waits for). A reply with a newer leader epoch, an error, or silence past the deadline
sends the partition back to CHECK_EPOCH: no divergent history survives a change of leader.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import zmq

from ingest.net import wire
from ingest.net.errors import ErrorCode

log = logging.getLogger("ingest.replication")

CHECK_EPOCH, EPOCH_SENT, TRUNCATE, READY, FETCH_SENT, FLUSHING, BACKOFF, RESTART = range(8)
# A request unanswered this long past its long-poll wait is given up (the leader died, or
# the reply was lost with a dropped connection) and sent again.
REQUEST_TIMEOUT_MS = 2_000
# After an error a partition waits this long before asking again: bounds the request rate
# against a leader that refuses (still starting, fenced, not the leader any more).
ERROR_BACKOFF_MS = 200


@dataclass(slots=True)
class PartitionFetch:
    state: int = CHECK_EPOCH
    correlation_id: int = -1
    deadline_ms: int = 0
    truncate_to: int = 0
    leader_end_offset: int = 0
    leader_high_watermark: int = 0
    last_caught_up_ms: int = 0


class Fetcher:
    """Fetches every partition the worker owns from the leader appliance's workers."""

    def __init__(self, worker, leader: dict, leader_epoch: int, replica_id: str, now_ms: int) -> None:
        self.w = worker
        self.settings = worker.config.replication
        self.leader_epoch = leader_epoch
        self.replica_id = replica_id
        self.routers: list[str] = list(leader["routers"])
        self.states: dict[tuple[str, int], PartitionFetch] = {}
        self.sockets: dict[int, zmq.Socket] = {}
        self.pending: dict[int, tuple[str, int]] = {}  # correlation id -> partition key
        self._ids = itertools.count(1)
        self.started_ms = now_ms

    # ---- sockets -----------------------------------------------------------------------

    def _socket(self, leader_worker: int) -> zmq.Socket:
        sock = self.sockets.get(leader_worker)
        if sock is None:
            sock = self.w.guard.connect_as_appliance(self.w.ctx.socket(zmq.DEALER))
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
            sock.connect(self.routers[leader_worker])
            self.w.poller.register(sock, zmq.POLLIN)
            self.sockets[leader_worker] = sock
        return sock

    def close(self) -> None:
        for sock in self.sockets.values():
            self.w.poller.unregister(sock)
            sock.close(linger=0)
        self.sockets.clear()

    def _send(self, key: tuple[str, int], message, deadline_ms: int) -> None:
        state = self.states[key]
        state.correlation_id = message.correlation_id
        state.deadline_ms = deadline_ms
        self.pending[message.correlation_id] = key
        try:
            self._socket(key[1] % len(self.routers)).send(message.encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the deadline resends it

    # ---- progress ----------------------------------------------------------------------

    def step(self, now_ms: int) -> None:
        """Send what each partition is ready to send; give up on overdue requests."""
        for key, part in self.w.partitions.items():
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = PartitionFetch(last_caught_up_ms=now_ms)
            if state.state in (EPOCH_SENT, FETCH_SENT, BACKOFF) and now_ms >= state.deadline_ms:
                self.pending.pop(state.correlation_id, None)
                state.state = CHECK_EPOCH
            if state.state == FLUSHING and part.log.flushed_offset >= part.log.log_end_offset:
                state.state = READY
            if state.state in (TRUNCATE, RESTART) and part not in self.w.flusher.in_flight:
                self.w.replication.truncate(part, state.truncate_to, restart=state.state == RESTART)
                state.state = READY
                part = self.w.partitions[key]
            if state.state == CHECK_EPOCH:
                request = wire.EpochEndOffsetRequest(key[0], key[1], part.epochs.latest_epoch, self._next_id())
                self._send(key, request, now_ms + REQUEST_TIMEOUT_MS)
                state.state = EPOCH_SENT
            elif state.state == READY:
                request = wire.ReplicaFetchRequest(
                    key[0], key[1], part.log.log_end_offset, self.settings.fetch_max_bytes,
                    self.settings.fetch_max_wait_ms, self.leader_epoch, self.replica_id, self._next_id())
                self._send(key, request, now_ms + self.settings.fetch_max_wait_ms + REQUEST_TIMEOUT_MS)
                state.state = FETCH_SENT

    def _next_id(self) -> int:
        return next(self._ids) % (1 << 32)

    def on_readable(self, sock: zmq.Socket, now_ms: int) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                reply = wire.decode_reply(frame.buffer)
            except wire.WireError as e:
                log.error("malformed reply from the leader: %s", e)
                continue
            key = self.pending.pop(reply.correlation_id, None)
            if key is None or key not in self.w.partitions:
                continue  # a late reply to a request given up on
            state = self.states[key]
            if state.correlation_id != reply.correlation_id:
                continue
            if isinstance(reply, wire.ErrorReply):
                self._on_error(key, state, reply, now_ms)
            elif isinstance(reply, wire.EpochEndOffsetReply):
                self._on_epoch_end(key, state, reply)
            elif isinstance(reply, wire.ReplicaFetchReply):
                self._on_fetched(key, state, reply, now_ms)

    def _on_error(self, key, state: PartitionFetch, reply, now_ms: int) -> None:
        if reply.error_code != ErrorCode.UNKNOWN_TOPIC_OR_PARTITION:
            log.warning("%s-%d: the leader refused: %s", key[0], key[1], reply.exception())
        state.state = BACKOFF
        state.deadline_ms = now_ms + ERROR_BACKOFF_MS

    def _on_epoch_end(self, key, state: PartitionFetch, reply) -> None:
        part = self.w.partitions[key]
        end = part.log.log_end_offset
        target = min(reply.end_offset, end)
        if reply.leader_epoch < part.epochs.latest_epoch:
            # The leader's history of this log stops at an older epoch than ours: what we
            # wrote after our own end of that epoch is not the leader's either.
            target = min(target, part.epochs.end_offset_for(reply.leader_epoch, end)[1])
        if target < end:
            log.warning("%s-%d: log end %d is past the leader's epoch %d end %d: truncating",
                        key[0], key[1], end, reply.leader_epoch, reply.end_offset)
            state.truncate_to = target
            state.state = TRUNCATE
        else:
            state.state = READY

    def _on_fetched(self, key, state: PartitionFetch, reply, now_ms: int) -> None:
        if reply.leader_epoch != self.leader_epoch:
            log.info("leader epoch is now %d (was %d): checking every partition's history",
                     reply.leader_epoch, self.leader_epoch)
            self.leader_epoch = reply.leader_epoch
            for other in self.states.values():
                other.state = CHECK_EPOCH
            return
        part = self.w.partitions[key]
        if part.log.log_end_offset < reply.log_start_offset:
            log.warning("%s-%d: the leader's log starts at %d, after ours ends (%d): starting over there",
                        key[0], key[1], reply.log_start_offset, part.log.log_end_offset)
            state.truncate_to = reply.log_start_offset
            state.state = RESTART
            return
        appended = self.w.replication.append_fetched(part, reply.records)
        state.leader_end_offset = reply.log_end_offset
        state.leader_high_watermark = reply.high_watermark
        if part.log.log_end_offset >= reply.log_end_offset:
            state.last_caught_up_ms = now_ms
        state.state = FLUSHING if appended else READY

    def lag(self, key: tuple[str, int], part, now_ms: int) -> tuple[int, float]:
        """(records, seconds) this partition is behind the leader, as last seen."""
        state = self.states.get(key)
        if state is None:
            return 0, 0.0
        records = max(0, state.leader_end_offset - part.log.log_end_offset)
        return records, (0.0 if records == 0 else max(0.0, (now_ms - state.last_caught_up_ms) / 1000))

    def high_watermark(self, key: tuple[str, int], part) -> int:
        state = self.states.get(key)
        hw = state.leader_high_watermark if state else 0
        return max(part.log.log_start_offset, min(hw, part.log.log_end_offset))

    def next_deadline_ms(self) -> int:
        return min((s.deadline_ms for s in self.states.values()
                    if s.state in (EPOCH_SENT, FETCH_SENT, BACKOFF)), default=1 << 62)
