"""The processors: what each kind makes of one chunk of source records.

A processor is a pure step from a Batch (columns of source records in offset order) to
Emitted rows (columns of sink records). The runtime (ingest.streams.runtime) does the
reading, writing and positions; a processor only knows records. Stateful processors
(aggregate) also say from where a restart must replay to rebuild their state.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import numpy as np
import orjson

from ingest.shards.batch import Record, _pack, decode_headers
from ingest.streams import fields as fields_mod
from ingest.streams import window_kernel
from ingest.streams.aggregate import WindowedAggregate
from ingest.streams.api import Batch, Output
from ingest.streams.spec import ProcessorConfig


class ProcessorError(Exception):
    """A custom processor raised or returned something that is not an output."""


@dataclass(frozen=True, slots=True)
class Emitted:
    """Sink records as columns: values and keys as (buffer, offsets, lengths; -1 = null)."""

    values_buf: np.ndarray | bytes
    value_offsets: np.ndarray
    value_lengths: np.ndarray
    keys_buf: np.ndarray | bytes
    key_offsets: np.ndarray
    key_lengths: np.ndarray
    timestamps_ms: np.ndarray

    def __len__(self) -> int:
        return self.timestamps_ms.size

    def rows(self, lo: int, hi: int) -> "Emitted":
        return Emitted(self.values_buf, self.value_offsets[lo:hi], self.value_lengths[lo:hi], self.keys_buf,
                       self.key_offsets[lo:hi], self.key_lengths[lo:hi], self.timestamps_ms[lo:hi])

    def row_bytes(self) -> np.ndarray:
        return np.maximum(self.value_lengths, 0) + np.maximum(self.key_lengths, 0)


def passthrough(batch: Batch, mask: np.ndarray) -> Emitted:
    """The source records selected by mask, with their keys, values and timestamps."""
    return Emitted(batch.buffer, batch.value_offsets[mask], batch.value_lengths[mask], batch.buffer,
                   batch.key_offsets[mask], batch.key_lengths[mask], batch.timestamps_ms[mask])


def from_outputs(outputs: list[Output]) -> Emitted:
    for out in outputs:
        if not isinstance(out, Output):
            raise ProcessorError(f"a processor returned {type(out).__name__}, not an Output")
    values = _pack([o.value for o in outputs])
    keys = _pack([o.key for o in outputs])
    timestamps = np.fromiter((o.timestamp_ms for o in outputs), np.int64, count=len(outputs))
    return Emitted(*values, *keys, timestamps)


NOTHING = from_outputs([])


class Processor:
    stateful = False

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config
        self.invalid_records = 0  # records whose fields could not be read (counter)

    def process(self, batch: Batch, live: bool) -> Emitted:
        raise NotImplementedError

    def open_windows(self) -> int:
        return 0

    def late_records(self) -> int:
        return 0

    def replay_offset(self, next_offset: int) -> int:
        return next_offset

    def stream_time_ms(self) -> int:
        return -1

    def restore(self, stream_time_ms: int) -> None:
        pass

    def _fields(self, batch: Batch, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        if self.config.format == "binary":
            layout = {name: (name, dtype, offset) for name, dtype, offset in self.config.binary_dtypes()}
            values, valid = fields_mod.binary_fields(batch.buffer, batch.value_offsets, batch.value_lengths,
                                                     [layout[n] for n in names])
        else:
            values, valid = fields_mod.json_fields(batch.buffer, batch.value_offsets, batch.value_lengths, names)
        return values, valid


class Filter(Processor):
    """filter / alert: the source records for which every `where` condition holds."""

    def __init__(self, config: ProcessorConfig) -> None:
        super().__init__(config)
        conditions = config.condition_fields()
        self.names = tuple(name for name, _, _ in conditions)
        self.operators = np.array([op for _, op, _ in conditions], np.int64)
        self.thresholds = np.array([limit for _, _, limit in conditions], np.float64)

    def process(self, batch: Batch, live: bool) -> Emitted:
        values, valid = self._fields(batch, self.names)
        self.invalid_records += int(valid.size - np.count_nonzero(valid))
        return passthrough(batch, window_kernel.match_all(values, self.operators, self.thresholds, valid))


class Extract(Processor):
    """The declared fields of each value, as a compact JSON object or packed float64s."""

    def process(self, batch: Batch, live: bool) -> Emitted:
        if self.config.output_format == "binary" or self.config.format == "binary":
            values, valid = self._fields(batch, self.config.fields)
        else:
            return self._json(batch)
        self.invalid_records += int(valid.size - np.count_nonzero(valid))
        rows = np.flatnonzero(valid)
        if self.config.output_format == "binary":
            packed = np.ascontiguousarray(values[:, rows].T, dtype="<f8")
            width = 8 * len(self.config.fields)
            buf = packed.view(np.uint8).reshape(-1)
            return Emitted(buf, np.arange(rows.size, dtype=np.int64) * width, np.full(rows.size, width, np.int64),
                           batch.buffer, batch.key_offsets[rows], batch.key_lengths[rows], batch.timestamps_ms[rows])
        docs = [orjson.dumps(dict(zip(self.config.fields, values[:, i].tolist()))) for i in rows.tolist()]
        return self._with_source_keys(batch, rows, docs)

    def _json(self, batch: Batch) -> Emitted:
        paths = [(name, tuple(name.split("."))) for name in self.config.fields]
        view = memoryview(batch.buffer)
        rows, docs = [], []
        for row, (at, length) in enumerate(zip(batch.value_offsets.tolist(), batch.value_lengths.tolist())):
            try:
                doc = orjson.loads(view[at:at + length]) if length > 0 else None
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict):
                self.invalid_records += 1
                continue
            rows.append(row)
            docs.append(orjson.dumps({name: _get(doc, path) for name, path in paths}))
        return self._with_source_keys(batch, np.array(rows, np.int64), docs)

    @staticmethod
    def _with_source_keys(batch: Batch, rows: np.ndarray, docs: list[bytes]) -> Emitted:
        values_buf, value_offsets, value_lengths = _pack(docs)
        return Emitted(values_buf, value_offsets, value_lengths, batch.buffer, batch.key_offsets[rows],
                       batch.key_lengths[rows], batch.timestamps_ms[rows])


def _get(doc, path):
    for part in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


_STAT_INDEX = {"min": 0, "max": 1, "sum": 2, "first": 3, "last": 4}


class Aggregate(Processor):
    """Windowed aggregates per key; one JSON record per key per closed window."""

    stateful = True

    def __init__(self, config: ProcessorConfig) -> None:
        super().__init__(config)
        self.windows = WindowedAggregate(config)
        aggs = config.aggregations
        self.stats = [(name, index) for name, index in (("min", 0), ("max", 1), ("sum", 2), ("first", 3), ("last", 4))
                      if name in aggs]
        self.mean = "mean" in aggs
        self.count = "count" in aggs

    def process(self, batch: Batch, live: bool) -> Emitted:
        values, valid = self._fields(batch, self.config.fields)
        valid &= batch.timestamps_ms >= 0  # a record without a timestamp has no window
        if live:
            self.invalid_records += int(valid.size - np.count_nonzero(valid))
        if not valid.all():
            batch, values = batch.take(valid), values[:, valid]
        ids = self.windows.key_ids(batch.buffer, batch.key_offsets, batch.key_lengths)
        starts, key_ids, counts, stats = self.windows.add_arrays(ids, batch.timestamps_ms, batch.offsets, values, live)
        if not starts.size:
            return NOTHING
        if self.config.output_format == "binary":
            return self._binary(starts, key_ids, counts, stats)
        keys = self.windows._keys
        return from_outputs([self._output(start, keys[k], count, st) for start, k, count, st in
                             zip(starts.tolist(), key_ids.tolist(), counts.tolist(), stats.tolist())])

    def _output(self, start_ms: int, key: bytes | None, count: int, stats: list[list[float]]) -> Output:
        doc = {"window_start_ms": start_ms, "window_end_ms": start_ms + self.config.window_ms}
        if self.count:
            doc["count"] = count
        for name, field_stats in zip(self.config.fields, stats):
            field = {agg: field_stats[i] for agg, i in self.stats}
            if self.mean:
                field["mean"] = field_stats[2] / count
            doc[name] = field
        return Output(key, orjson.dumps(doc), start_ms)

    def _binary(self, starts, key_ids, counts, stats) -> Emitted:
        """Little-endian int64 window_start_ms, int64 count, then per field one float64 per
        aggregation in `aggregations` order (count excepted): no per-window Python."""
        columns = [starts[:, None], counts[:, None]]
        as_float = []
        for f in range(len(self.config.fields)):
            for agg in self.config.aggregations:
                if agg == "count":
                    continue
                column = stats[:, f, 2] / counts if agg == "mean" else stats[:, f, _STAT_INDEX[agg]]
                as_float.append(column[:, None])
        ints = np.hstack(columns).astype("<i8")
        floats = np.hstack(as_float).astype("<f8") if as_float else np.zeros((starts.size, 0), "<f8")
        rows = np.hstack([ints.view(np.uint8).reshape(starts.size, -1), floats.view(np.uint8).reshape(starts.size, -1)])
        width = rows.shape[1]
        key_buf, key_offsets, key_lengths = self.windows.key_columns()
        return Emitted(np.ascontiguousarray(rows).reshape(-1), np.arange(starts.size, dtype=np.int64) * width,
                       np.full(starts.size, width, np.int64), key_buf, key_offsets[key_ids], key_lengths[key_ids],
                       starts.astype(np.int64))

    def open_windows(self) -> int:
        return self.windows.open_windows()

    def late_records(self) -> int:
        return self.windows.late_records

    def replay_offset(self, next_offset: int) -> int:
        return self.windows.replay_offset(next_offset)

    def stream_time_ms(self) -> int:
        return self.windows.stream_time_ms

    def restore(self, stream_time_ms: int) -> None:
        self.windows.restore(stream_time_ms)


class Custom(Processor):
    """A function of ingest.streams: over a whole Batch, or one Record at a time."""

    def __init__(self, config: ProcessorConfig) -> None:
        super().__init__(config)
        if config.path and config.path not in sys.path:
            sys.path.insert(0, config.path)
        module_name, _, attr = config.function.partition(":")
        self.function = getattr(importlib.import_module(module_name), attr)

    def process(self, batch: Batch, live: bool) -> Emitted:
        try:
            if self.config.mode == "batch":
                result = self.function(batch)
                if isinstance(result, np.ndarray) and result.dtype == np.bool_:
                    if result.shape != (len(batch),):
                        raise ProcessorError(f"a mask of shape {result.shape} for {len(batch)} records")
                    return passthrough(batch, result)
                return from_outputs(list(result or ()))
            return from_outputs(self._per_record(batch))
        except ProcessorError:
            raise
        except Exception as e:  # the user's code: any failure stops this processor, visibly
            raise ProcessorError(f"{self.config.function} raised {type(e).__name__}: {e}") from e

    def _per_record(self, batch: Batch) -> list[Output]:
        outputs: list[Output] = []
        for i in range(len(batch)):
            at, length = int(batch.header_offsets[i]), int(batch.header_lengths[i])
            headers = decode_headers(bytes(batch.buffer[at:at + length])) if length else ()
            record = Record(int(batch.offsets[i]), int(batch.timestamps_ms[i]), batch.key(i), batch.value(i), headers)
            result = self.function(record)
            if result is None:
                continue
            if isinstance(result, (bytes, bytearray)):
                outputs.append(Output(record.key, bytes(result), record.timestamp_ms))
            elif isinstance(result, Output):
                outputs.append(result)
            else:
                outputs.extend(result)
        return outputs


KINDS = {"aggregate": Aggregate, "filter": Filter, "alert": Filter, "extract": Extract, "python": Custom}


def build(config: ProcessorConfig) -> Processor:
    return KINDS[config.kind](config)
