"""Futures of the producer: what send() and send_batch() return, and the batches behind them.

A drain (the records of one topic encoded together) becomes a few ``Batch`` objects, one
per partition run; every record's ``RecordFuture`` points at its drain and its index in
it, and resolves when its own batch does. Batches are resolved by the I/O thread only.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ingest.net.errors import ErrorCode, IngestError


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


class Batch:
    """One encoded RecordBatch for one partition, as the I/O thread sends it."""

    __slots__ = ("topic", "partition", "payload", "records", "size_bytes", "producer_id",
                 "base_sequence", "drain_sequence", "deadline_s", "done", "base_offset", "durability", "error",
                 "correlation_id", "link", "sent_s")

    def __init__(self, topic: str, partition: int, payload: np.ndarray, records: int,
                 producer_id: int, base_sequence: int, deadline_s: float) -> None:
        self.topic = topic
        self.partition = partition
        self.payload = payload
        self.records = records
        self.size_bytes = payload.size
        self.producer_id = producer_id
        self.base_sequence = base_sequence  # as stamped in the payload now
        self.drain_sequence = base_sequence  # as numbered by the drain (see Sender._restamp)
        self.deadline_s = deadline_s
        self.done = threading.Event()
        self.base_offset = -1
        self.durability = 0  # wire.Durability the reply said the records reached
        self.error: BaseException | None = None
        self.correlation_id = 0
        self.link = None
        self.sent_s = 0.0


class Drain:
    """The shared state behind the futures of one drain: which batch and position each
    record went to. Filled when the drain is encoded; each batch resolves on its own."""

    __slots__ = ("drained", "batches", "record_batch", "record_position", "record_errors")

    def __init__(self) -> None:
        self.drained = threading.Event()
        self.batches: list[Batch] = []
        self.record_batch: np.ndarray | None = None
        self.record_position: np.ndarray | None = None
        self.record_errors: dict[int, BaseException] = {}

    def assign(self, batches: list[Batch], record_batch: np.ndarray,
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

    def batch_of(self, index: int, timeout: float | None) -> tuple[Batch, int]:
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

    def durability(self, timeout: float | None = None) -> int:
        """The wire.Durability the record reached (NONE with acks=0), once acked; at
        least the acks asked for. Raises like result()."""
        drain, index = self
        batch, _ = drain.batch_of(index, timeout)
        if batch.error is not None:
            raise batch.error
        return batch.durability

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

    def __init__(self, drain: Drain, records: int) -> None:
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
