"""The consumer: read a topic's records by offset; resume from a group's committed offsets.

    with Consumer("tcp://127.0.0.1:7400", "sensors", group="dashboard") as consumer:
        for record in consumer.records(idle_timeout_ms=1000):   # Record namedtuples
            handle(record.value)
        consumer.commit()                                         # resume here next time

    while (chunk := consumer.poll_batch()) is not None:          # bulk: no per-record objects
        total += chunk.value_lengths.sum()

Each partition has one FETCH long poll in flight to its owner worker (at most
CHUNKS_BUFFERED_MAX fetched chunks waiting), so the network overlaps the caller's work. A
fetched chunk is decoded by one numba kernel into columns (offsets, timestamps, positions
and lengths of keys and values in the fetched bytes); iterating builds one Record per
record from them, poll_batch() hands out the columns themselves.

A group here names a set of committed offsets, stored by the workers (OFFSET_COMMIT /
OFFSET_FETCH); it does not split partitions between members: give each member its
``partitions``. Without a committed offset a partition starts at its log start
(``from_beginning``) or its log end. A consumer is not thread-safe: use it from one thread.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Any, Callable, NamedTuple

import numpy as np
import zmq

from ingest.net import wire
from ingest.security import ClientCurve
from ingest.net.client import (
    METADATA_REFRESH_MIN_INTERVAL_MS,
    RETRIABLE,
    RETRY_BACKOFF_FIRST_MS,
    RETRY_BACKOFF_MAX_MS,
    BOOTSTRAP_TIMEOUT_MS,
    DEFAULT_BOOTSTRAP,
    BootstrapClient,
    Metadata,
    UnreachableError,
    WorkerLink,
)
from ingest.net.errors import ErrorCode, IngestError
from ingest.shards import batch as batch_codec

# Long poll: a fetch at the log end waits this long for new records before it returns
# empty; short enough that a consumer notices close() or a seek promptly.
MAX_WAIT_MS_DEFAULT = 500
# Bytes per fetch: ~10,000 readings of 100 B, decoded in one kernel call.
MAX_BYTES_DEFAULT = 1 << 20
# Fetched chunks waiting to be consumed per partition: one being read, one arriving.
CHUNKS_BUFFERED_MAX = 2
REQUEST_TIMEOUT_MS_DEFAULT = 30_000
POLL_BATCH_TIMEOUT_MS_DEFAULT = 1_000


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class ColumnChunk(batch_codec.RowFields):
    """Records fetched from one partition as parallel arrays over one buffer.

    Record i's value is ``buffer[value_offsets[i]:][:value_lengths[i]]`` (length -1: null),
    likewise its key; ``header_lengths[i]`` 0 means no headers. Offsets ascend.
    """

    topic: str
    partition: int
    high_watermark: int  # offset after the last record stored when the chunk was fetched
    raw: bytes           # the fetched bytes; ``buffer`` is a uint8 view of them
    buffer: np.ndarray
    offsets: np.ndarray
    timestamps_ms: np.ndarray
    key_offsets: np.ndarray
    key_lengths: np.ndarray
    value_offsets: np.ndarray
    value_lengths: np.ndarray
    header_offsets: np.ndarray
    header_lengths: np.ndarray

    def __len__(self) -> int:
        return self.offsets.size

    def _row_source(self) -> bytes:
        return self.raw

    def values(self) -> list[bytes | None]:
        raw = self.raw
        return [None if n < 0 else raw[o:o + n]
                for o, n in zip(self.value_offsets.tolist(), self.value_lengths.tolist())]

    def records(self, start: int = 0) -> Iterator[Record]:
        """Record objects from row ``start`` on (the slow path: one object per record)."""
        return self._records(iter(self.offsets[start:].tolist()), start)

    def _records(self, offsets: Iterator[int], start: int) -> Iterator[Record]:
        """Records from row ``start`` on, ``offsets`` being the iterator over their offsets.

        Made lazily by C-level iterators (zip, map, one slice per key and value): no Python
        code runs per record, and the records are not kept, so the garbage collector never
        sees more than one of them at a time. The caller may read how many were made off
        ``offsets`` (operator.length_hint), or end the iteration by clearing its list."""
        raw = self.raw
        keys = _fields(raw, self.key_offsets[start:], self.key_lengths[start:])
        values = _fields(raw, self.value_offsets[start:], self.value_lengths[start:])
        if self.header_lengths[start:].any():
            headers = [self.headers(i) if n else () for i, n in
                       enumerate(self.header_lengths[start:].tolist(), start)]
        else:
            headers = repeat(())
        # zip takes from its iterators in order: ``offsets`` is taken from only once the
        # topic and partition were, so it has given exactly one offset per record made.
        rows = zip(repeat(self.topic), repeat(self.partition), offsets,
                   self.timestamps_ms[start:].tolist(), keys, values, headers)
        return map(_new_record, rows)

    def tail(self, start: int) -> ColumnChunk:
        """The rows from ``start`` on, same buffer."""
        if start == 0:
            return self
        cut = [getattr(self, name)[start:] for name in _ROW_FIELDS]
        return ColumnChunk(self.topic, self.partition, self.high_watermark, self.raw, self.buffer, *cut)


# Record(...) would run namedtuple's Python-level __new__; this makes the same tuple in C.
_new_record = partial(tuple.__new__, Record)


def _fields(raw: bytes, offsets: np.ndarray, lengths: np.ndarray) -> list[bytes | None]:
    """raw[offsets[i]:][:lengths[i]] for every i, None where the length is -1."""
    if not lengths.size or int(lengths.min()) >= 0:
        return [raw[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]
    return [None if n < 0 else raw[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]


_ROW_FIELDS = ("offsets", "timestamps_ms", "key_offsets", "key_lengths", "value_offsets",
               "value_lengths", "header_offsets", "header_lengths")


def decode_chunk(topic: str, partition: int, high_watermark: int, raw: bytes,
                 from_offset: int) -> ColumnChunk:
    """The records of fetched bytes at offsets >= ``from_offset`` (a fetch starts at the
    batch holding the offset asked for), as columns; a partial batch at the end is left
    out, compressed batches are decompressed."""
    try:
        columns = batch_codec.decode_columns(raw)
    except batch_codec.UnsupportedCompressionError:
        raw = _decompressed(raw)
        columns = batch_codec.decode_columns(raw)
    start = int(np.searchsorted(columns.offsets, from_offset))
    rows = [getattr(columns, name)[start:] for name in _ROW_FIELDS]
    return ColumnChunk(topic, partition, high_watermark, raw, columns.buffer, *rows)


def _decompressed(raw: bytes) -> bytes:
    """The same batches with compressed ones re-encoded uncompressed (their offsets kept),
    so that one columns kernel reads them all. Rare: the SDK never compresses."""
    out = []
    for pos, header in batch_codec.iter_batches(raw):
        if header.compression_codec == batch_codec.CODEC_NONE:
            out.append(raw[pos:pos + header.size_bytes])
        else:
            _, records = batch_codec.decode_batch(raw, pos)
            out.append(batch_codec.encode_batch(records, base_offset=header.base_offset))
    return b"".join(out)


# ---------------------------------------------------------------------------------------


class _Cursor:
    """Where one partition is: ``position`` = next offset to hand out (consumed below it),
    ``fetch_offset`` = next offset to fetch. ``epoch`` changes on every seek, so that
    replies and chunks from before it are dropped."""

    __slots__ = ("partition", "position", "fetch_offset", "fetching", "buffered", "epoch",
                 "retry_at_s", "backoff_ms", "high_watermark", "resetting")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.position = -1
        self.fetch_offset = -1
        self.fetching = False
        self.buffered = 0
        self.epoch = 0
        self.retry_at_s = 0.0
        self.backoff_ms = RETRY_BACKOFF_FIRST_MS
        self.high_watermark = -1
        self.resetting = False


class _Reading:
    """The chunk ``records()`` is handing out, from row ``start`` on.

    Each record handed out counts as consumed, but no Python code runs per record to say
    so: ``settle()`` reads how many were made off the offsets' list iterator and moves the
    cursor's position past the last one. Whatever reads or moves a position settles (or
    stops) the reading first. ``stop()`` ends the iteration where it is (the list it reads
    offsets from is cleared, so the lazy records end there)."""

    __slots__ = ("cursor", "epoch", "chunk", "start", "offsets", "remaining", "records")

    def __init__(self, cursor: _Cursor, epoch: int, chunk: ColumnChunk, start: int) -> None:
        self.cursor = cursor
        self.epoch = epoch
        self.chunk = chunk
        self.start = start
        self.offsets = chunk.offsets[start:].tolist()
        self.remaining = iter(self.offsets)
        self.records = chunk._records(self.remaining, start)

    def consumed(self) -> int:
        """Records handed out so far."""
        return len(self.offsets) - operator.length_hint(self.remaining)

    def settle(self) -> None:
        consumed = self.consumed()
        if consumed and self.cursor.epoch == self.epoch:
            self.cursor.position = self.offsets[consumed - 1] + 1

    def stop(self) -> int:
        """End the iteration here; returns the chunk's first row not handed out."""
        consumed = self.consumed()
        self.settle()
        self.offsets.clear()
        return self.start + consumed


