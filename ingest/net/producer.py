"""The producer: send() records, get futures, let the SDK batch, encode, retry and dedupe.

    with Producer("tcp://127.0.0.1:7400") as producer:           # acks="fsync"
        future = producer.send("sensors", b'{"t": 21.5}', key=b"dev-42")
        partition, offset = future.result(timeout=10)            # on disk at that offset

Cost model. ``send()`` is the hot path of every user, so it does only what must happen per
record in Python: a dict lookup, three list appends under a lock and a tiny future
object. Partitioning (murmur2 of every key in one numba call) and encoding (one numba call
per RecordBatch over values packed with ``b"".join``) happen when a topic's accumulator is
drained: after ``linger_ms`` (by the I/O thread), or as soon as it holds about
``batch_bytes`` (by the thread that sends the next record), or on ``flush()``.
``send_batch()`` hands many readings over in one call with one future.

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

import math
import secrets
import threading
import time
from collections.abc import Sequence

import numpy as np
from numba import njit

from ingest.net import wire
from ingest.net.client import (
    BOOTSTRAP_TIMEOUT_MS,
    DEFAULT_BOOTSTRAP,
    BootstrapClient,
    Metadata,
)
from ingest.net.errors import ErrorCode, IngestError
from ingest.shards import kernels
from ingest.shards.batch import encode_headers
from ingest.shards.kernels import partition_for_key

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
# Records per RecordBatch at most, whatever their size: bounds the per-batch arrays.
RECORDS_PER_BATCH_MAX = 1 << 20
# Bytes a record adds to a batch beyond its key, value and headers (varints, attributes):
# used to split drains into batches of about batch_bytes.
RECORD_OVERHEAD_BYTES = 12
PRODUCER_ID_BITS = 63
SEQUENCE_MODULUS = 1 << 31  # Kafka's sequences are int32 and wrap to 0

ACKS = {"0": wire.Durability.NONE, 0: wire.Durability.NONE,
        "1": wire.Durability.WRITTEN, 1: wire.Durability.WRITTEN,
        "fsync": wire.Durability.FSYNC, 2: wire.Durability.FSYNC,
        "all": wire.Durability.ALL, -1: wire.Durability.ALL, 3: wire.Durability.ALL}

_NEVER = math.inf


class BufferFullError(IngestError):
    """send() waited max_block_ms for buffer space: the appliance is slower than the
    producer or unreachable. Retry later, or raise buffer_bytes."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.THROTTLED, message)


class ProducerClosedError(IngestError):
    """The producer was closed: no more sends; records still unsent when it closed fail
    with this error."""

    def __init__(self, message: str = "the producer is closed") -> None:
        super().__init__(ErrorCode.SHUTTING_DOWN, message)

    def __str__(self) -> str:
        return self.message


class DeliveryTimeoutError(IngestError):
    """A batch was not acknowledged within delivery_timeout_ms (retries included). Its
    records may or may not have been stored."""

    def __init__(self, message: str, partition: int) -> None:
        super().__init__(ErrorCode.TIMEOUT, message, partition)

    def __str__(self) -> str:
        return f"{self.message} [partition {self.partition}]: is the appliance up? (`ingest status`)"


# ---------------------------------------------------------------------------------------
# Futures


class _Batch:
    """One encoded RecordBatch for one partition, as the I/O thread sends it."""

    __slots__ = ("topic", "partition", "payload", "records", "size_bytes", "producer_id",
                 "base_sequence", "deadline_s", "done", "base_offset", "error",
                 "correlation_id", "link", "sent_s")

    def __init__(self, topic: str, partition: int, payload: np.ndarray, records: int,
                 producer_id: int, base_sequence: int, deadline_s: float) -> None:
        self.topic = topic
        self.partition = partition
        self.payload = payload
        self.records = records
        self.size_bytes = payload.size
        self.producer_id = producer_id
        self.base_sequence = base_sequence
        self.deadline_s = deadline_s
        self.done = threading.Event()
        self.base_offset = -1
        self.error: BaseException | None = None
        self.correlation_id = 0
        self.link = None
        self.sent_s = 0.0


