"""Processors inside a worker: one task per (processor, source partition) it owns.

The rule that makes output exactly-once inside one appliance:
1. A processor of source partition p writes only to sink partition p. Source and sink
   have the same partition count, so the worker that owns one owns the other: reading,
   processing and appending happen in one thread of one process.
2. It reads only source records below the source log's flushed offset: input it has
   acted on never disappears in a crash, so a replay sees the same records.
3. The last sink batch written for a chunk carries the source position reached
   (ingest.streams.position) in a record header: output and position are one append,
   made durable by the same group commit.
4. On start a task reads its position from the tail of its sink partition: the newest
   batch carrying a position gives next_offset (where to go on), replay_offset and the
   stream time (to rebuild open windows by re-reading the source from the oldest open
   window's first record, emitting nothing), and the sink records after that batch (a
   chunk cut by the crash) are skipped by count when they are produced again: processors
   are deterministic and a chunk's outputs come out in the same order however the
   source is cut into chunks.
So a crash at any point neither loses nor duplicates a sink record.

Work is driven by the worker's group commit: a flushed source partition makes its tasks
due; a due task processes up to TURN_BYTES of source per loop turn, so a processor that
is far behind never holds up intake, acks or fsyncs for long.
"""

from __future__ import annotations

import logging

import numpy as np

from ingest.clock import mono_ms, now_ms
from ingest.errors import CorruptDataError, OffsetOutOfRangeError
from ingest.net.errors import ErrorCode, IngestError
from ingest.shards import batch as batch_codec
from ingest.shards.batch import UnsupportedCompressionError, encode_headers
from ingest.streams import position as position_mod
from ingest.streams import checkpoint, processors, window_kernel
from ingest.streams.api import Batch
from ingest.streams.position import Position
from ingest.streams.spec import ProcessorConfig

log = logging.getLogger("ingest.streams")

# Source bytes decoded per step: whole batches, enough to amortise a kernel call.
CHUNK_BYTES = 1 << 20
# Source bytes one task may process per loop turn before the loop serves sockets again.
TURN_BYTES = 4 << 20
# Sink batches are cut at about this size (well below max_batch_bytes).
SINK_BATCH_BYTES = 1 << 20
# How far back a task walks its sink's batches looking for its position.
POSITION_SCAN_BATCHES_MAX = 100_000
# After a failed sink append (disk full, I/O error) a task rebuilds itself after this.
RETRY_AFTER_MS = 1000


def find_position(sink_log, processor: str, saved: tuple[Position, int] | None = None) -> tuple[Position | None, int]:
    """(newest position of `processor`, sink records written after it): from the sink's
    newest positioned batch, or from `saved` (checkpoint.load) when that is newer."""
    found, batch_end = _sink_position(sink_log, processor)
    end = sink_log.log_end_offset
    if saved is not None:
        position, sink_end = saved
        newer = found is None or position.next_offset >= found.next_offset
        if batch_end <= sink_end <= end and newer:
            return position, end - sink_end
    return found, end - batch_end if found is not None else 0


def _sink_position(sink_log, processor: str) -> tuple[Position | None, int]:
    """(newest position in the sink's batches, offset just past the batch carrying it)."""
    end = sink_log.log_end_offset
    offset = end - 1
    for _ in range(POSITION_SCAN_BATCHES_MAX):
        if offset < sink_log.log_start_offset:
            break
        chunk = sink_log.read(offset, 1)
        header, records = batch_codec.decode_batch(chunk, 0)
        found = position_mod.decode(records[-1].headers) if records else None
        if found is not None and found.processor == processor:
            return found, header.last_offset + 1
        offset = header.base_offset - 1
    return None, 0


def _batch_from_records(records: list[batch_codec.Record]) -> Batch:
    """A Batch from decoded records (compressed source batches take this slower path)."""
    heads = [encode_headers(r.headers) if r.headers else b"" for r in records]
    parts = [batch_codec._pack([r.key for r in records]), batch_codec._pack([r.value for r in records]),
             batch_codec._pack(heads)]
    base = 0
    buffers, columns = [], []
    for buf, offsets, lengths in parts:
        buffers.append(buf)
        columns += [offsets + base, lengths]
        base += len(buf)
    buffer = np.frombuffer(b"".join(buffers) or b"\0", np.uint8)
    offsets = np.array([r.offset for r in records], np.int64)
    timestamps = np.array([r.timestamp_ms for r in records], np.int64)
    return Batch(buffer, offsets, timestamps, *columns)


