"""The producer: send() records, get futures, let the SDK batch, encode, retry and dedupe.

    with Producer("tcp://127.0.0.1:7400") as producer:           # acks="fsync"
        future = producer.send("sensors", b'{"t": 21.5}', key=b"dev-42")
        partition, offset = future.result(timeout=10)            # on disk at that offset

Cost model. ``send()`` is the hot path of every user, so it does only what must happen per
record in Python: a dict lookup, three list appends under a lock and a tiny future (a
tuple). Partitioning (murmur2 of every key in one numba call) and encoding (one numba call
per RecordBatch over values packed with ``b"".join``; ``ingest.net.batching``) happen
when a topic's accumulator is drained: after ``linger_ms`` (by the I/O thread), as soon
as it holds about ``batch_bytes`` (by the thread that sends the next record), or on
``flush()``. ``send_batch()`` hands many readings over in one call with one future.
Each future is a live Python object: a caller that keeps hundreds of thousands of them
pays CPython's garbage collector two to four times what send() itself costs per record
(see bench/RESULTS.md); keep the futures you will check, or none: after flush(),
``delivered_records``, ``failed_records`` and ``last_error`` say how every record went.

Delivery. One I/O thread (``ingest.net.sender``) owns every socket. It keeps at most five
batches in flight per partition, in sequence order, and resends the very same bytes after
a lost connection, a timeout or a retriable error, until ``delivery_timeout_ms``.

Idempotence. The producer picks its own id: 63 random bits (no broker round trip; two
producers collide with probability about n^2 / 2^64 for n producers, negligible), epoch
0, and numbers the records it sends to each partition from 0 (Kafka's baseSequence). The
worker keeps the last five batches of every producer per partition, so a retried batch
is answered with its original offsets instead of being stored twice.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time

import numpy as np
import zmq

from ingest.net import wire
from ingest.security import ClientCurve
from ingest.net.batching import (
    RECORDS_PER_BATCH_MAX,
    SEQUENCE_MODULUS,
    PackedRecords,
    choose_partitions,
    encode_batch_rows,
    pack_columns,
    pack_records,
    split_batches,
)
from ingest.net.client import (
    BOOTSTRAP_TIMEOUT_MS,
    DEFAULT_BOOTSTRAP,
    BootstrapClient,
    Metadata,
)
from ingest.net.errors import ErrorCode, IngestError
from ingest.net.futures import (  # the errors are part of the producer's API
    Batch,
    BatchFuture,
    BufferFullError,
    DeliveryTimeoutError,
    Drain,
    ProducerClosedError,
    RecordFuture,
)
from ingest.net.sender import Sender
from ingest.shards.batch import encode_headers

log = logging.getLogger("ingest.producer")

__all__ = ["BatchFuture", "BufferFullError", "DeliveryTimeoutError", "Producer", "ProducerClosedError",
           "RecordFuture"]

# Bytes of records per RecordBatch: one frame amortises the per-request cost (~50 us of
# Python and syscalls on each side) over ~10,000 telemetry readings of 100 B, and stays
# far below the appliance's max_batch_bytes (8 MiB by default).
BATCH_BYTES_DEFAULT = 1 << 20
# A batch must fit one frame, with room for the BATCH header and record overheads.
BATCH_BYTES_MAX = wire.MAX_FRAME_BYTES // 2
# Encoded bytes waiting for an ack, per producer; send() blocks beyond it (Kafka's
# buffer.memory is 32 MiB): bounds memory while the appliance is slow or down.
BUFFER_BYTES_DEFAULT = 64 << 20
# How long send() may block for buffer space before raising BufferFullError.
MAX_BLOCK_MS_DEFAULT = 60_000
# How long a batch may take from send() to its ack, retries included (Kafka's default).
DELIVERY_TIMEOUT_MS_DEFAULT = 120_000
# A request without a reply this long is given up and resent (the worker may be hung).
REQUEST_TIMEOUT_MS_DEFAULT = 30_000
LINGER_MS_DEFAULT = 5
# An accumulator is drained once it holds about this fraction of batch_bytes.
ACCUMULATOR_FILL_FRACTION = 0.9
PRODUCER_ID_BITS = 63

ACKS = {"0": wire.Durability.NONE, 0: wire.Durability.NONE,
        "1": wire.Durability.WRITTEN, 1: wire.Durability.WRITTEN,
        "fsync": wire.Durability.FSYNC, 2: wire.Durability.FSYNC,
        "all": wire.Durability.ALL, -1: wire.Durability.ALL, 3: wire.Durability.ALL}

_NEVER = math.inf


# ---------------------------------------------------------------------------------------
# Accumulating and encoding


class _Accumulator:
    """Records sent to one topic since its last drain, as parallel lists. Guarded by the
    producer's ``_lock``; swapped for empty lists when drained."""

    __slots__ = ("topic", "partitions", "values", "keys", "timestamps", "extras", "drain",
                 "records_max", "deadline_s", "sticky")

    def __init__(self, topic: str, partitions: int, records_max: int) -> None:
        self.topic = topic
        self.partitions = partitions
        self.values: list = []
        self.keys: list = []
        self.timestamps: list = []
        self.extras: dict[int, tuple[bytes | None, int | None]] | None = None
        self.drain = Drain()
        self.records_max = records_max
        self.deadline_s = _NEVER
        self.sticky = secrets.randbelow(partitions)  # null keys: rotate from a random start


