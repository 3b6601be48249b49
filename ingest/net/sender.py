"""The producer's I/O thread: the only code that touches the producer's sockets.

User threads encode batches and hand them over through ``submit`` (a deque and a wake-up
pipe, never a socket). This thread sends them, at most PARTITION_IN_FLIGHT_MAX per
partition in sequence order, matches replies by correlation id, and resolves futures.

Retries keep the bytes of a batch (producer id, epoch and baseSequence included), so the
worker recognises a batch it already stored and answers with the original offsets:

- connection lost (worker killed: the socket monitor says so at once) or a request left
  unanswered for request_timeout_ms: every batch in flight on that link goes back to the
  front of its partition's queue, in order, and is sent again once the worker is back;
- a retriable error (THROTTLED, DISK_FULL, TIMEOUT, SHUTTING_DOWN, NOT_OWNER, unknown
  topic while a new topic propagates): that batch and the ones after it are requeued,
  after a backoff;
- OUT_OF_ORDER_SEQUENCE for a batch behind one still in flight or requeued: retried
  once the earlier one is stored. For the oldest batch of the partition it means the
  worker lost track of this producer (a failed batch left a gap, or a crash truncated
  unsynced batches): the partition continues under a fresh producer id;
- any other error fails the batch's futures; so does delivery_timeout_ms.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque

import zmq

from ingest.net import wire
from ingest.net.client import (METADATA_REFRESH_MIN_INTERVAL_MS, RETRIABLE, RETRY_BACKOFF_FIRST_MS,
                               RETRY_BACKOFF_MAX_MS, BootstrapClient, Metadata, WorkerLink, configure)
from ingest.net.errors import ErrorCode, IngestError, WireError
from ingest.net.batching import SEQUENCE_MODULUS, restamp
from ingest.net.futures import DeliveryTimeoutError, ProducerClosedError

log = logging.getLogger("ingest.producer")

# Kafka's max.in.flight.requests.per.connection for idempotent producers, and the number
# of batches per producer a worker remembers for dedupe (producer_state.RETAINED_BATCHES):
# a retry can then only ever repeat one of the batches the worker still remembers.
PARTITION_IN_FLIGHT_MAX = 5
# A refresh from this thread must not stall the sockets for long.
METADATA_TIMEOUT_MS = 1_000
# The loop wakes at least this often to expire requests and batches.
TICK_MS = 100
# Timeouts are checked this often: their resolution, at a cost per check of one look at
# every batch waiting.
EXPIRE_INTERVAL_MS = 10
# Frames a PUSH socket queues for a worker that is down (acks=0): each is at most
# batch_bytes, so this bounds ZeroMQ's memory; beyond it batches wait in the producer.
PUSH_SNDHWM_FRAMES = 16

NEW_PRODUCER_ID = frozenset({ErrorCode.OUT_OF_ORDER_SEQUENCE, ErrorCode.INVALID_PRODUCER_EPOCH})
REFRESH_METADATA = frozenset({ErrorCode.NOT_OWNER, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, ErrorCode.NOT_LEADER,
                              ErrorCode.FENCED_LEADER_EPOCH})


class _PartitionState:
    """Batches of one partition: queued (not sent) and in flight, both in sequence order."""

    __slots__ = ("topic", "partition", "queue", "inflight", "producer_id", "sequence_base",
                 "backoff_ms", "retry_at_s")

    def __init__(self, topic: str, partition: int, producer_id: int) -> None:
        self.topic = topic
        self.partition = partition
        self.queue: deque = deque()
        self.inflight: list = []
        self.producer_id = producer_id
        # The drain's sequence number that is 0 under producer_id: batches are renumbered
        # from here when the partition continues under a new producer id.
        self.sequence_base = 0
        self.backoff_ms = RETRY_BACKOFF_FIRST_MS
        self.retry_at_s = 0.0


class Sender(threading.Thread):
    def __init__(self, producer) -> None:
        super().__init__(name="ingest-producer-io", daemon=True)
        self.producer = producer
        self.acks = producer.acks
        self.context = producer.context
        self.metadata: Metadata = producer.metadata
        self.inbox: deque = deque()
        self.partitions: dict[tuple[str, int], _PartitionState] = {}
        self.ready: set[_PartitionState] = set()
        self.links: dict[int, WorkerLink] = {}
        self.pushes: dict[int, zmq.Socket] = {}
        self.blocked_pushes: set[int] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._stopping = False
        self._stopped = False  # the loop has ended: submit() fails batches at once
        self._why_stopped = "the producer closed before this batch was acknowledged"
        self._refreshed_s = 0.0
        self._expire_at_s = 0.0
        self._metadata_client = BootstrapClient(producer.bootstrap.endpoint, METADATA_TIMEOUT_MS, self.context)

    # ---- called by user threads ------------------------------------------------------

    def submit(self, batches: list) -> None:
        self.inbox.extend(batches)
        if self._stopped:  # closed or crashed: nobody will send them
            self._fail_inbox()
        else:
            self.wake()

    def wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    # ---- loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                next_linger_s = self.producer.drain_due(now)
                self._take_inbox()
                if self._stopping:
                    break
                self._dispatch(now)
                self._poll(self._timeout_ms(now, next_linger_s))
                now = time.monotonic()
                if now >= self._expire_at_s:
                    self._expire(now)
                    self._expire_at_s = now + EXPIRE_INTERVAL_MS / 1000
        except Exception as error:  # a bug here must not leave futures hanging forever
            log.exception("producer I/O thread failed")
            self._why_stopped = f"the producer's I/O thread failed ({error!r}): see the log"
        finally:
            self._shutdown()

    def _timeout_ms(self, now: float, next_linger_s: float) -> int:
        wake_s = min(next_linger_s, now + TICK_MS / 1000)
        for state in self.ready:
            if len(state.inflight) < PARTITION_IN_FLIGHT_MAX and state.retry_at_s > now:
                wake_s = min(wake_s, state.retry_at_s)
        return max(0, int((wake_s - now) * 1000 + 0.999))

    def _poll(self, timeout_ms: int) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        for link in self.links.values():
            poller.register(link.socket, zmq.POLLIN | (zmq.POLLOUT if link.blocked else 0))
            poller.register(link.monitor, zmq.POLLIN)
        for worker in self.blocked_pushes:
            poller.register(self.pushes[worker], zmq.POLLOUT)
        events = dict(poller.poll(timeout_ms))
        if self._wake_r in events:
            self._wake_pending = False
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        for link in list(self.links.values()):
            flags = events.get(link.socket, 0)
            if flags & zmq.POLLIN:  # replies that arrived before a drop still count
                for batch, reply in list(link.replies()):
                    self._on_reply(link, batch, reply)
            if flags & zmq.POLLOUT:
                link.blocked = False
            if events.get(link.monitor) and link.lost():
                self._on_link_lost(link, "connection lost")
        for worker in list(self.blocked_pushes):
            if events.get(self.pushes[worker], 0) & zmq.POLLOUT:
                self.blocked_pushes.discard(worker)

    def _take_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            batch = inbox.popleft()
            key = (batch.topic, batch.partition)
            state = self.partitions.get(key)
            if state is None:
                state = self.partitions[key] = _PartitionState(batch.topic, batch.partition,
                                                               self.producer.producer_id)
            if batch.producer_id != state.producer_id:
                self._restamp(batch, state)
            state.queue.append(batch)
            self.ready.add(state)

    # ---- sending -----------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        for state in list(self.ready):
            if state.retry_at_s > now:
                continue
            if self.acks == wire.Durability.NONE:
                self._push(state)
            else:
                self._send(state, now)
            if not state.queue:
                self.ready.discard(state)

    def _send(self, state: _PartitionState, now: float) -> None:
        link = self._link(self.metadata.owner(state.partition))
        while state.queue and len(state.inflight) < PARTITION_IN_FLIGHT_MAX:
            if link.blocked or not link.window_open:
                return
            batch = state.queue[0]
            correlation_id = link.correlation_id()
            try:
                frame = wire.BatchMessage(batch.topic, batch.partition, batch.payload, self.acks,
                                          correlation_id).encode()
            except WireError as error:  # too large for a frame, for instance
                state.queue.popleft()
                self._finish(batch, error=error)
                continue
            if not link.send(correlation_id, frame, batch):
                return
            state.queue.popleft()
            batch.correlation_id, batch.link, batch.sent_s = correlation_id, link, now
            state.inflight.append(batch)

    def _push(self, state: _PartitionState) -> None:
        worker = self.metadata.owner(state.partition)
        if worker in self.blocked_pushes:
            return
        sock = self.pushes.get(worker)
        if sock is None:
            sock = self.pushes[worker] = configure(self.context.socket(zmq.PUSH))
            sock.setsockopt(zmq.SNDHWM, PUSH_SNDHWM_FRAMES)
            sock.connect(self.metadata.pulls[worker])
        while state.queue:
            batch = state.queue[0]
            try:
                frame = wire.BatchMessage(batch.topic, batch.partition, batch.payload,
                                          wire.Durability.NONE, 0).encode()
                sock.send(frame, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.blocked_pushes.add(worker)
                return
            except WireError as error:
                state.queue.popleft()
                self._finish(batch, error=error)
                continue
            state.queue.popleft()
            self._finish(batch, base_offset=-1)

    def _link(self, worker: int) -> WorkerLink:
        link = self.links.get(worker)
        if link is None:
            link = self.links[worker] = WorkerLink(self.context, worker, self.metadata.routers[worker])
        return link

    # ---- outcomes ----------------------------------------------------------------------

    def _on_reply(self, link: WorkerLink, batch, reply) -> None:
        state = self.partitions[(batch.topic, batch.partition)]
        if batch.link is not link or batch.correlation_id != reply.correlation_id:
            return  # requeued meanwhile (it will be resent and deduplicated) or already done
        if isinstance(reply, wire.ProduceReply):
            state.inflight.remove(batch)
            state.backoff_ms = RETRY_BACKOFF_FIRST_MS
            batch.durability = reply.durability
            self._finish(batch, base_offset=reply.base_offset)
            return
        if not isinstance(reply, wire.ErrorReply):
            error = IngestError(ErrorCode.CORRUPT_MESSAGE, f"unexpected reply {type(reply).__name__}")
        else:
            error = reply.exception()
        self._on_error(state, batch, error)

    def _on_error(self, state: _PartitionState, batch, error: IngestError) -> None:
        code = error.code
        if code in NEW_PRODUCER_ID and self.producer.idempotent:
            if state.inflight and batch is state.inflight[0]:
                log.warning("%s-%d: %s; continuing under a new producer id", state.topic,
                            state.partition, error)
                self._rewind(state, batch)
                state.producer_id = secrets.randbits(63)
                state.sequence_base = batch.drain_sequence
                for queued in state.queue:
                    self._restamp(queued, state)
            else:
                self._rewind(state, batch)  # an earlier batch is being retried: wait for it
            return
        if code in RETRIABLE:
            if code in REFRESH_METADATA:
                self._refresh_metadata()
            self._rewind(state, batch)
            return
        if batch in state.inflight:
            state.inflight.remove(batch)
        self._finish(batch, error=error)

    def _rewind(self, state: _PartitionState, batch) -> None:
        """Requeue ``batch`` and every batch sent after it, in order, after a backoff."""
        if batch not in state.inflight:
            return
        i = state.inflight.index(batch)
        moved = state.inflight[i:]
        del state.inflight[i:]
        for b in moved:
            if b.link is not None:
                b.link.forget(b.correlation_id)
                b.link = None
        state.queue.extendleft(reversed(moved))
        state.retry_at_s = time.monotonic() + state.backoff_ms / 1000
        state.backoff_ms = min(2 * state.backoff_ms, RETRY_BACKOFF_MAX_MS)
        self.ready.add(state)

    def _on_link_lost(self, link: WorkerLink, why: str) -> None:
        lost = link.reset()
        if lost:
            log.info("worker %d: %s; resending %d batches", link.worker_id, why, len(lost))
        for state in self.partitions.values():
            if state.inflight and state.inflight[0].link is link:
                self._rewind(state, state.inflight[0])
        self._refresh_metadata()

    def _restamp(self, batch, state: _PartitionState) -> None:
        """Stamp ``batch`` with the partition's current producer id, its records numbered
        from 0 at ``state.sequence_base`` (a new id starts at sequence 0, as Kafka asks)."""
        sequence = (batch.drain_sequence - state.sequence_base) % SEQUENCE_MODULUS
        restamp(batch.payload, state.producer_id, sequence)
        batch.producer_id, batch.base_sequence = state.producer_id, sequence

    def _finish(self, batch, base_offset: int = -1, error: BaseException | None = None) -> None:
        batch.base_offset = base_offset
        batch.error = error
        batch.payload = None
        batch.link = None
        batch.done.set()
        self.producer.release(batch)

    # ---- timeouts and metadata ---------------------------------------------------------

    def _expire(self, now: float) -> None:
        request_timeout_s = self.producer.request_timeout_ms / 1000
        for link in list(self.links.values()):
            if any(now - b.sent_s > request_timeout_s for b in link.inflight.values()):
                self._on_link_lost(link, f"no reply within request_timeout_ms {self.producer.request_timeout_ms}")
        for state in self.partitions.values():
            for batch in [b for b in (*state.inflight, *state.queue) if b.deadline_s <= now]:
                if batch in state.inflight:
                    state.inflight.remove(batch)
                    if batch.link is not None:
                        batch.link.forget(batch.correlation_id)
                else:
                    state.queue.remove(batch)
                self._finish(batch, error=_delivery_timeout(batch, self.producer.delivery_timeout_ms))

    def _refresh_metadata(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_s < METADATA_REFRESH_MIN_INTERVAL_MS / 1000:
            return
        self._refreshed_s = now
        try:
            metadata = Metadata.parse(self._metadata_client.metadata())
        except IngestError as error:
            log.info("metadata refresh failed: %s", error)
            return
        if metadata.routers != self.metadata.routers or metadata.pulls != self.metadata.pulls:
            log.info("worker endpoints changed: %s", metadata.routers)
            for worker, link in list(self.links.items()):
                self._on_link_lost(link, "endpoints changed")
                link.close()
                del self.links[worker]
            for sock in self.pushes.values():
                sock.close()
            self.pushes.clear()
            self.blocked_pushes.clear()
        self.metadata = metadata
        self.producer.metadata = metadata

    def _fail_inbox(self) -> None:
        """Fail batches handed over after the loop ended (any thread may call this)."""
        while True:
            try:
                batch = self.inbox.popleft()
            except IndexError:
                return
            self._finish(batch, error=ProducerClosedError(self._why_stopped))

    def _shutdown(self) -> None:
        self._wake_pending = True  # from now on wake() must not write to the closed pipe
        self._stopped = True
        self._fail_inbox()
        for state in self.partitions.values():
            for batch in (*state.inflight, *state.queue):
                self._finish(batch, error=ProducerClosedError(self._why_stopped))
            state.inflight.clear()
            state.queue.clear()
        for link in self.links.values():
            link.close()
        for sock in self.pushes.values():
            sock.close()
        self._metadata_client.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _delivery_timeout(batch, delivery_timeout_ms: int) -> IngestError:
    return DeliveryTimeoutError(
        f"batch of {batch.records} records to {batch.topic} not acknowledged within "
        f"delivery_timeout_ms {delivery_timeout_ms} (it may or may not be stored)", batch.partition)
