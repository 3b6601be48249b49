"""Numeric fields of record values as float64 columns: JSON (orjson) or a fixed binary layout.

A value whose field is missing, not a number, or too short for a binary field gives NaN
in that column and False in `valid`; processors count such records as invalid and leave
them out. JSON parsing is the one per-record Python loop (orjson, about a microsecond a
record); binary fields are gathered by a kernel over the whole chunk.
"""

from __future__ import annotations

import numpy as np
import orjson

from ingest.streams import window_kernel

_NUMBER = (int, float)


def _lookup(doc, path: tuple[str, ...]) -> float:
    for part in path:
        if not isinstance(doc, dict):
            return np.nan
        doc = doc.get(part)
    if isinstance(doc, _NUMBER) and not isinstance(doc, bool):
        return float(doc)
    return np.nan


def json_fields(buffer: np.ndarray, value_offsets: np.ndarray, value_lengths: np.ndarray,
                names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(values (fields, rows) float64, valid rows) of dotted JSON paths (`a.b.c`)."""
    rows = value_offsets.size
    values = np.full((len(names), rows), np.nan)
    paths = [tuple(name.split(".")) for name in names]
    view = memoryview(buffer)
    loads = orjson.loads
    for row, (at, length) in enumerate(zip(value_offsets.tolist(), value_lengths.tolist())):
        if length <= 0:
            continue
        try:
            doc = loads(view[at:at + length])
        except orjson.JSONDecodeError:
            continue
        for f, path in enumerate(paths):
            values[f, row] = _lookup(doc, path)
    valid = ~np.isnan(values).any(axis=0) if names else np.ones(rows, np.bool_)
    return values, valid


def binary_fields(buffer: np.ndarray, value_offsets: np.ndarray, value_lengths: np.ndarray,
                  layout: list[tuple[str, np.dtype, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) of fixed-layout fields: (name, dtype with byte order, byte offset)."""
    rows = value_offsets.size
    values = np.empty((len(layout), rows))
    valid = np.ones(rows, np.bool_)
    for f, (_name, dtype, offset) in enumerate(layout):
        window_kernel.gather_binary_field(buffer, value_offsets, value_lengths, offset, dtype.itemsize,
                                          dtype.kind == "f", dtype.kind == "i", dtype.byteorder == ">",
                                          values[f], valid)
    valid &= ~np.isnan(values).any(axis=0)
    return values, valid