class _Drain:
    """The shared state behind the futures of one drain: which batch and position each
    record went to. Filled when the drain is encoded; each batch resolves on its own."""

    __slots__ = ("drained", "batches", "record_batch", "record_position", "record_errors")

    def __init__(self) -> None:
        self.drained = threading.Event()
        self.batches: list[_Batch] = []
        self.record_batch: np.ndarray | None = None
        self.record_position: np.ndarray | None = None
        self.record_errors: dict[int, BaseException] = {}

    def assign(self, batches: list[_Batch], record_batch: np.ndarray,
               record_position: np.ndarray, record_errors: dict[int, BaseException]) -> None:
        self.batches = batches
        self.record_batch = record_batch
        self.record_position = record_position
        self.record_errors = record_errors
        self.drained.set()

    def fail(self, error: BaseException, records: int) -> None:
        """Every record of the drain failed before it was encoded."""
        self.assign([], np.full(records, -1, np.int32), np.zeros(records, np.int32),
                    dict.fromkeys(range(records), error))

    def batch_of(self, index: int, timeout: float | None) -> tuple[_Batch, int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.drained.wait(timeout):
            raise TimeoutError(f"record not sent within {timeout} s (still lingering)")
        b = int(self.record_batch[index])
        if b < 0:
            raise self.record_errors[index]
        batch = self.batches[b]
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not batch.done.wait(remaining):
            raise TimeoutError(f"no ack within {timeout} s for partition {batch.partition}")
        return batch, int(self.record_position[index])

    def done(self, index: int) -> bool:
        if not self.drained.is_set():
            return False
        b = int(self.record_batch[index])
        return b < 0 or self.batches[b].done.is_set()


class RecordFuture(tuple):
    """The outcome of one send(): ``result(timeout)`` -> (partition, offset).

    offset is -1 with acks=0 (sent, nothing known about storage). Raises the error that
    failed the record (an IngestError), or TimeoutError if ``timeout`` seconds pass first.
    (A tuple of the drain and the record's index in it: the cheapest object CPython
    builds, and send() builds one per record.)
    """

    __slots__ = ()

    def result(self, timeout: float | None = None) -> tuple[int, int]:
        drain, index = self
        batch, position = drain.batch_of(index, timeout)
        if batch.error is not None:
            raise batch.error
        return batch.partition, (batch.base_offset + position if batch.base_offset >= 0 else -1)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except Exception as error:  # the record's own failure, returned not raised
            return error
        return None

    def done(self) -> bool:
        drain, index = self
        return drain.done(index)

    def __repr__(self) -> str:
        return f"<RecordFuture {'done' if self.done() else 'pending'}>"


class BatchFuture:
    """The outcome of one send_batch(): ``result(timeout)`` -> (partitions, offsets), two
    arrays with one entry per record in the order given (offsets -1 with acks=0).

    Raises the first error of any of its batches; records of other batches may have been
    stored (``results()`` gives per-record detail as (partitions, offsets, errors)).
    """

    __slots__ = ("_drain", "_records")

    def __init__(self, drain: _Drain, records: int) -> None:
        self._drain = drain
        self._records = records

    def result(self, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        partitions, offsets, errors = self.results(timeout)
        if errors:
            raise next(iter(errors.values()))
        return partitions, offsets

    def results(self, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """(partitions, offsets, {record index: error}) once every batch has an outcome."""
        drain = self._drain
        deadline = None if timeout is None else time.monotonic() + timeout
        if not drain.drained.wait(timeout):
            raise TimeoutError(f"records not sent within {timeout} s")
        for batch in drain.batches:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not batch.done.wait(remaining):
                raise TimeoutError(f"no ack within {timeout} s for partition {batch.partition}")
        partitions = np.full(self._records, -1, np.int32)
        offsets = np.full(self._records, -1, np.int64)
        errors = dict(drain.record_errors)
        for j, batch in enumerate(drain.batches):
            rows = np.flatnonzero(drain.record_batch == j)
            partitions[rows] = batch.partition
            if batch.error is not None:
                errors.update(dict.fromkeys(rows.tolist(), batch.error))
            elif batch.base_offset >= 0:
                offsets[rows] = batch.base_offset + drain.record_position[rows]
        return partitions, offsets, errors

    def done(self) -> bool:
        return self._drain.drained.is_set() and all(b.done.is_set() for b in self._drain.batches)


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
        self.drain = _Drain()
        self.records_max = records_max
        self.deadline_s = _NEVER
        self.sticky = secrets.randbelow(partitions)  # null keys: rotate from a random start


class _Packed:
    """Records as packed columns, ready for the encoder; ``bad`` records are left out."""

    __slots__ = ("count", "values", "value_offsets", "value_lengths", "keys", "key_offsets",
                 "key_lengths", "timestamps_ms", "headers", "header_offsets", "header_lengths",
                 "partitions", "bad")

    def __init__(self, count: int) -> None:
        self.count = count
        self.keys = None  # None: every key is null
        self.headers = None  # None: no record has headers
        self.partitions = None  # None: no record names its partition
        self.bad: dict[int, BaseException] = {}

    def sizes(self) -> np.ndarray:
        size = np.maximum(self.value_lengths, 0) + RECORD_OVERHEAD_BYTES
        if self.keys is not None:
            size += np.maximum(self.key_lengths, 0)
        if self.headers is not None:
            size += self.header_lengths
        return size


def _pack_bytes(fields: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, offsets, lengths) of byte strings without None; TypeError on anything
    b"".join rejects, ValueError if a buffer's len() is not its size in bytes."""
    buffer = b"".join(fields)
    lengths = np.fromiter(map(len, fields), np.int64, len(fields))
    offsets = np.cumsum(lengths) - lengths
    if lengths.size and int(offsets[-1] + lengths[-1]) != len(buffer):
        raise ValueError("a buffer's len() differs from its size in bytes")
    return np.frombuffer(buffer, np.uint8), offsets, lengths


def _as_bytes(field, what: str) -> bytes | None:
    """One key or value for the careful path: bytes-like, str (UTF-8) or None."""
    if field is None or type(field) is bytes:
        return field
    if isinstance(field, str):
        return field.encode("utf-8")
    try:
        return memoryview(field).tobytes()
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, str or None, not {type(field).__name__}") from None


def _pack_nullable(fields: Sequence, what: str, bad: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like _pack_bytes, per field, with None as length -1 and bad fields recorded."""
    clean = []
    for i, field in enumerate(fields):
        try:
            clean.append(_as_bytes(field, what))
        except (TypeError, UnicodeEncodeError) as error:
            bad.setdefault(i, IngestError(ErrorCode.INVALID_REQUEST, str(error)))
            clean.append(None)
    buffer, offsets, lengths = _pack_bytes([b"" if f is None else f for f in clean])
    lengths[[i for i, f in enumerate(clean) if f is None]] = -1
    return buffer, offsets, lengths


def _pack_timestamps(timestamps: list, now_ms: int, bad: dict) -> np.ndarray:
    nulls = timestamps.count(None)
    if nulls == len(timestamps):
        return np.full(len(timestamps), now_ms, np.int64)
    if nulls:
        timestamps = [now_ms if t is None else t for t in timestamps]
    try:
        array = np.array(timestamps, dtype=np.int64)
        if array.ndim == 1 and int(array.min()) >= 0:
            return array
    except (TypeError, ValueError, OverflowError):
        pass
    array = np.full(len(timestamps), now_ms, np.int64)
    for i, t in enumerate(timestamps):
        if type(t) is int and 0 <= t < 2**63:
            array[i] = t
        else:
            bad.setdefault(i, IngestError(ErrorCode.INVALID_REQUEST,
                                          f"timestamp_ms {t!r} is not an int in 0..2**63-1"))
    return array


def pack_records(values: list, keys: list, timestamps: list, extras: dict | None,
                 now_ms: int) -> _Packed:
    """The records of one drain as columns: values and keys packed with one b"".join
    each, timestamps None stamped ``now_ms``. Records that cannot be encoded (wrong
    types, negative timestamps) are listed in ``bad`` and left out of the batches."""
    packed = _Packed(len(values))
    bad = packed.bad
    try:
        packed.values, packed.value_offsets, packed.value_lengths = _pack_bytes(values)
    except (TypeError, ValueError):
        packed.values, packed.value_offsets, packed.value_lengths = _pack_nullable(values, "value", bad)
    # Counting None costs a comparison per key: only when the first key hints at it.
    if keys[0] is not None or keys.count(None) != len(keys):
        try:
            packed.keys, packed.key_offsets, packed.key_lengths = _pack_bytes(keys)
        except (TypeError, ValueError):  # some keys are None, str or not bytes-like
            packed.keys, packed.key_offsets, packed.key_lengths = _pack_nullable(keys, "key", bad)
    packed.timestamps_ms = _pack_timestamps(timestamps, now_ms, bad)
    if extras:
        _pack_extras(packed, extras)
    return packed


def _pack_extras(packed: _Packed, extras: dict) -> None:
    """Headers (pre-encoded) and explicit partitions of the few records that have them."""
    headers = [b""] * packed.count
    partitions = np.full(packed.count, -1, np.int64)
    for i, (header_bytes, partition) in extras.items():
        if header_bytes:
            headers[i] = header_bytes
        if partition is not None:
            partitions[i] = partition
    if any(headers):
        packed.headers, packed.header_offsets, packed.header_lengths = _pack_bytes(headers)
    if (partitions >= 0).any():
        packed.partitions = partitions


_EMPTY_BYTES = np.zeros(0, np.uint8)
_EMPTY_INT64 = np.zeros(0, np.int64)


@njit(cache=True)
def partitions_for_keys(keys, key_offsets, key_lengths, partition_count, null_key_partition, out):
    """Kafka's default partitioner for every record at once: murmur2 of a key, or
    ``null_key_partition`` for a null key (length -1)."""
    for i in range(key_lengths.size):
        if key_lengths[i] < 0:
            out[i] = null_key_partition
        else:
            start = key_offsets[i]
            out[i] = partition_for_key(keys, start, start + key_lengths[i], partition_count)
    return out


def choose_partitions(packed: _Packed, partition_count: int, sticky: int) -> np.ndarray:
    """Partition of each record: explicit, else murmur2(key), else the drain's sticky one."""
    if packed.keys is None:
        partitions = np.full(packed.count, sticky, np.int64)
    else:
        partitions = partitions_for_keys(packed.keys, packed.key_offsets, packed.key_lengths,
                                         partition_count, sticky, np.empty(packed.count, np.int64))
    if packed.partitions is not None:
        explicit = packed.partitions >= 0
        partitions[explicit] = packed.partitions[explicit]
    return partitions


def split_batches(partitions: np.ndarray, sizes: np.ndarray, keep: np.ndarray | None,
                  batch_bytes: int) -> list[tuple[int, np.ndarray]]:
    """(partition, record indices in send order) per batch: records grouped by partition,
    each group cut into runs of about ``batch_bytes`` (a larger record is a batch alone)."""
    rows = np.arange(partitions.size) if keep is None else np.flatnonzero(keep)
    if rows.size == 0:
        return []
    parts = partitions[rows]
    if parts.size and parts.min() == parts.max():
        groups = [rows]
    else:
        order = np.argsort(parts, kind="stable")
        rows = rows[order]
        groups = np.split(rows, np.flatnonzero(np.diff(parts[order])) + 1)
    batches = []
    for group in groups:
        partition = int(partitions[group[0]])
        ends = np.cumsum(sizes[group])
        chunk = (ends - sizes[group]) // batch_bytes  # the batch_bytes window each record starts in
        if chunk[-1] == 0 and group.size <= RECORDS_PER_BATCH_MAX:
            batches.append((partition, group))
            continue
        chunk = np.maximum(chunk, np.arange(group.size) // RECORDS_PER_BATCH_MAX)
        for piece in np.split(group, np.flatnonzero(np.diff(chunk)) + 1):
            batches.append((partition, piece))
    return batches


def encode_batch_rows(packed: _Packed, rows: np.ndarray, producer_id: int, base_sequence: int) -> np.ndarray:
    """One RecordBatch (base offset 0) of records ``rows``, via the numba encoder."""
    all_rows = rows.size == packed.count
    pick = (lambda a: a) if all_rows else (lambda a: a[rows])
    value_lengths = pick(packed.value_lengths)
    if packed.keys is None:
        keys, key_offsets = _EMPTY_BYTES, np.zeros(rows.size, np.int64)
        key_lengths = np.full(rows.size, -1, np.int64)
    else:
        keys, key_offsets, key_lengths = packed.keys, pick(packed.key_offsets), pick(packed.key_lengths)
    if packed.headers is None:
        headers, header_offsets, header_lengths = _EMPTY_BYTES, _EMPTY_INT64, _EMPTY_INT64
    else:
        headers = packed.headers
        header_offsets, header_lengths = pick(packed.header_offsets), pick(packed.header_lengths)
    out = np.empty(kernels.encoded_size_upper_bound(value_lengths, key_lengths, header_lengths), np.uint8)
    epoch = 0 if producer_id >= 0 else -1
    end = kernels.encode_records(packed.values, pick(packed.value_offsets), value_lengths, keys,
                                 key_offsets, key_lengths, pick(packed.timestamps_ms), headers,
                                 header_offsets, header_lengths, 0, producer_id, epoch,
                                 base_sequence, -1, out, 0)
    if end < 0:  # inputs were checked when packing: this is a bug, not bad user input
        raise AssertionError(f"encode_records failed with {end} on packed records")
    return out[:end]


def restamp(payload: np.ndarray, producer_id: int) -> None:
    """Give an encoded batch another producer id (in place), CRC recomputed."""
    from ingest.shards import layout

    head = payload[:layout.RECORD_BATCH_OVERHEAD].view()
    head[layout.PRODUCER_ID_OFFSET:layout.PRODUCER_ID_OFFSET + 8] = np.frombuffer(
        producer_id.to_bytes(8, "big"), np.uint8)
    crc = kernels.crc32c(payload, layout.ATTRIBUTES_OFFSET, payload.size, 0)
    head[layout.CRC_OFFSET:layout.CRC_OFFSET + 4] = np.frombuffer(int(crc).to_bytes(4, "big"), np.uint8)


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
                 bootstrap_timeout_ms: int = BOOTSTRAP_TIMEOUT_MS) -> None:
        import zmq

        from ingest.net.sender import Sender

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
        self._unfinished: set[_Batch] = set()  # submitted, not yet acked or failed
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
                acc.drain = _Drain()
                acc.deadline_s = _NEVER
            try:
                packed = pack_records(values, keys, timestamps, extras, time.time_ns() // 1_000_000)
                self._encode_and_submit(acc, packed, drain)
            except BaseException as error:  # the drain's futures must learn of it
                if not drain.drained.is_set():
                    drain.fail(error, records)
                raise
            return True
        finally:
            self._drain_lock.release()

    def _encode_and_submit(self, acc: _Accumulator, packed: _Packed, drain: _Drain) -> None:
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
            batches.append(_Batch(acc.topic, partition, payload, rows.size, self.producer_id,
                                  base_sequence, deadline_s))
        if packed.count > 1:  # size the next accumulator from what these records weighed
            acc.records_max = int(min(RECORDS_PER_BATCH_MAX,
                                      max(1, self.batch_bytes * packed.count // max(1, int(sizes.sum())))))
        drain.assign(batches, record_batch, record_position, packed.bad)
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
            if acc.deadline_s <= now_s and not self._drain(acc, blocking=False):
                next_s = now_s  # another thread is draining: look again soon
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

    def release(self, batch: _Batch) -> None:
        """A batch is done (acked or failed): its bytes leave the buffer (I/O thread)."""
        with self._space:
            self._buffered_bytes -= batch.size_bytes
            self._unfinished.discard(batch)
            self._space.notify_all()

    # ---- send_batch, flush, close ------------------------------------------------------

    def send_batch(self, topic: str, values, keys=None, timestamps_ms=None) -> BatchFuture:
        """Queue many records in one call; returns one BatchFuture.

        ``values``: a sequence of bytes-like, or a numpy array whose rows (2-D) or elements
        (1-D, e.g. a structured array of readings) are the values, with no per-record
        Python object. ``keys``: None (all null), or the same forms. ``timestamps_ms``:
        None (now), one int for all, or one per record. Records already queued with
        send() for this topic go first, so per-partition order follows call order.
        """
        acc = self._accumulator(topic)
        packed = pack_columns(values, keys, timestamps_ms, time.time_ns() // 1_000_000)
        drain = _Drain()
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
            self.bootstrap.close()
            self.context.term()
            with self._space:
                self._space.notify_all()


def _check_range(name: str, value, low, high) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} {value!r} must be a number in {low}..{high}")


# ---------------------------------------------------------------------------------------
# send_batch input


def _column(data, what: str, count: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, offsets, lengths) from a sequence of bytes-like or a numpy array of rows."""
    if isinstance(data, np.ndarray):
        if data.ndim == 0 or data.ndim > 2:
            raise ValueError(f"{what} array must have one or two dimensions, not {data.ndim}")
        rows = data.shape[0]
        row_bytes = data.itemsize * (data.shape[1] if data.ndim == 2 else 1)
        buffer = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        offsets = np.arange(rows, dtype=np.int64) * row_bytes
        lengths = np.full(rows, row_bytes, np.int64)
    else:
        data = list(data)
        try:
            buffer, offsets, lengths = _pack_bytes(data)
        except (TypeError, ValueError):
            bad: dict = {}
            buffer, offsets, lengths = _pack_nullable(data, what, bad)
            if bad:
                raise next(iter(bad.values()))
    if count is not None and lengths.size != count:
        raise ValueError(f"{lengths.size} {what}s for {count} values")
    return buffer, offsets, lengths


def pack_columns(values, keys, timestamps_ms, now_ms: int) -> _Packed:
    """send_batch()'s input as packed columns; ValueError/TypeError for unusable input."""
    buffer, offsets, lengths = _column(values, "value", None)
    packed = _Packed(lengths.size)
    packed.values, packed.value_offsets, packed.value_lengths = buffer, offsets, lengths
    if keys is not None:
        packed.keys, packed.key_offsets, packed.key_lengths = _column(keys, "key", packed.count)
    if timestamps_ms is None:
        packed.timestamps_ms = np.full(packed.count, now_ms, np.int64)
    elif isinstance(timestamps_ms, (int, np.integer)):
        packed.timestamps_ms = np.full(packed.count, int(timestamps_ms), np.int64)
    else:
        packed.timestamps_ms = np.ascontiguousarray(timestamps_ms, dtype=np.int64)
        if packed.timestamps_ms.shape != (packed.count,):
            raise ValueError(f"{packed.timestamps_ms.size} timestamps for {packed.count} values")
    if packed.count and int(packed.timestamps_ms.min()) < 0:
        raise ValueError("timestamps_ms must be >= 0")
    return packed
