"""Sans-IO codec for Kafka RecordBatch v2: pure functions from records to bytes and back.

Bytes produced here are byte-identical to what Kafka's MemoryRecordsBuilder writes for an
uncompressed CreateTime batch, so any Kafka decoder reads them. The per-record work runs
in the numba kernels (ingest.shards.kernels); this module checks arguments, sizes buffers
and turns kernel error codes into exceptions.

Input rules follow Kafka's record builder: a batch has at least one record; a timestamp is
>= 0 or -1 (NO_TIMESTAMP: MemoryRecordsBuilder rejects any other negative value); the
i-th record's offset is base_offset + i (Record.offset is ignored when encoding); producer
fields and the leader epoch are -1 ("none") or a non-negative value of their Kafka width.
Violations raise ValueError; wrong types raise TypeError.
"""

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ingest.shards import kernels
from ingest.shards.layout import (
    ATTRIBUTES_OFFSET,
    COMPRESSION_CODEC_MASK,
    CRC_OFFSET,
    LOG_OVERHEAD,
    MAGIC_V2,
    RECORD_BATCH_OVERHEAD,
    RECORDS_OFFSET,
    TIMESTAMP_TYPE_MASK,
)

try:  # zstd batches are readable only where the optional `zstandard` module is installed
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

CODEC_NONE = 0
CODEC_GZIP = 1
CODEC_ZSTD = 4
# A compressed batch is at most message.max.bytes (~1 MiB by default) on the wire;
# telemetry compresses well but not beyond this, and the bound stops a zip bomb from
# taking a worker's memory.
DECOMPRESSED_BYTES_MAX = 256 * 1024 * 1024
# Reading is permissive: any batchLength Kafka's int32 field can carry.
READ_BATCH_BYTES_MAX = kernels.BATCH_LENGTH_MAX

_INT16_MAX = 2**15 - 1
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_HEADER = struct.Struct(">qiibIhiqqqhii")
assert _HEADER.size == RECORD_BATCH_OVERHEAD, _HEADER.size

_ENCODE_ERRORS = {
    kernels.ENC_ERR_OUT_TOO_SMALL: "output buffer too small (size it with encoded_size_upper_bound)",
    kernels.ENC_ERR_SLICE: "an offset/length pair lies outside its buffer, or the arrays differ in length",
    kernels.ENC_ERR_TIMESTAMP: "timestamps must be >= 0, or -1 for none (as Kafka's record builder requires)",
    kernels.ENC_ERR_EMPTY: "a batch needs at least one record",
    kernels.ENC_ERR_TOO_LARGE: "the batch would exceed Kafka's 2 GiB batch size limit: split it",
    kernels.ENC_ERR_HEADERS: "pre-encoded headers do not parse as Kafka record headers",
}


class CorruptBatchError(ValueError):
    """The bytes are not a valid RecordBatch v2 (bad length, magic, CRC or records)."""


class UnsupportedCompressionError(ValueError):
    """The batch is compressed with a codec this reader cannot decompress."""


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchHeader:
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp_ms: int
    max_timestamp_ms: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size_bytes(self) -> int:
        """Bytes the whole batch takes on disk, header included."""
        return LOG_OVERHEAD + self.batch_length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression_codec(self) -> int:
        return self.attributes & COMPRESSION_CODEC_MASK

    @property
    def is_log_append_time(self) -> bool:
        return bool(self.attributes & TIMESTAMP_TYPE_MASK)


def parse_header(buf, pos: int = 0) -> BatchHeader:
    """The 61-byte header at buf[pos:], unchecked (validate_batch checks it)."""
    if len(buf) - pos < RECORD_BATCH_OVERHEAD or pos < 0:
        raise CorruptBatchError(f"batch header at byte {pos} is cut short")
    return BatchHeader(*_HEADER.unpack_from(buf, pos))


def patch_base_offset(base_offset: int) -> bytes:
    """The 8 bytes to write over [0:8) of a batch to give it this base offset; the CRC does
    not cover them, so the batch stays valid."""
    if not 0 <= base_offset <= _INT64_MAX:
        raise ValueError(f"base offset {base_offset} outside 0..2**63-1")
    return base_offset.to_bytes(8, "big")