class ProcessorTask:
    """One processor on one partition: position, state, and its source and sink logs."""

    def __init__(self, config: ProcessorConfig, source, sink, worker) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.worker = worker
        self.labels = {"processor": config.name, "partition": str(source.index)}
        self.processor: processors.Processor | None = None
        self.position = 0
        self.skip_outputs = 0
        self.replay: tuple[int, int] | None = None  # [from, to) still to re-read at open
        self.error: str | None = None
        self.retry_at_ms = 0
        self.checkpoint_at_ms = 0
        self.written_position = -1  # next_offset of the last position stored anywhere
        self.records_total = 0
        self.output_records_total = 0
        self.late_base = 0
        self.invalid_base = 0

    # ---- open: position and state from the sink -----------------------------------------

    def open(self) -> None:
        self.processor = processors.build(self.config)
        found, orphans = find_position(self.sink.log, self.config.name,
                                       checkpoint.load(self.sink.directory, self.config.name))
        if found is None:
            log_ = self.source.log
            self.position = log_.log_start_offset if self.config.start == "earliest" else log_.flushed_offset
            self.skip_outputs = 0
            how = f"new: starting at the {self.config.start} offset {self.position}"
        else:
            self.position = found.next_offset
            self.skip_outputs = orphans
            how = f"resuming at offset {found.next_offset}"
            if self.processor.stateful and found.replay_offset < found.next_offset:
                self.processor.restore(found.stream_time_ms)
                self._start_replay(found.replay_offset, found.next_offset)
                how += f" (windows rebuilt from offset {found.replay_offset})"
        log.info("processor %s on %s-%d: %s", self.config.name, self.source.topic, self.source.index, how)

    def _start_replay(self, start: int, end: int) -> None:
        """Re-read [start, end) to rebuild windows, in budgeted steps (see step)."""
        offset = max(start, self.source.log.log_start_offset)
        if offset > start:
            log.error("processor %s: offsets %d..%d were deleted by retention; their windows are incomplete",
                      self.config.name, start, offset - 1)
        self.replay = (offset, end) if offset < end else None

    def _replay_step(self, budget_bytes: int) -> int:
        """Rebuild windows from the source, emitting nothing; returns bytes read."""
        done = 0
        while self.replay is not None and done < budget_bytes:
            offset, end = self.replay
            batch, offset = self._read(offset, end)
            if batch is not None and len(batch):
                self.processor.process(batch, live=False)
                done += max(1, int(batch.value_lengths.clip(0).sum()))
            else:
                done += CHUNK_BYTES
            self.replay = (offset, end) if offset < end else None
        return done

    # ---- steps ---------------------------------------------------------------------------

    def behind(self) -> bool:
        return self.error is None and (self.replay is not None or self.position < self.source.log.flushed_offset)

    def step(self, budget_bytes: int) -> None:
        """Process flushed source records from the position on, up to about budget_bytes."""
        if self.error is not None or mono_ms() < self.retry_at_ms:
            return
        try:
            if self.processor is None:
                self.open()
            # A long replay (windows of hours) is spread over loop turns like live work, so
            # the worker keeps answering and heartbeating meanwhile.
            done = self._replay_step(budget_bytes)
            if self.replay is not None:
                return
            limit = self.source.log.flushed_offset
            while self.position < limit and done < budget_bytes:
                before = self.position
                batch, next_offset = self._read(self.position, limit)
                if batch is not None and len(batch):
                    emitted = self.processor.process(batch, live=True)
                    self.records_total += len(batch)
                    self._write(emitted, next_offset)
                self.position = next_offset
                done += CHUNK_BYTES if batch is None else max(1, int(batch.value_lengths.clip(0).sum()))
                assert self.position > before, (before, self.position)
            self._maybe_checkpoint()
        except IngestError as e:  # the sink refused the append: rebuild from what is on disk
            log.error("processor %s on partition %d: sink append failed (%s); retrying in %d ms",
                      self.config.name, self.source.index, e, RETRY_AFTER_MS)
            self._reset()
            self.retry_at_ms = mono_ms() + RETRY_AFTER_MS
        except processors.ProcessorError as e:
            self.error = str(e)
            log.error("processor %s on partition %d stopped at offset %d: %s",
                      self.config.name, self.source.index, self.position, e)

    def _maybe_checkpoint(self) -> None:
        """Save the position reached without output, at most every CHECKPOINT_INTERVAL_MS,
        once the sink is durable up to its end (the file promises what the sink holds)."""
        t = mono_ms()
        sink_log = self.sink.log
        if (self.position == self.written_position or self.skip_outputs or self.replay is not None
                or t < self.checkpoint_at_ms
                or sink_log.flushed_offset < sink_log.log_end_offset):
            return
        self.checkpoint_at_ms = t + checkpoint.CHECKPOINT_INTERVAL_MS
        position = Position(self.config.name, self.position, self.processor.replay_offset(self.position),
                            self.processor.stream_time_ms())
        try:
            checkpoint.save(self.sink.directory, position, sink_log.log_end_offset)
            self.written_position = self.position
        except OSError as e:  # a shortcut only: the sink's own positions stay right
            log.warning("processor %s: checkpoint not saved: %s", self.config.name, e)

    def _reset(self) -> None:
        self.replay = None
        if self.processor is not None:
            self.late_base += self.processor.late_records()
            self.invalid_base += self.processor.invalid_records
        self.processor = None

    def _read(self, offset: int, limit: int) -> tuple[Batch | None, int]:
        """(records in [offset, limit) of the batches from offset on, next offset)."""
        log_ = self.source.log
        try:
            chunk = log_.read(offset, CHUNK_BYTES)
        except CorruptDataError as e:
            log.error("processor %s skips corrupt source data: %s", self.config.name, e)
            return None, max(e.next_good_offset, offset + 1)
        except OffsetOutOfRangeError:
            log.error("processor %s: offset %d was deleted by retention; going on from %d",
                      self.config.name, offset, log_.log_start_offset)
            return None, log_.log_start_offset
        buf = np.frombuffer(chunk, np.uint8)
        pos, end_offset = 0, offset
        while pos + batch_codec.RECORD_BATCH_OVERHEAD <= buf.size:
            header = batch_codec.parse_header(buf, pos)
            if header.base_offset >= limit or pos + header.size_bytes > buf.size:
                break
            end_offset = header.last_offset + 1
            pos += header.size_bytes
        # The batch holding `offset` lies below limit (flushes end on batch boundaries).
        assert end_offset > offset, (offset, limit, len(chunk))
        try:
            cols = batch_codec.decode_columns(buf[:pos])
            batch = Batch(cols.buffer, cols.offsets, cols.timestamps_ms, cols.key_offsets, cols.key_lengths,
                          cols.value_offsets, cols.value_lengths, cols.header_offsets, cols.header_lengths)
        except UnsupportedCompressionError:
            records = []
            for at, _h in batch_codec.iter_batches(buf[:pos]):
                records += batch_codec.decode_batch(buf, at)[1]
            batch = _batch_from_records(records)
        keep = (batch.offsets >= offset) & (batch.offsets < limit)
        return (batch if keep.all() else batch.take(keep)), min(end_offset, limit)

    def _write(self, emitted: processors.Emitted, next_offset: int) -> None:
        """Append the chunk's outputs; its last sink batch carries the position reached."""
        if self.skip_outputs:
            skipped = min(self.skip_outputs, len(emitted))
            emitted = emitted.rows(skipped, len(emitted))
            self.skip_outputs -= skipped
        if not len(emitted):
            return
        position = Position(self.config.name, next_offset, self.processor.replay_offset(next_offset),
                            self.processor.stream_time_ms())
        # Sink batches of about SINK_BATCH_BYTES (64: a generous per-record overhead).
        group = (np.cumsum(emitted.row_bytes() + 64) - 1) // SINK_BATCH_BYTES
        bounds = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(emitted)]
        for lo, hi in zip(bounds, bounds[1:]):
            self._append(emitted.rows(lo, hi), position if hi == len(emitted) else None)
        self.output_records_total += len(emitted)
        self.written_position = next_offset

    def _append(self, rows: processors.Emitted, position: Position | None) -> None:
        n = len(rows)
        headers = (None, None, None)
        if position is not None:
            header = encode_headers(((position_mod.HEADER_KEY, position_mod.encode(position)),))
            lengths = np.zeros(n, np.int64)
            lengths[-1] = len(header)
            headers = (header, np.zeros(n, np.int64), lengths)
        data = batch_codec.encode_columns(rows.values_buf, rows.value_offsets, rows.value_lengths, rows.keys_buf,
                                          rows.key_offsets, rows.key_lengths, rows.timestamps_ms, 0, -1, -1, -1, -1,
                                          *headers)
        try:
            self.worker.append(self.sink, data, batch_codec.parse_header(data), now_ms())
        except IngestError as e:
            if e.code == ErrorCode.MESSAGE_TOO_LARGE:
                raise processors.ProcessorError(f"an output batch is too large for the sink: {e}") from e
            raise

    # ---- metrics ---------------------------------------------------------------------------

    def late_records(self) -> int:
        return self.late_base + (self.processor.late_records() if self.processor else 0)

    def invalid_records(self) -> int:
        return self.invalid_base + (self.processor.invalid_records if self.processor else 0)

    def lag_seconds(self, t_ms: int) -> float:
        """Age of the oldest source record not processed yet (0 when caught up)."""
        log_ = self.source.log
        if self.position >= log_.log_end_offset:
            return 0.0
        try:
            chunk = log_.read(max(self.position, log_.log_start_offset), 1)
        except (CorruptDataError, OffsetOutOfRangeError):
            return 0.0
        if len(chunk) < batch_codec.RECORD_BATCH_OVERHEAD:
            return 0.0
        return max(0.0, (t_ms - batch_codec.parse_header(chunk).base_timestamp_ms) / 1000)

    def status(self, t_ms: int) -> dict:
        return {"position": self.position, "lag_records": max(0, self.source.log.log_end_offset - self.position),
                "lag_seconds": self.lag_seconds(t_ms),
                "open_windows": self.processor.open_windows() if self.processor else 0,
                "failed": 1 if self.error else 0}


