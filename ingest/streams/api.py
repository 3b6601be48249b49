"""The Python API for custom processors: a function over a batch's columns, or per record.

Batch form (fast: numpy over columns, one call per chunk of source records):

    import numpy as np
    from ingest.streams import Batch, Output

    def hot(batch: Batch):
        temp = batch.json_field("temp_c")          # float64, NaN where missing
        return temp > 80                            # a mask: those records, unchanged

    def doubled(batch: Batch):
        temp = batch.json_field("temp_c")
        return [Output(batch.key(i), b"%.1f" % (2 * t), int(batch.timestamps_ms[i]))
                for i, t in enumerate(temp) if t == t]

Record form (simple; about 20x slower than a batch function on binary values and 3x on
JSON, where parsing dominates either way: bench/RESULTS.md):

    def hot(record):                                 # an ingest Record
        return record.value if b'"alarm"' in record.value else None

A batch function returns a boolean mask (the selected source records pass through with
their key, value and timestamp) or an iterable of Output; a record function returns None,
bytes (the new value, same key and timestamp), an Output, or a list of Outputs.

Exactly-once rests on determinism: after a crash, the source records after the last
stored position are processed again and outputs already written are skipped by count.
A function must therefore give the same outputs for the same records, whatever the chunk
boundaries (no clocks, no randomness, no state carried between calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.shards.batch import RowFields
from ingest.streams import fields as fields_mod
from ingest.streams import spec


@dataclass(frozen=True, slots=True)
class Output:
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Batch(RowFields):
    """Source records of one chunk, in offset order, as columns over `buffer`."""

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

    def _row_source(self):
        return self.buffer

    def take(self, rows: np.ndarray) -> "Batch":
        """The records at `rows` (indices or a boolean mask)."""
        return Batch(self.buffer, *(getattr(self, name)[rows] for name in _ROW_COLUMNS))

    def json_field(self, path: str) -> np.ndarray:
        """A numeric JSON field (dotted path) of every value; NaN where missing."""
        return self.json_fields((path,))[0][0]

    def json_fields(self, paths: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(values (fields, rows), valid rows) of several numeric JSON fields at once."""
        return fields_mod.json_fields(self.buffer, self.value_offsets, self.value_lengths, tuple(paths))

    def binary_field(self, layout: str, byte_order: str = "little") -> np.ndarray:
        """A numeric field of fixed-layout binary values, "TYPE@BYTE_OFFSET" (e.g. "f32@4");
        NaN where a value is too short."""
        p = spec.ProcessorConfig("api", "extract", "a", "b", format="binary", fields=("f",),
                                 layout={"f": layout}, byte_order=byte_order)
        return fields_mod.binary_fields(self.buffer, self.value_offsets, self.value_lengths,
                                        p.binary_dtypes())[0][0]


_ROW_COLUMNS = ("offsets", "timestamps_ms", "key_offsets", "key_lengths", "value_offsets",
                "value_lengths", "header_offsets", "header_lengths")