# ---------------------------------------------------------------------------------------
# The producer


class Producer:
    """Sends records to an ingest appliance; thread-safe.

    ``acks``: "0"/0 fire-and-forget (PUSH; futures resolve once sent, offset -1), "1"/1
    appended to the log, "fsync" (default) on disk, "all" on disk on every in-sync replica.
    ``linger_ms``: how long a record may wait for others to share its batch.
    ``batch_bytes``: bytes of records per batch before it is sent without lingering.
    ``idempotent``: number batches so that retries are never stored twice (acked modes).
    """

    def __init__(self, bootstrap: str = DEFAULT_BOOTSTRAP, acks="fsync",
                 linger_ms: float = LINGER_MS_DEFAULT, batch_bytes: int = BATCH_BYTES_DEFAULT,
                 idempotent: bool = True, *, buffer_bytes: int = BUFFER_BYTES_DEFAULT,
                 max_block_ms: int = MAX_BLOCK_MS_DEFAULT,
                 delivery_timeout_ms: int = DELIVERY_TIMEOUT_MS_DEFAULT,
                 request_timeout_ms: int = REQUEST_TIMEOUT_MS_DEFAULT,
                 bootstrap_timeout_ms: int = BOOTSTRAP_TIMEOUT_MS, curve: ClientCurve | None = None) -> None:
        if acks not in ACKS:
            raise ValueError(f"acks {acks!r}: use 0, 1, 'fsync' or 'all'")
        _check_range("linger_ms", linger_ms, 0, 60_000)
        _check_range("batch_bytes", batch_bytes, 1, BATCH_BYTES_MAX)
        _check_range("buffer_bytes", buffer_bytes, batch_bytes, 1 << 40)
        for name, value in (("max_block_ms", max_block_ms), ("delivery_timeout_ms", delivery_timeout_ms),
                            ("request_timeout_ms", request_timeout_ms)):
            _check_range(name, value, 1, 24 * 3600 * 1000)
        self.acks = ACKS[acks]
        self.linger_ms = linger_ms
        self.batch_bytes = batch_bytes
        self.buffer_bytes = buffer_bytes
        self.max_block_ms = max_block_ms
        self.delivery_timeout_ms = delivery_timeout_ms
        self.request_timeout_ms = request_timeout_ms
        self.idempotent = bool(idempotent) and self.acks != wire.Durability.NONE
        # Random, not assigned by the appliance: see the module docstring for the odds.
        self.producer_id = secrets.randbits(PRODUCER_ID_BITS) if self.idempotent else -1
        self.context = zmq.Context()
        if curve is not None:  # every socket of this producer is a CURVE client
            curve.apply(self.context)
        self.bootstrap = BootstrapClient(bootstrap, bootstrap_timeout_ms, self.context)
        try:
            self.metadata = Metadata.parse(self.bootstrap.metadata())
        except BaseException:
            self.bootstrap.close()
            self.context.term()
            raise
        self._lock = threading.Lock()  # accumulators' lists
        self._drain_lock = threading.Lock()  # one drain at a time: sequences go out in order
        self._space = threading.Condition()  # buffer accounting; flush() waits on it too
        self._buffered_bytes = 0
        # Outcomes so far (guarded by _space): what a caller that keeps no futures checks.
        self._delivered_records = 0
        self._failed_records = 0
        self._last_error: BaseException | None = None
        self._unfinished: set[Batch] = set()  # submitted, not yet acked or failed
        self._accumulators: dict[str, _Accumulator] = {}
        self._sequences: dict[tuple[str, int], int] = {}
        self._closed = False
        self._sender = Sender(self)
        self._sender.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the hot path ------------------------------------------------------------------

    def send(self, topic: str, value, key=None, headers=None, timestamp_ms=None, partition=None) -> RecordFuture:
        """Queue one record; returns its RecordFuture at once (no I/O in this call).

        ``value``/``key``: bytes-like, str (sent as UTF-8) or None. ``headers``: a sequence
        of (str, bytes | None). ``timestamp_ms`` None: the time the record's batch is
        encoded, at most ``linger_ms`` after this call. ``partition`` None: murmur2(key) as
        Kafka does, or for a null key a partition that rotates from batch to batch.
        """
        acc = self._accumulators.get(topic)
        if acc is None or headers is not None or partition is not None:
            return self._send_slow(topic, value, key, headers, timestamp_ms, partition)
        lock = self._lock
        lock.acquire()
        values = acc.values
        index = len(values)
        if index >= acc.records_max:
            lock.release()
            return self._send_slow(topic, value, key, headers, timestamp_ms, partition)
        values.append(value)
        acc.keys.append(key)
        acc.timestamps.append(timestamp_ms)
        drain = acc.drain
        lock.release()
        if not index:
            self._arm_linger(acc)
        return RecordFuture((drain, index))

    def _send_slow(self, topic, value, key, headers, timestamp_ms, partition) -> RecordFuture:
        """send() for a topic's first record, headers, an explicit partition or a full
        accumulator."""
        acc = self._accumulator(topic)
        if partition is not None and (type(partition) is not int or not 0 <= partition < acc.partitions):
            raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                              f"partition {partition!r} of {topic!r}: it has partitions 0..{acc.partitions - 1}")
        header_bytes = encode_headers(list(headers)) if headers else None
        while True:
            with self._lock:
                index = len(acc.values)
                if index < acc.records_max:
                    acc.values.append(value)
                    acc.keys.append(key)
                    acc.timestamps.append(timestamp_ms)
                    if header_bytes is not None or partition is not None:
                        if acc.extras is None:
                            acc.extras = {}
                        acc.extras[index] = (header_bytes, partition)
                    drain = acc.drain
                    break
            self._wait_for_space()
            self._drain(acc)
        if not index:
            self._arm_linger(acc)
        return RecordFuture((drain, index))

    def _arm_linger(self, acc: _Accumulator) -> None:
        acc.deadline_s = time.monotonic() + self.linger_ms / 1000
        self._sender.wake()

    # ---- topics ------------------------------------------------------------------------

    def _accumulator(self, topic: str) -> _Accumulator:
        if self._closed:
            raise ProducerClosedError()
        acc = self._accumulators.get(topic)
        if acc is not None:
            return acc
        partitions = self.partitions_for(topic)
        records_max = max(1, self.batch_bytes // 128)  # corrected from real sizes at the first drain
        with self._lock:
            return self._accumulators.setdefault(topic, _Accumulator(topic, partitions, records_max))

    def partitions_for(self, topic: str) -> int:
        """The partition count of ``topic``; creates the topic if the appliance allows
        it (auto_create_topics) and it does not exist yet."""
        count = self.metadata.topics.get(topic)
        if count is None:
            self.metadata = Metadata.parse(self.bootstrap.metadata())
            count = self.metadata.topics.get(topic)
        if count is None:
            if not self.metadata.auto_create_topics:
                raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                  f"topic {topic!r} does not exist and the appliance does not "
                                  f"create topics on first use: create it with `ingest topics create`")
            self.metadata = Metadata.parse(self.bootstrap.create_topic(topic))
            count = self.metadata.topics[topic]
        return count

    # ---- draining ----------------------------------------------------------------------

    def _drain(self, acc: _Accumulator, blocking: bool = True) -> bool:
        """Encode what ``acc`` holds and hand the batches to the I/O thread. False if
        another drain is running and ``blocking`` is False (the I/O thread never waits)."""
        if not self._drain_lock.acquire(blocking):
            return False
        try:
            with self._lock:
                records = len(acc.values)
                if not records:
                    return True
                values, keys, timestamps, extras, drain = (acc.values, acc.keys, acc.timestamps,
                                                           acc.extras, acc.drain)
                acc.values, acc.keys, acc.timestamps, acc.extras = [], [], [], None
                acc.drain = Drain()
                acc.deadline_s = _NEVER
            try:
                packed = pack_records(values, keys, timestamps, extras, time.time_ns() // 1_000_000)
                self._encode_and_submit(acc, packed, drain)
            except BaseException as error:  # the drain's futures must learn of it
                if not drain.drained.is_set():
                    drain.fail(error, records)
                    self._count_failed(records, error)
                raise
            return True
        finally:
            self._drain_lock.release()

    def _encode_and_submit(self, acc: _Accumulator, packed: PackedRecords, drain: Drain) -> None:
        """Partition, split, encode and submit ``packed`` (the caller holds _drain_lock)."""
        partitions = choose_partitions(packed, acc.partitions, acc.sticky)
        acc.sticky = (acc.sticky + 1) % acc.partitions
        sizes = packed.sizes()
        keep = None
        if packed.bad:
            keep = np.ones(packed.count, bool)
            keep[list(packed.bad)] = False
        record_batch = np.full(packed.count, -1, np.int32)
        record_position = np.zeros(packed.count, np.int32)
        deadline_s = time.monotonic() + self.delivery_timeout_ms / 1000
        batches = []
        for partition, rows in split_batches(partitions, sizes, keep, self.batch_bytes):
            base_sequence = self._next_sequence(acc.topic, partition, rows.size)
            payload = encode_batch_rows(packed, rows, self.producer_id, base_sequence)
            record_batch[rows] = len(batches)
            record_position[rows] = np.arange(rows.size, dtype=np.int32)
            batches.append(Batch(acc.topic, partition, payload, rows.size, self.producer_id,
                                  base_sequence, deadline_s))
        if packed.count > 1:
            # Size the next accumulator from what these records weighed, a little under
            # batch_bytes so that a full one still fits one batch when sizes vary.
            target_bytes = self.batch_bytes * ACCUMULATOR_FILL_FRACTION
            acc.records_max = int(min(RECORDS_PER_BATCH_MAX,
                                      max(1, target_bytes * packed.count // max(1, int(sizes.sum())))))
        drain.assign(batches, record_batch, record_position, packed.bad)
        if packed.bad:  # records that could not be encoded fail alone, now
            self._count_failed(len(packed.bad), next(iter(packed.bad.values())))
        with self._space:
            self._buffered_bytes += sum(b.size_bytes for b in batches)
            self._unfinished.update(batches)
        self._sender.submit(batches)

    def _next_sequence(self, topic: str, partition: int, records: int) -> int:
        if not self.idempotent:
            return -1
        key = (topic, partition)
        sequence = self._sequences.get(key, 0)
        self._sequences[key] = (sequence + records) % SEQUENCE_MODULUS
        return sequence

    def drain_due(self, now_s: float) -> float:
        """Drain every accumulator whose linger expired (I/O thread); returns the next
        deadline."""
        next_s = _NEVER
        for acc in list(self._accumulators.values()):
            if acc.deadline_s <= now_s:
                try:
                    if not self._drain(acc, blocking=False):
                        next_s = now_s  # another thread is draining: look again soon
                except Exception:  # its futures carry the error; the I/O thread goes on
                    log.exception("encoding records for %s failed", acc.topic)
            next_s = min(next_s, acc.deadline_s)
        return next_s

    # ---- buffer space ------------------------------------------------------------------

    def _wait_for_space(self) -> None:
        deadline = time.monotonic() + self.max_block_ms / 1000
        with self._space:
            while self._buffered_bytes >= self.buffer_bytes:
                if self._closed:
                    raise ProducerClosedError()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._space.wait(remaining):
                    if self._buffered_bytes >= self.buffer_bytes:
                        raise BufferFullError(
                            f"{self._buffered_bytes} bytes await acks (buffer_bytes "
                            f"{self.buffer_bytes}) after waiting max_block_ms {self.max_block_ms}")

    def release(self, batch: Batch) -> None:
        """A batch is done (acked or failed): its bytes leave the buffer (I/O thread)."""
        with self._space:
            self._buffered_bytes -= batch.size_bytes
            self._unfinished.discard(batch)
            if batch.error is None:
                self._delivered_records += batch.records
            else:
                self._failed_records += batch.records
                self._last_error = batch.error
            self._space.notify_all()

    def _count_failed(self, records: int, error: BaseException) -> None:
        with self._space:
            self._failed_records += records
            self._last_error = error

    # ---- outcomes without futures --------------------------------------------------------

    @property
    def delivered_records(self) -> int:
        """Records acknowledged so far at this producer's acks level (acks=0: handed to the
        socket). With failed_records, what a caller that keeps no futures checks after
        flush(): each record sent is counted once in one of them when its outcome is known."""
        with self._space:
            return self._delivered_records

    @property
    def failed_records(self) -> int:
        """Records that failed so far (each future of theirs raises); see last_error."""
        with self._space:
            return self._failed_records

    @property
    def last_error(self) -> BaseException | None:
        """The error of the latest failed record, None if none failed."""
        with self._space:
            return self._last_error

    # ---- send_batch, flush, close ------------------------------------------------------

    def send_batch(self, topic: str, values, keys=None, timestamps_ms=None, *,
                   value_lengths=None, key_lengths=None) -> BatchFuture:
        """Queue many records in one call; returns one BatchFuture.

        ``values``: a sequence of bytes-like, or a numpy array whose rows (2-D) or elements
        (1-D, e.g. a structured array of readings) are the values, with no per-record
        Python object; or, with ``value_lengths`` (one int per record, -1 for a null
        value), one bytes-like buffer holding every value back to back: the cheapest
        form, nothing is joined or measured per record. ``keys``: None (all null), or the
        same forms (``key_lengths`` for one buffer). ``timestamps_ms``: None (now), one int
        for all, or one per record. Records already queued with send() for this topic go
        first, so per-partition order follows call order.
        """
        acc = self._accumulator(topic)
        packed = pack_columns(values, keys, timestamps_ms, time.time_ns() // 1_000_000,
                              value_lengths, key_lengths)
        drain = Drain()
        if packed.count == 0:
            drain.assign([], np.zeros(0, np.int32), np.zeros(0, np.int32), {})
            return BatchFuture(drain, 0)
        self._wait_for_space()
        self._drain(acc)
        with self._drain_lock:
            try:
                self._encode_and_submit(acc, packed, drain)
            except BaseException as error:
                if not drain.drained.is_set():
                    drain.fail(error, packed.count)
                    self._count_failed(packed.count, error)
                raise
        return BatchFuture(drain, packed.count)

    def flush(self, timeout: float | None = None) -> None:
        """Send every record queued before this call and wait until each has an outcome
        (acked or failed: see its future). TimeoutError if ``timeout`` seconds pass first."""
        for acc in list(self._accumulators.values()):
            self._drain(acc)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._space:
            waiting = set(self._unfinished)
            while True:
                waiting &= self._unfinished
                if not waiting:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{len(waiting)} batches still unacknowledged after {timeout} s")
                self._space.wait(remaining)

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to ``timeout`` seconds), stop the I/O thread and close every socket.
        Records not acknowledged by then fail with ProducerClosedError."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        except TimeoutError:
            pass
        finally:
            self._closed = True
            accumulators, self._accumulators = self._accumulators, {}
            self._sender.stop()
            self._sender.join()
            closed = ProducerClosedError("the producer closed before this record was sent")
            for acc in accumulators.values():  # records a racing send() added after the flush
                with self._lock:
                    if acc.values and not acc.drain.drained.is_set():
                        acc.drain.fail(closed, len(acc.values))
                        self._count_failed(len(acc.values), closed)
            self.bootstrap.close()
            self.context.term()
            with self._space:
                self._space.notify_all()


def _check_range(name: str, value, low, high) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} {value!r} must be a number in {low}..{high}")
