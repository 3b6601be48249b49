"""Numeric fields of record values as float64 columns: JSON (orjson) or a fixed binary layout.

A value whose field is missing, not a number, or too short for a binary field gives NaN
in that column and False in `valid`; processors count such records as invalid and leave
them out. JSON parsing is the one per-record Python loop (orjson, about a microsecond a
record); binary fields are gathered by numpy over the whole chunk.
"""

from __future__ import annotations

import numpy as np
import orjson


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
    data = buffer.tobytes() if isinstance(buffer, np.ndarray) else bytes(buffer)
    loads, nan = orjson.loads, np.nan
    docs = []
    append = docs.append
    # The per-record loop: one slice and one orjson call; fields are read below, per field.
    for at, length in zip(value_offsets.tolist(), value_lengths.tolist()):
        try:
            append(loads(data[at:at + length]) if length > 0 else None)
        except orjson.JSONDecodeError:
            append(None)
    values = np.empty((len(names), rows))
    for f, name in enumerate(names):
        if "." not in name:
            column = [d.get(name, nan) if type(d) is dict else nan for d in docs]
            values[f] = [v if type(v) is float or type(v) is int else nan for v in column]
        else:
            path = tuple(name.split("."))
            values[f] = [_lookup(d, path) for d in docs]
    valid = ~np.isnan(values).any(axis=0) if names else np.ones(rows, np.bool_)
    return values, valid


def binary_fields(buffer: np.ndarray, value_offsets: np.ndarray, value_lengths: np.ndarray,
                  layout: list[tuple[str, np.dtype, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) of fixed-layout fields: (name, dtype with byte order, byte offset).

    One numpy gather per field (a (rows, width) byte matrix viewed as the field's dtype),
    no per-record Python."""
    rows = value_offsets.size
    values = np.empty((len(layout), rows))
    valid = np.ones(rows, np.bool_)
    for f, (_name, dtype, offset) in enumerate(layout):
        fits = value_lengths >= offset + dtype.itemsize
        valid &= fits
        starts = np.where(fits, value_offsets + offset, 0)
        if buffer.size < dtype.itemsize:
            values[f] = np.nan
            continue
        starts = np.minimum(starts, buffer.size - dtype.itemsize)
        raw = buffer[starts[:, None] + np.arange(dtype.itemsize)]
        values[f] = np.ascontiguousarray(raw).view(dtype).reshape(rows)
        values[f][~fits] = np.nan
    valid &= ~np.isnan(values).any(axis=0)
    return values, valid
