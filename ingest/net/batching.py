"""Records to RecordBatches, without sockets or threads: the producer's CPU work.

A drain hands over parallel lists (values, keys, timestamps) or send_batch() hands over
arrays; ``pack_records`` / ``pack_columns`` turn them into packed columns (one
``b"".join`` and one ``np.fromiter(map(len, ...))`` per field, no per-record Python work
beyond that), ``choose_partitions`` runs Kafka's murmur2 partitioner over every key in one
numba call, ``split_batches`` groups the records by partition into runs of about
batch_bytes, and ``encode_batch_rows`` encodes one run with the numba RecordBatch encoder.
Records that cannot be encoded (wrong types, negative timestamps) are set aside in
``PackedRecords.bad`` so that they fail alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from ingest.net.errors import ErrorCode, IngestError
from ingest.shards import kernels, layout
from ingest.shards.kernels import borrowed, partition_for_key

# Records per RecordBatch at most, whatever their size: bounds the per-batch arrays.
RECORDS_PER_BATCH_MAX = 1 << 20
# Bytes a record adds to a batch beyond its key, value and headers (varints, attributes):
# used to split drains into batches of about batch_bytes.
RECORD_OVERHEAD_BYTES = 12
SEQUENCE_MODULUS = 1 << 31  # Kafka's sequences are int32 and wrap to 0


class PackedRecords:
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
                 now_ms: int) -> PackedRecords:
    """The records of one drain as columns: values and keys packed with one b"".join
    each, timestamps None stamped ``now_ms``. Records that cannot be encoded (wrong
    types, negative timestamps) are listed in ``bad`` and left out of the batches."""
    packed = PackedRecords(len(values))
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


def _pack_extras(packed: PackedRecords, extras: dict) -> None:
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
    keys = borrowed(keys)  # no atomic reference counting around each per-key call
    for i in range(key_lengths.size):
        if key_lengths[i] < 0:
            out[i] = null_key_partition
        else:
            start = key_offsets[i]
            out[i] = partition_for_key(keys, start, start + key_lengths[i], partition_count)
    return out


def choose_partitions(packed: PackedRecords, partition_count: int, sticky: int) -> np.ndarray:
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


@njit(cache=True)
def group_runs(partitions, sizes, rows, batch_bytes, records_max):
    """Records ``rows`` grouped by partition (ascending), in send order within each, and
    cut greedily into runs: a run takes records while they fit ``batch_bytes`` and
    ``records_max``; a record larger than batch_bytes is a run of its own. Returns
    (order, bounds, run_partitions): run j is order[bounds[j]:bounds[j + 1]].

    A counting sort: linear, where argsort and a split per group cost several numpy calls
    and an n log n sort per drain."""
    partition_count = 0
    for r in rows:
        partition_count = max(partition_count, partitions[r] + 1)
    starts = np.zeros(partition_count + 1, np.int64)
    for r in rows:
        starts[partitions[r] + 1] += 1
    for p in range(partition_count):
        starts[p + 1] += starts[p]
    fill = starts[:-1].copy()
    order = np.empty(rows.size, np.int64)
    for r in rows:
        p = partitions[r]
        order[fill[p]] = r
        fill[p] += 1
    bounds = np.empty(rows.size + 1, np.int64)
    run_partitions = np.empty(rows.size, np.int64)
    runs = 0
    for p in range(partition_count):
        run_bytes = 0
        run_records = 0
        for k in range(starts[p], starts[p + 1]):
            size = sizes[order[k]]
            if k == starts[p] or run_bytes + size > batch_bytes or run_records == records_max:
                bounds[runs] = k
                run_partitions[runs] = p
                runs += 1
                run_bytes = 0
                run_records = 0
            run_bytes += size
            run_records += 1
    bounds[runs] = rows.size
    return order, bounds[:runs + 1], run_partitions[:runs]


def split_batches(partitions: np.ndarray, sizes: np.ndarray, keep: np.ndarray | None,
                  batch_bytes: int) -> list[tuple[int, np.ndarray]]:
    """(partition, record indices in send order) per batch: records grouped by partition,
    each group cut into runs of at most ``batch_bytes`` (a larger record is a run alone)."""
    rows = np.arange(partitions.size) if keep is None else np.flatnonzero(keep)
    if rows.size == 0:
        return []
    if partitions.dtype != np.int64 or sizes.dtype != np.int64:  # one compiled signature
        partitions, sizes = partitions.astype(np.int64), sizes.astype(np.int64)
    # The kernel counts rows per partition into an array indexed by partition number.
    assert int(partitions.min()) >= 0, "a record without a partition reached the split"
    order, bounds, run_partitions = group_runs(partitions, sizes, rows, batch_bytes, RECORDS_PER_BATCH_MAX)
    assert bounds[-1] == rows.size and run_partitions.size == bounds.size - 1
    ends = bounds.tolist()
    return [(p, order[start:end]) for p, start, end in zip(run_partitions.tolist(), ends, ends[1:])]


def encode_batch_rows(packed: PackedRecords, rows: np.ndarray, producer_id: int, base_sequence: int) -> np.ndarray:
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


def restamp(payload: np.ndarray, producer_id: int, base_sequence: int) -> None:
    """Give an encoded batch another producer id and base sequence (in place), CRC
    recomputed; the records are untouched."""
    head = payload[:layout.RECORD_BATCH_OVERHEAD]
    fields = ((layout.PRODUCER_ID_OFFSET, layout.PRODUCER_ID_LENGTH, producer_id),
              (layout.BASE_SEQUENCE_OFFSET, layout.BASE_SEQUENCE_LENGTH, base_sequence))
    for offset, length, value in fields:
        head[offset:offset + length] = np.frombuffer(value.to_bytes(length, "big", signed=True), np.uint8)
    crc = int(kernels.crc32c(payload, layout.ATTRIBUTES_OFFSET, payload.size, 0))
    head[layout.CRC_OFFSET:layout.CRC_OFFSET + layout.CRC_LENGTH] = np.frombuffer(
        crc.to_bytes(layout.CRC_LENGTH, "big"), np.uint8)


# ---- send_batch() input -----------------------------------------------------------------


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
    _check_count(lengths, what, count)
    return buffer, offsets, lengths


def _check_count(lengths: np.ndarray, what: str, count: int | None) -> None:
    if count is not None and lengths.size != count:
        raise ValueError(f"{lengths.size} {what}s for {count} values")


def _buffer_column(buffer, lengths, what: str, count: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, offsets, lengths) from one buffer holding every field back to back and the
    fields' lengths (-1: null, no bytes): no per-record Python object, no copy."""
    if isinstance(buffer, np.ndarray):
        data = np.ascontiguousarray(buffer).view(np.uint8).reshape(-1)
    else:
        try:
            data = np.frombuffer(buffer, np.uint8)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what}s with {what}_lengths must be one contiguous bytes-like buffer, "
                            f"not {type(buffer).__name__} ({error})") from None
    try:
        lengths = np.array(lengths, dtype=np.int64)  # a copy: the caller may reuse theirs
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{what}_lengths must be a sequence of ints") from None
    if lengths.ndim != 1:
        raise ValueError(f"{what}_lengths must have one dimension, not {lengths.ndim}")
    _check_count(lengths, what, count)
    present = np.maximum(lengths, 0)
    if lengths.size and int(lengths.min()) < -1:
        raise ValueError(f"{what}_lengths must be >= 0 (or -1 for null)")
    if int(present.sum()) != data.size:
        raise ValueError(f"{what}_lengths add up to {int(present.sum())} bytes, the buffer holds {data.size}")
    data = data.view()
    data.flags.writeable = False  # the kernels' signature for joined bytes: no second compile
    return data, np.cumsum(present) - present, lengths


def pack_columns(values, keys, timestamps_ms, now_ms: int, value_lengths=None, key_lengths=None) -> PackedRecords:
    """send_batch()'s input as packed columns; ValueError/TypeError for unusable input.
    With ``value_lengths`` (``key_lengths``), ``values`` (``keys``) is one buffer."""
    if value_lengths is None:
        buffer, offsets, lengths = _column(values, "value", None)
    else:
        buffer, offsets, lengths = _buffer_column(values, value_lengths, "value", None)
    packed = PackedRecords(lengths.size)
    packed.values, packed.value_offsets, packed.value_lengths = buffer, offsets, lengths
    if key_lengths is not None:
        if keys is None:
            raise ValueError("key_lengths without keys: pass the keys' buffer too")
        packed.keys, packed.key_offsets, packed.key_lengths = _buffer_column(keys, key_lengths, "key", packed.count)
    elif keys is not None:
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