def _as_buffer(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1 or not data.flags.c_contiguous:
            raise TypeError("buffers must be 1-D C-contiguous uint8 arrays or bytes-like")
        return data
    return np.frombuffer(data, dtype=np.uint8)


def _check_batch_fields(records_count, base_offset, producer_id, producer_epoch, base_sequence,
                        partition_leader_epoch) -> None:
    if records_count < 1:
        raise ValueError("a batch needs at least one record")
    if not 0 <= base_offset <= _INT64_MAX - (records_count - 1):
        raise ValueError(f"base offset {base_offset} outside 0..2**63-1 for {records_count} records")
    bounds = (("producer_id", producer_id, _INT64_MAX), ("producer_epoch", producer_epoch, _INT16_MAX),
              ("base_sequence", base_sequence, _INT32_MAX),
              ("partition_leader_epoch", partition_leader_epoch, _INT32_MAX))
    for name, value, maximum in bounds:
        if not -1 <= value <= maximum:
            raise ValueError(f"{name} {value} must be -1 (none) or 0..{maximum}")


def _int64_array(values, name: str) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    return array


_EMPTY_BUFFER = np.zeros(0, dtype=np.uint8)
_EMPTY_INT64 = np.zeros(0, dtype=np.int64)


def encode_columns(values_buf, value_offsets, value_lengths, keys_buf=None, key_offsets=None,
                   key_lengths=None, timestamps_ms=None, base_offset=0, producer_id=-1,
                   producer_epoch=-1, base_sequence=-1, partition_leader_epoch=-1,
                   headers_buf=None, header_offsets=None, header_lengths=None) -> bytes:
    """One uncompressed batch from packed columns, in one kernel call (the SDK's hot path).

    Record i's value is values_buf[value_offsets[i]:][:value_lengths[i]], length -1 = null;
    keys likewise (keys_buf None: every key null). Headers, if given, are pre-encoded Kafka
    header bytes per record from the headersCount varint on (length 0: none).
    """
    if timestamps_ms is None:
        raise ValueError("timestamps_ms is required: one timestamp per record")
    value_lengths = _int64_array(value_lengths, "value_lengths")
    if keys_buf is None:
        keys_buf, key_offsets = _EMPTY_BUFFER, np.zeros(value_lengths.size, dtype=np.int64)
        key_lengths = np.full(value_lengths.size, -1, dtype=np.int64)
    if headers_buf is None:
        headers_buf, header_offsets, header_lengths = _EMPTY_BUFFER, _EMPTY_INT64, _EMPTY_INT64
    columns = (_int64_array(value_offsets, "value_offsets"), value_lengths,
               _int64_array(key_offsets, "key_offsets"), _int64_array(key_lengths, "key_lengths"),
               _int64_array(timestamps_ms, "timestamps_ms"),
               _int64_array(header_offsets, "header_offsets"),
               _int64_array(header_lengths, "header_lengths"))
    value_offsets, value_lengths, key_offsets, key_lengths, timestamps_ms, header_offsets, header_lengths = columns
    _check_batch_fields(timestamps_ms.size, base_offset, producer_id, producer_epoch,
                        base_sequence, partition_leader_epoch)
    if value_lengths.size != timestamps_ms.size or key_lengths.size != timestamps_ms.size:
        raise ValueError(_ENCODE_ERRORS[kernels.ENC_ERR_SLICE])
    if header_lengths.size not in (0, timestamps_ms.size):
        raise ValueError(_ENCODE_ERRORS[kernels.ENC_ERR_SLICE])
    out = np.empty(kernels.encoded_size_upper_bound(value_lengths, key_lengths, header_lengths),
                   dtype=np.uint8)
    end = kernels.encode_records(
        _as_buffer(values_buf), value_offsets, value_lengths, _as_buffer(keys_buf), key_offsets,
        key_lengths, timestamps_ms, _as_buffer(headers_buf), header_offsets, header_lengths,
        base_offset, producer_id, producer_epoch, base_sequence, partition_leader_epoch, out, 0)
    if end < 0:
        raise ValueError(_ENCODE_ERRORS[end])
    return out[:end].tobytes()


def encode_headers(headers) -> bytes:
    """Kafka's encoding of one record's headers, from the headersCount varint on."""
    out = bytearray()
    _put_varint(out, len(headers))
    for key, value in headers:
        if not isinstance(key, str):
            raise TypeError(f"header key must be str, not {type(key).__name__}")
        _put_bytes_field(out, key.encode("utf-8"))
        _put_bytes_field(out, value)
    return bytes(out)


def _pack(fields) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(joined bytes, offsets, lengths) of nullable byte strings; length -1 for None."""
    lengths = np.fromiter((-1 if f is None else len(f) for f in fields), dtype=np.int64,
                          count=len(fields))
    sizes = np.maximum(lengths, 0)
    offsets = np.cumsum(sizes) - sizes
    return b"".join(f for f in fields if f is not None), offsets, lengths


def encode_batch(records: Sequence[Record], base_offset=0, producer_id=-1, producer_epoch=-1,
                 base_sequence=-1, partition_leader_epoch=-1) -> bytes:
    """One uncompressed batch holding `records` in order, via the numba encoder."""
    records = list(records)
    values_buf, value_offsets, value_lengths = _pack([r.value for r in records])
    keys_buf, key_offsets, key_lengths = _pack([r.key for r in records])
    timestamps_ms = np.fromiter((r.timestamp_ms for r in records), dtype=np.int64, count=len(records))
    headers = None, None, None
    if any(r.headers for r in records):
        headers = _pack([encode_headers(r.headers) if r.headers else b"" for r in records])
    return encode_columns(values_buf, value_offsets, value_lengths, keys_buf, key_offsets,
                          key_lengths, timestamps_ms, base_offset, producer_id, producer_epoch,
                          base_sequence, partition_leader_epoch, *headers)


# --- pure-Python reference encoder (oracle for the kernel, baseline for benchmarks) ------


def _put_varint(out: bytearray, value: int) -> None:
    zigzagged = ((value << 1) ^ (value >> 63)) & 0xFFFF_FFFF_FFFF_FFFF
    while zigzagged >= 0x80:
        out.append((zigzagged & 0x7F) | 0x80)
        zigzagged >>= 7
    out.append(zigzagged)


def _put_bytes_field(out: bytearray, data) -> None:
    if data is None:
        _put_varint(out, -1)
        return
    _put_varint(out, len(data))
    out += data


def _wrap_int64(value: int) -> int:
    """Two's-complement int64 arithmetic, as Java (and the kernel) compute deltas."""
    return ((value + 2**63) % 2**64) - 2**63


def encode_batch_py(records: Sequence[Record], base_offset=0, producer_id=-1, producer_epoch=-1,
                    base_sequence=-1, partition_leader_epoch=-1) -> bytes:
    """The same bytes as encode_batch, written record by record in Python."""
    records = list(records)
    _check_batch_fields(len(records), base_offset, producer_id, producer_epoch, base_sequence,
                        partition_leader_epoch)
    timestamps_ms = [r.timestamp_ms for r in records]
    if min(timestamps_ms) < kernels.NO_TIMESTAMP:
        raise ValueError(_ENCODE_ERRORS[kernels.ENC_ERR_TIMESTAMP])
    base_timestamp_ms = timestamps_ms[0]  # Kafka's choice: the first record's timestamp
    out = bytearray(RECORD_BATCH_OVERHEAD)
    for offset_delta, record in enumerate(records):
        body = bytearray(b"\x00")  # attributes
        _put_varint(body, _wrap_int64(record.timestamp_ms - base_timestamp_ms))
        _put_varint(body, offset_delta)
        _put_bytes_field(body, record.key)
        _put_bytes_field(body, record.value)
        body += encode_headers(record.headers)
        _put_varint(out, len(body))
        out += body
    _HEADER.pack_into(out, 0, base_offset, len(out) - LOG_OVERHEAD, partition_leader_epoch, MAGIC_V2, 0, 0,
                      len(records) - 1, base_timestamp_ms, max(timestamps_ms), producer_id,
                      producer_epoch, base_sequence, len(records))
    crc = kernels.crc32c_bytes(memoryview(out)[ATTRIBUTES_OFFSET:])
    struct.pack_into(">I", out, CRC_OFFSET, crc)
    return bytes(out)


# --- decoding ---------------------------------------------------------------------------


def _validated(buf: np.ndarray, pos: int) -> BatchHeader:
    code = kernels.validate_batch(buf, pos, buf.size, READ_BATCH_BYTES_MAX)
    if code != kernels.OK:
        raise CorruptBatchError(f"batch at byte {pos} is invalid: {kernels.ERROR_NAMES[code]}")
    return parse_header(buf, pos)


def _decompress(header: BatchHeader, payload, decompressed_bytes_max: int) -> np.ndarray:
    codec = header.compression_codec
    if codec == CODEC_GZIP:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
        try:
            data = inflater.decompress(payload, decompressed_bytes_max)
        except zlib.error as error:
            raise CorruptBatchError(f"gzip records do not inflate: {error}") from error
        if inflater.unconsumed_tail:
            raise CorruptBatchError(f"gzip records inflate beyond {decompressed_bytes_max} bytes")
    elif codec == CODEC_ZSTD and zstandard is not None:
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(bytes(payload))
            data = reader.read(decompressed_bytes_max + 1)
        except zstandard.ZstdError as error:
            raise CorruptBatchError(f"zstd records do not decompress: {error}") from error
        if len(data) > decompressed_bytes_max:
            raise CorruptBatchError(f"zstd records decompress beyond {decompressed_bytes_max} bytes")
    else:
        raise UnsupportedCompressionError(
            f"compression codec {codec} is not readable here (gzip always; zstd with `zstandard`)")
    return np.frombuffer(data, dtype=np.uint8)


def _read_varint(buf, p: int) -> tuple[int, int]:
    raw, shift = 0, 0
    while True:
        byte = buf[p]
        raw |= (byte & 0x7F) << shift
        p += 1
        if byte < 0x80:
            return (raw >> 1) ^ -(raw & 1), p
        shift += 7


def decode_headers(raw) -> tuple[tuple[str, bytes | None], ...]:
    """One record's headers from Kafka's encoding (headersCount varint on; b"": none)."""
    if len(raw) == 0:
        return ()
    raw = bytes(raw)  # indexing bytes gives Python ints: no uint8 wrap-around
    count, p = _read_varint(raw, 0)
    headers = []
    for _ in range(count):
        key_length, p = _read_varint(raw, p)
        key = bytes(raw[p:p + key_length]).decode("utf-8")
        value_length, p = _read_varint(raw, p + key_length)
        value = None if value_length < 0 else bytes(raw[p:p + value_length])
        headers.append((key, value))
        p += max(value_length, 0)
    return tuple(headers)


def _field(buf, offset: int, length: int) -> bytes | None:
    """buf[offset:offset+length] as bytes (buf: bytes or a uint8 array); length -1: null."""
    return None if length < 0 else bytes(buf[offset:offset + length])


def decode_batch(buf, pos: int = 0,
                 decompressed_bytes_max: int = DECOMPRESSED_BYTES_MAX) -> tuple[BatchHeader, list[Record]]:
    """The header and records of the batch at buf[pos:], after checking its CRC and records.

    Reads uncompressed, gzip and (with `zstandard` installed) zstd batches. Raises
    CorruptBatchError for invalid bytes, UnsupportedCompressionError for other codecs.
    """
    buf = _as_buffer(buf)
    header = _validated(buf, pos)
    records_at, records_end = pos + RECORDS_OFFSET, pos + header.size_bytes
    if header.compression_codec != CODEC_NONE:
        buf = _decompress(header, buf[records_at:records_end], decompressed_bytes_max)
        records_at, records_end = 0, buf.size
        code = kernels.validate_records(buf, 0, buf.size, header.records_count, header.last_offset_delta)
        if code != kernels.OK:
            raise CorruptBatchError(f"decompressed records of batch at byte {pos} are invalid")
    columns = np.empty((kernels.COLUMNS, header.records_count), dtype=np.int64)
    kernels.decode_records(buf, records_at, header.records_count, header.base_offset,
                           header.base_timestamp_ms, header.is_log_append_time,
                           header.max_timestamp_ms, columns, 0)
    records = []
    for column in columns.T.tolist():
        offset, timestamp_ms, key_at, key_length, value_at, value_length, headers_at, headers_length = column
        headers = decode_headers(buf[headers_at:headers_at + headers_length]) if headers_length else ()
        records.append(Record(offset, timestamp_ms, _field(buf, key_at, key_length),
                              _field(buf, value_at, value_length), headers))
    return header, records


def iter_batches(buf) -> Iterator[tuple[int, BatchHeader]]:
    """(position, header) of each batch in buf, in order, each checked like validate_batch.

    Ends quietly at a partial batch at the tail (a fetch response or a torn write may end
    with one); raises CorruptBatchError at any other invalid batch.
    """
    buf = _as_buffer(buf)
    pos = 0
    while pos < buf.size:
        code = kernels.validate_batch(buf, pos, buf.size, READ_BATCH_BYTES_MAX)
        if code == kernels.ERR_SHORT:
            return
        if code != kernels.OK:
            raise CorruptBatchError(f"batch at byte {pos} is invalid: {kernels.ERROR_NAMES[code]}")
        header = parse_header(buf, pos)
        yield pos, header
        pos += header.size_bytes


class RowFields:
    """key(i), value(i) and headers(i) of records held as columns (key_offsets,
    key_lengths, ...) over the bytes `_row_source()` returns."""

    __slots__ = ()

    def _row_source(self):
        raise NotImplementedError

    def key(self, i: int) -> bytes | None:
        return _field(self._row_source(), int(self.key_offsets[i]), int(self.key_lengths[i]))

    def value(self, i: int) -> bytes | None:
        return _field(self._row_source(), int(self.value_offsets[i]), int(self.value_lengths[i]))

    def headers(self, i: int) -> tuple[tuple[str, bytes | None], ...]:
        at, length = int(self.header_offsets[i]), int(self.header_lengths[i])
        return decode_headers(bytes(self._row_source()[at:at + length])) if length else ()


@dataclass(frozen=True, slots=True)
class Columns(RowFields):
    """Records of consecutive batches as parallel arrays; offsets/lengths index `buffer`
    (length -1: null key or value; header_lengths 0: no headers, else the raw Kafka header
    bytes from the headersCount varint on, ready for encode_columns)."""

    buffer: np.ndarray
    offsets: np.ndarray
    timestamps_ms: np.ndarray
    key_offsets: np.ndarray
    key_lengths: np.ndarray
    value_offsets: np.ndarray
    value_lengths: np.ndarray
    header_offsets: np.ndarray
    header_lengths: np.ndarray
    bytes_consumed: int

    def __len__(self) -> int:
        return self.offsets.size

    def _row_source(self):
        return self.buffer


def decode_columns(buf, max_batch_bytes: int = READ_BATCH_BYTES_MAX) -> Columns:
    """Every record of the complete uncompressed batches at the start of buf, as columns.

    A partial batch at the tail is left out (bytes_consumed stops before it). Raises
    CorruptBatchError at an invalid batch, UnsupportedCompressionError at a compressed one.
    """
    buf = _as_buffer(buf)
    columns = np.empty((kernels.COLUMNS, kernels.count_records(buf, 0, buf.size)), dtype=np.int64)
    count, consumed, code = kernels.decode_columns_into(buf, 0, buf.size, max_batch_bytes, columns)
    if code == kernels.ERR_COMPRESSION:
        codec = parse_header(buf, consumed).compression_codec
        raise UnsupportedCompressionError(
            f"batch at byte {consumed} is compressed (codec {codec}): decode it with decode_batch")
    if code != kernels.OK:
        raise CorruptBatchError(f"batch at byte {consumed} is invalid: {kernels.ERROR_NAMES[code]}")
    assert 0 <= count <= columns.shape[1] and 0 <= consumed <= buf.size, (count, consumed)
    rows = columns[:, :count]
    return Columns(buf, *(rows[i] for i in range(kernels.COLUMNS)), bytes_consumed=consumed)