class StreamsRuntime:
    """The worker's processors: which tasks exist, which are due, their metrics."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.configs: tuple[ProcessorConfig, ...] = tuple(getattr(worker.config, "processors", ()))
        self.tasks: dict[tuple[str, int], ProcessorTask] = {}
        self.by_source: dict[object, list[ProcessorTask]] = {}
        self.due: set[ProcessorTask] = set()
        self._refused: set[str] = set()

    def warm_up(self) -> None:
        if self.configs:
            window_kernel.warm_up()

    def attach(self) -> None:
        """Create the tasks of every processor whose source and sink partitions are open here."""
        topics = self.worker.topics or {}
        for config in self.configs:
            source, sink = topics.get(config.source), topics.get(config.sink)
            if source is None or sink is None:
                continue
            if source["partitions"] != sink["partitions"]:
                if config.name not in self._refused:
                    self._refused.add(config.name)
                    log.error("processor %s: sink %s has %d partitions, source %s has %d; not started",
                              config.name, config.sink, sink["partitions"], config.source, source["partitions"])
                continue
            for p in range(source["partitions"]):
                src = self.worker.partitions.get((config.source, p))
                dst = self.worker.partitions.get((config.sink, p))
                if src is None or dst is None or (config.name, p) in self.tasks:
                    continue
                task = self.tasks[(config.name, p)] = ProcessorTask(config, src, dst, self.worker)
                self.by_source.setdefault(src, []).append(task)
                self.due.add(task)

    def on_flushed(self, part) -> None:
        self.due.update(self.by_source.get(part, ()))

    def run_due(self) -> None:
        for task in list(self.due):
            task.step(TURN_BYTES)
            if not task.behind() and task.processor is not None:
                self.due.discard(task)
            elif task.error is not None:
                self.due.discard(task)

    def close(self) -> None:
        """On a drain, once every log is flushed: save each task's position, so a clean
        restart re-reads nothing."""
        for task in self.tasks.values():
            if task.processor is not None and task.error is None:
                task.checkpoint_at_ms = 0
                task._maybe_checkpoint()

    def wait_ms(self, idle_ms: int) -> int:
        """0 while a task has work (or waits for a retry soon), else idle_ms."""
        if not self.due:
            return idle_ms
        t = mono_ms()
        return max(0, min(min(task.retry_at_ms for task in self.due) - t, idle_ms))

    def metrics(self, t_ms: int) -> tuple[list, list]:
        """(gauges, counters) rows for the worker's heartbeat snapshot."""
        gauges, counters = [], []
        for task in self.tasks.values():
            labels = task.labels
            status = task.status(t_ms)
            gauges += [("processor_position", labels, status["position"]),
                       ("processor_lag_records", labels, status["lag_records"]),
                       ("processor_lag_seconds", labels, status["lag_seconds"]),
                       ("processor_open_windows", labels, status["open_windows"]),
                       ("processor_failed", labels, status["failed"])]
            counters += [("processor_records_total", labels, task.records_total),
                         ("processor_output_records_total", labels, task.output_records_total),
                         ("processor_late_records_total", labels, task.late_records()),
                         ("processor_invalid_records_total", labels, task.invalid_records())]
        return gauges, counters