class _Request:
    __slots__ = ("worker", "message", "on_reply", "deadline_ms", "sent_s", "reply", "done")

    def __init__(self, worker: int, message, on_reply: Callable[[Any], None] | None,
                 deadline_ms: int) -> None:
        self.worker = worker
        self.message = message
        self.on_reply = on_reply
        self.deadline_ms = deadline_ms  # how long the worker may take to answer
        self.sent_s = 0.0
        self.reply = None
        self.done = False


class Consumer:
    """Reads ``topic`` (all partitions, or ``partitions``) from an ingest appliance."""

    def __init__(self, bootstrap: str = DEFAULT_BOOTSTRAP, topic: str | None = None,
                 group: str | None = None, from_beginning: bool = False,
                 partitions=None, *, max_wait_ms: int = MAX_WAIT_MS_DEFAULT,
                 max_bytes: int = MAX_BYTES_DEFAULT,
                 request_timeout_ms: int = REQUEST_TIMEOUT_MS_DEFAULT,
                 bootstrap_timeout_ms: int = BOOTSTRAP_TIMEOUT_MS, curve: ClientCurve | None = None) -> None:
        if topic is None:
            raise ValueError("Consumer needs a topic")
        if not 0 <= max_wait_ms <= wire.MAX_FETCH_WAIT_MS:
            raise ValueError(f"max_wait_ms {max_wait_ms} must be in 0..{wire.MAX_FETCH_WAIT_MS}")
        if not 1 <= max_bytes <= wire.MAX_FETCH_BYTES:
            raise ValueError(f"max_bytes {max_bytes} must be in 1..{wire.MAX_FETCH_BYTES}")
        self.topic = topic
        self.group = group
        self.from_beginning = from_beginning
        self.max_wait_ms = max_wait_ms
        self.max_bytes = max_bytes
        self.request_timeout_ms = request_timeout_ms
        self._context = zmq.Context()
        if curve is not None:  # every socket of this consumer is a CURVE client
            curve.apply(self._context)
        self._bootstrap = BootstrapClient(bootstrap, bootstrap_timeout_ms, self._context)
        self._links: dict[int, WorkerLink] = {}
        self._outbox: deque[_Request] = deque()
        self._ready: deque[tuple[_Cursor, int, ColumnChunk]] = deque()
        self._current: _Reading | None = None  # the chunk records() is in
        self._error: IngestError | None = None
        self._refreshed_s = 0.0
        try:
            self._metadata = self._metadata_with_topic(topic)
            count = self._metadata.topics[topic]
            chosen = range(count) if partitions is None else list(partitions)
            for p in chosen:
                if type(p) is not int or not 0 <= p < count:
                    raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                      f"partition {p!r} of {topic!r}: it has partitions 0..{count - 1}")
            self._cursors = {p: _Cursor(p) for p in chosen}
            self._resolve_positions()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    # ---- start-up ----------------------------------------------------------------------

    def _metadata_with_topic(self, topic: str) -> Metadata:
        metadata = Metadata.parse(self._bootstrap.metadata())
        if topic in metadata.topics:
            return metadata
        if not metadata.auto_create_topics:
            raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"topic {topic!r} does not exist")
        return Metadata.parse(self._bootstrap.create_topic(topic))

    def _by_worker(self, partitions) -> dict[int, list[int]]:
        owners: dict[int, list[int]] = {}
        for p in partitions:
            owners.setdefault(self._metadata.owner(p), []).append(p)
        return owners

    def _resolve_positions(self) -> None:
        """Committed offsets of the group, else log start or end, for every partition."""
        if self.group is not None:
            requests = [self._request(w, wire.OffsetFetchRequest(self.group, self.topic, tuple(ps)))
                        for w, ps in self._by_worker(self._cursors).items()]
            for reply in self._wait(requests):
                for partition, offset in reply.offsets:
                    if partition in self._cursors and offset >= 0:
                        self._set_position(self._cursors[partition], offset)
        where = wire.EARLIEST_TIMESTAMP if self.from_beginning else wire.LATEST_TIMESTAMP
        pending = [c for c in self._cursors.values() if c.position < 0]
        requests = [self._request(self._metadata.owner(c.partition),
                                  wire.ListOffsetsRequest(self.topic, c.partition, where)) for c in pending]
        for cursor, reply in zip(pending, self._wait(requests)):
            self._set_position(cursor, reply.offset)

    def _set_position(self, cursor: _Cursor, offset: int) -> None:
        if self._current is not None and self._current.cursor is cursor:
            self._current.stop()  # the rest of that chunk is not to be handed out
            self._current = None
        cursor.position = cursor.fetch_offset = offset
        cursor.epoch += 1
        cursor.buffered = 0
        cursor.fetching = False
        cursor.resetting = False
        cursor.retry_at_s = 0.0

    # ---- reading -----------------------------------------------------------------------

    def records(self, idle_timeout_ms: int = 0) -> Iterator[Record]:
        """Yield records as they arrive; each one yielded counts as consumed (commit()
        stores the offset after it). ``idle_timeout_ms`` > 0: stop after that long without
        a record; 0: never stop."""
        idle_s = idle_timeout_ms / 1000 if idle_timeout_ms else None
        last_s = time.monotonic()
        while True:
            if self._current is None:
                wait_s = 0.1 if idle_s is None else max(0.0, idle_s - (time.monotonic() - last_s))
                found = self._next_chunk(wait_s)
                if found is None:
                    if idle_s is not None and time.monotonic() - last_s >= idle_s:
                        return
                    continue
                self._current = _Reading(*found, 0)
            reading = self._current
            yield from reading.records  # ends early if seek() or poll_batch() stop the reading
            if self._current is reading:
                reading.settle()
                self._current = None
            last_s = time.monotonic()

    def poll_batch(self, timeout_ms: int = POLL_BATCH_TIMEOUT_MS_DEFAULT) -> ColumnChunk | None:
        """The next fetched chunk of records as columns (all consumed once returned), or
        None if nothing arrived within ``timeout_ms``."""
        reading = self._current
        if reading is not None:
            self._current = None
            row = reading.stop()
            if reading.cursor.epoch == reading.epoch and row < len(reading.chunk):
                return self._consume(reading.cursor, reading.chunk.tail(row))
        found = self._next_chunk(timeout_ms / 1000)
        if found is None:
            return None
        return self._consume(found[0], found[2])

    @staticmethod
    def _consume(cursor: _Cursor, chunk: ColumnChunk) -> ColumnChunk:
        cursor.position = int(chunk.offsets[-1]) + 1
        return chunk

    def _next_chunk(self, timeout_s: float) -> tuple[_Cursor, int, ColumnChunk] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            while self._ready:
                cursor, epoch, chunk = self._ready.popleft()
                if cursor.epoch == epoch:
                    cursor.buffered -= 1
                    return cursor, epoch, chunk
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(remaining)

    # ---- positions and offsets ---------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        return list(self._cursors)

    def position(self, partition: int) -> int:
        """The next offset this consumer hands out for ``partition``."""
        self._settle()
        return self._cursor(partition).position

    def high_watermark(self, partition: int) -> int:
        """Offset after the last stored record, as of the last fetch (-1: not fetched)."""
        return self._cursor(partition).high_watermark

    def seek(self, partition: int, offset: int) -> None:
        """Continue ``partition`` from ``offset`` (out of range: from the log start)."""
        if type(offset) is not int or offset < 0:
            raise ValueError(f"offset {offset!r} must be an int >= 0")
        self._set_position(self._cursor(partition), offset)

    def commit(self) -> None:
        """Store the group's next offsets (each partition's position); returns once the
        workers have them on disk."""
        if self.group is None:
            raise ValueError("commit() needs a consumer group: Consumer(..., group='name')")
        self._settle()
        requests = []
        for worker, ps in self._by_worker(self._cursors).items():
            offsets = tuple((p, self._cursors[p].position) for p in ps if self._cursors[p].position >= 0)
            if offsets:
                requests.append(self._request(worker, wire.OffsetCommitRequest(self.group, self.topic, offsets)))
        self._wait(requests)

    def end_offsets(self) -> dict[int, int]:
        """{partition: log end offset} now (LIST_OFFSETS): the offset the next record
        stored will get; lag = end offset - position."""
        partitions = list(self._cursors)
        requests = [self._request(self._metadata.owner(p),
                                  wire.ListOffsetsRequest(self.topic, p, wire.LATEST_TIMESTAMP))
                    for p in partitions]
        return {p: reply.offset for p, reply in zip(partitions, self._wait(requests))}

    def committed(self) -> dict[int, int]:
        """The group's committed offsets ({partition: offset}, -1 if none)."""
        if self.group is None:
            raise ValueError("committed() needs a consumer group")
        requests = [self._request(w, wire.OffsetFetchRequest(self.group, self.topic, tuple(ps)))
                    for w, ps in self._by_worker(self._cursors).items()]
        return {p: o for reply in self._wait(requests) for p, o in reply.offsets}

    def _settle(self) -> None:
        """Positions up to date with the records handed out so far."""
        if self._current is not None:
            self._current.settle()

    def _cursor(self, partition: int) -> _Cursor:
        cursor = self._cursors.get(partition)
        if cursor is None:
            raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                              f"partition {partition!r} is not read by this consumer ({self.partitions})")
        return cursor

    # ---- requests ----------------------------------------------------------------------

    def _request(self, worker: int, message, on_reply=None, deadline_ms: int | None = None) -> _Request:
        request = _Request(worker, message, on_reply, deadline_ms or self.request_timeout_ms)
        self._outbox.append(request)
        return request

    def _wait(self, requests: list[_Request]) -> list:
        """Replies of ``requests`` in order; raises the first error reply."""
        deadline = time.monotonic() + self.request_timeout_ms / 1000
        while not all(r.done for r in requests):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                worker = next(r.worker for r in requests if not r.done)
                raise UnreachableError(self._metadata.routers[worker], self.request_timeout_ms)
            self._pump(remaining)
        for r in requests:
            if isinstance(r.reply, wire.ErrorReply):
                raise r.reply.exception()
        return [r.reply for r in requests]

    def _pump(self, timeout_s: float) -> None:
        """One turn: send what can be sent, wait up to ``timeout_s`` for replies, handle
        them."""
        now = time.monotonic()
        self._issue_fetches(now)
        self._flush_outbox(now)
        poller = zmq.Poller()
        for link in self._links.values():
            poller.register(link.socket, zmq.POLLIN | (zmq.POLLOUT if link.blocked else 0))
            poller.register(link.monitor, zmq.POLLIN)
        wake_s = min([timeout_s] + [c.retry_at_s - now for c in self._cursors.values()
                                    if c.retry_at_s > now and not c.fetching])
        events = dict(poller.poll(max(0, int(wake_s * 1000))))
        for link in list(self._links.values()):
            flags = events.get(link.socket, 0)
            if flags & zmq.POLLOUT:
                link.blocked = False
            if flags & zmq.POLLIN:  # replies that arrived before a drop still count
                for request, reply in list(link.replies()):
                    request.reply, request.done = reply, True
                    if request.on_reply is not None:
                        request.on_reply(reply)
            if events.get(link.monitor) and link.lost():
                self._outbox.extendleft(reversed(link.reset()))
        self._expire(time.monotonic())

    def _flush_outbox(self, now: float) -> None:
        unsent = deque()
        while self._outbox:
            request = self._outbox.popleft()
            link = self._link(request.worker)
            correlation_id = link.correlation_id()
            frame = _with_correlation_id(request.message, correlation_id)
            if link.send(correlation_id, frame, request):
                request.sent_s = now
            else:
                unsent.append(request)
        self._outbox = unsent

    def _expire(self, now: float) -> None:
        for link in list(self._links.values()):
            if any(now - r.sent_s > r.deadline_ms / 1000 for r in link.inflight.values()):
                self._outbox.extendleft(reversed(link.reset()))

    def _link(self, worker: int) -> WorkerLink:
        link = self._links.get(worker)
        if link is None:
            link = self._links[worker] = WorkerLink(self._context, worker, self._metadata.routers[worker])
        return link

    # ---- fetching ----------------------------------------------------------------------

    def _issue_fetches(self, now: float) -> None:
        for cursor in self._cursors.values():
            if (cursor.fetching or cursor.resetting or cursor.fetch_offset < 0
                    or cursor.buffered >= CHUNKS_BUFFERED_MAX or cursor.retry_at_s > now):
                continue
            message = wire.FetchRequest(self.topic, cursor.partition, cursor.fetch_offset,
                                        self.max_bytes, self.max_wait_ms, 1)
            epoch, offset = cursor.epoch, cursor.fetch_offset
            cursor.fetching = True
            self._request(self._metadata.owner(cursor.partition), message,
                          lambda reply, c=cursor, e=epoch, o=offset: self._on_fetch(c, e, o, reply),
                          self.request_timeout_ms + self.max_wait_ms)

    def _on_fetch(self, cursor: _Cursor, epoch: int, offset: int, reply) -> None:
        if cursor.epoch != epoch:
            return  # seek() moved the partition since this fetch was sent
        cursor.fetching = False
        if isinstance(reply, wire.ErrorReply):
            self._on_fetch_error(cursor, reply.exception())
            return
        cursor.backoff_ms = RETRY_BACKOFF_FIRST_MS
        cursor.high_watermark = reply.high_watermark
        if not len(reply.records):
            return
        try:
            chunk = decode_chunk(self.topic, cursor.partition, reply.high_watermark,
                                 bytes(reply.records), offset)
        except (batch_codec.CorruptBatchError, batch_codec.UnsupportedCompressionError) as error:
            self._error = IngestError(ErrorCode.CORRUPT_MESSAGE,
                                      f"fetched data of {self.topic}-{cursor.partition} at {offset}: {error}",
                                      cursor.partition)
            cursor.retry_at_s = time.monotonic() + RETRY_BACKOFF_MAX_MS / 1000
            return
        if len(chunk):
            cursor.fetch_offset = int(chunk.offsets[-1]) + 1
            cursor.buffered += 1
            self._ready.append((cursor, epoch, chunk))

    def _on_fetch_error(self, cursor: _Cursor, error: IngestError) -> None:
        if error.code == ErrorCode.OFFSET_OUT_OF_RANGE:
            # Retention deleted what this position pointed at (or it is past the end):
            # continue from the earliest record still stored.
            cursor.resetting = True
            epoch = cursor.epoch
            self._request(self._metadata.owner(cursor.partition),
                          wire.ListOffsetsRequest(self.topic, cursor.partition, wire.EARLIEST_TIMESTAMP),
                          lambda reply, c=cursor, e=epoch: self._on_reset(c, e, reply))
        elif error.code in RETRIABLE:
            if error.code in (ErrorCode.NOT_OWNER, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, ErrorCode.NOT_LEADER,
                              ErrorCode.FENCED_LEADER_EPOCH):
                self._refresh_metadata()
            cursor.retry_at_s = time.monotonic() + cursor.backoff_ms / 1000
            cursor.backoff_ms = min(2 * cursor.backoff_ms, RETRY_BACKOFF_MAX_MS)
        else:
            self._error = error
            cursor.retry_at_s = time.monotonic() + RETRY_BACKOFF_MAX_MS / 1000

    def _refresh_metadata(self) -> None:
        """Ask the bootstrap again (at most every METADATA_REFRESH_MIN_INTERVAL_MS); links
        whose worker moved to another endpoint reconnect there."""
        now = time.monotonic()
        if now - self._refreshed_s < METADATA_REFRESH_MIN_INTERVAL_MS / 1000:
            return
        self._refreshed_s = now
        try:
            metadata = Metadata.parse(self._bootstrap.metadata())
        except IngestError:
            return  # the supervisor is away too: keep the endpoints we have
        if metadata.worker_count != self._metadata.worker_count:
            self._error = IngestError(ErrorCode.NOT_OWNER, "the appliance's worker count changed: "
                                      "create a new Consumer")
            return
        for worker, link in self._links.items():
            if metadata.routers[worker] != link.endpoint:
                self._outbox.extendleft(reversed(link.reset(metadata.routers[worker])))
        self._metadata = metadata

    def _on_reset(self, cursor: _Cursor, epoch: int, reply) -> None:
        if cursor.epoch != epoch:
            return
        if isinstance(reply, wire.ListOffsetsReply):
            self._set_position(cursor, reply.offset)
        else:
            cursor.resetting = False
            self._on_fetch_error(cursor, reply.exception())

    def close(self) -> None:
        """Close every socket. Offsets are not committed: call commit() first."""
        for link in self._links.values():
            link.close()
        self._links = {}
        if self._bootstrap is not None:
            self._bootstrap.close()
            self._bootstrap = None
        if not self._context.closed:
            self._context.term()


def _with_correlation_id(message, correlation_id: int) -> bytes:
    return dataclasses.replace(message, correlation_id=correlation_id).encode()
