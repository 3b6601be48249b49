"""numba kernels for RecordBatch v2: CRC32C, validation, scanning, encoding, decoding, murmur2.

Leaf functions over 1-D C-contiguous numpy uint8 buffers; no I/O, no allocation on the hot
path. A kernel never writes into an input buffer, and never reads or writes outside the
arrays it is given, whatever the bytes say (every length read from a buffer is checked
against the end of the region before it is used).

Integer arithmetic is done in int64 throughout: numba turns mixed uint64/int64 expressions
into float64, which would silently corrupt checksums and offsets.
"""

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ingest.shards.layout import (
    ATTRIBUTES_OFFSET,
    BASE_SEQUENCE_OFFSET,
    BASE_TIMESTAMP_OFFSET,
    COMPRESSION_CODEC_MASK,
    CRC_OFFSET,
    LAST_OFFSET_DELTA_OFFSET,
    LENGTH_OFFSET,
    LOG_OVERHEAD,
    MAGIC_OFFSET,
    MAGIC_V2,
    MAX_TIMESTAMP_OFFSET,
    PARTITION_LEADER_EPOCH_OFFSET,
    PRODUCER_EPOCH_OFFSET,
    PRODUCER_ID_OFFSET,
    RECORD_BATCH_OVERHEAD,
    RECORD_MIN_BYTES,
    RECORDS_COUNT_OFFSET,
    RECORDS_OFFSET,
    TIMESTAMP_TYPE_MASK,
)

# ---------------------------------------------------------------------------------------
# Error codes of validate_batch / scan_batches (0 = OK).
OK = 0
ERR_SHORT = 1  # header or batch runs past the end of the bytes given: a torn tail
ERR_LENGTH = 2  # batchLength below the smallest batch or above max_batch_bytes
ERR_MAGIC = 3  # not a magic-2 batch
ERR_CRC = 4  # CRC32C over [attributes, end) does not match the stored one
ERR_RECORDS = 5  # records do not parse, or disagree with the header's counts
ERR_COMPRESSION = 6  # compression codec is not one Kafka defines (1..4)

ERROR_NAMES = {
    OK: "ok",
    ERR_SHORT: "short",
    ERR_LENGTH: "length",
    ERR_MAGIC: "magic",
    ERR_CRC: "crc",
    ERR_RECORDS: "records",
    ERR_COMPRESSION: "compression",
}

# Error codes of encode_records (negative, so they never look like an end position).
ENC_ERR_OUT_TOO_SMALL = -1  # `out` has no room for the batch: size it with encoded_size_upper_bound
ENC_ERR_SLICE = -2  # an offset/length pair points outside its buffer, or arrays disagree in size
ENC_ERR_TIMESTAMP = -3  # a timestamp below -1 (Kafka's NO_TIMESTAMP is the only negative allowed)
ENC_ERR_EMPTY = -4  # a batch holds at least one record
ENC_ERR_TOO_LARGE = -5  # batchLength would not fit Kafka's int32 field

# batchLength counts the bytes after the field itself, so the smallest batch has this many.
BATCH_LENGTH_MIN = RECORD_BATCH_OVERHEAD - LOG_OVERHEAD
# Kafka's batchLength is an int32.
BATCH_LENGTH_MAX = 2**31 - 1
# Codecs Kafka defines: 1 gzip, 2 snappy, 3 lz4, 4 zstd.
CODEC_MAX = 4
# Kafka's ByteUtils reads an int32 varint in at most 5 bytes and a varlong in at most 10.
VARINT_BYTES_MAX = 5
VARLONG_BYTES_MAX = 10
# Framing one record can add beyond its key, value and header bytes: length varint (5),
# attributes (1), timestampDelta varlong (10), offsetDelta varint (5), key and value
# length varints (5 each), headersCount varint (1 when the record has no headers).
RECORD_OVERHEAD_BYTES_MAX = 5 + 1 + 10 + 5 + 5 + 5 + 1
# Kafka's NO_TIMESTAMP: the only negative timestamp a batch may carry.
NO_TIMESTAMP = -1

_MASK32 = 0xFFFFFFFF
_MASK63 = 0x7FFFFFFFFFFFFFFF

# ---------------------------------------------------------------------------------------
# CRC32C (Castagnoli), reflected polynomial, as Kafka's Crc32C.
_CRC32C_POLY_REFLECTED = 0x82F63B78
# Adler's crc32c.c hardware scheme: three independent crc32 chains over three adjacent
# blocks hide the instruction's 3-cycle latency; the chains are joined by "shifting" a CRC
# over a block of zeros with a precomputed table. LONG blocks carry big buffers, SHORT
# blocks the remainder; both as in crc32c.c.
CRC_LONG_BLOCK_BYTES = 8192
CRC_SHORT_BLOCK_BYTES = 256


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.int64)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ _CRC32C_POLY_REFLECTED, table >> 1)
    return table


def _slicing_tables(byte_table: np.ndarray) -> np.ndarray:
    """tables[k][b] = CRC state after byte b followed by k zero bytes (slicing-by-8)."""
    tables = np.empty((8, 256), dtype=np.int64)
    tables[0] = byte_table
    for k in range(1, 8):
        previous = tables[k - 1]
        tables[k] = byte_table[previous & 0xFF] ^ (previous >> 8)
    return tables


def _apply_operator(columns: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Apply a linear map on 32-bit CRC states, given as the images of the 32 unit bits."""
    bits = (states[:, None] >> np.arange(32, dtype=np.int64)) & 1
    return np.bitwise_xor.reduce(np.where(bits == 1, columns[None, :], 0), axis=1)


def _zeros_shift_table(byte_table: np.ndarray, zero_bytes: int) -> np.ndarray:
    """table[k][b] = raw CRC state (b << 8k) advanced over `zero_bytes` zero bytes."""
    assert zero_bytes > 0 and zero_bytes & (zero_bytes - 1) == 0, zero_bytes
    unit_bits = np.left_shift(1, np.arange(32, dtype=np.int64))
    operator = byte_table[unit_bits & 0xFF] ^ (unit_bits >> 8)  # one zero byte
    for _ in range(zero_bytes.bit_length() - 1):  # squaring doubles the zero run
        operator = _apply_operator(operator, operator)
    states = np.arange(256, dtype=np.int64)[None, :] << (8 * np.arange(4, dtype=np.int64))[:, None]
    return _apply_operator(operator, states.ravel()).reshape(4, 256)


_CRC_BYTE_TABLE = _byte_table()
_CRC_SLICING_TABLES = _slicing_tables(_CRC_BYTE_TABLE)
_CRC_LONG_SHIFT = _zeros_shift_table(_CRC_BYTE_TABLE, CRC_LONG_BLOCK_BYTES)
_CRC_SHORT_SHIFT = _zeros_shift_table(_CRC_BYTE_TABLE, CRC_SHORT_BLOCK_BYTES)

# Decided once, at import: on a CPU without SSE4.2 crc32c_hw is never called, so numba
# (which compiles lazily) never emits the instruction.
HAS_SSE42 = bool(llvm_binding.get_host_cpu_features().get("sse4.2", False))


@njit(cache=True)
def crc32c_sw(buf, start, end, crc):
    """CRC32C of buf[start:end] continuing from `crc` (0 to start), slicing-by-8."""
    t = _CRC_SLICING_TABLES
    c = (crc ^ _MASK32) & _MASK32
    p = start
    while end - p >= 8:
        low = c ^ (
            np.int64(buf[p])
            | (np.int64(buf[p + 1]) << 8)
            | (np.int64(buf[p + 2]) << 16)
            | (np.int64(buf[p + 3]) << 24)
        )
        c = (
            t[7, low & 0xFF]
            ^ t[6, (low >> 8) & 0xFF]
            ^ t[5, (low >> 16) & 0xFF]
            ^ t[4, low >> 24]
            ^ t[3, buf[p + 4]]
            ^ t[2, buf[p + 5]]
            ^ t[1, buf[p + 6]]
            ^ t[0, buf[p + 7]]
        )
        p += 8
    while p < end:
        c = t[0, (c ^ np.int64(buf[p])) & 0xFF] ^ (c >> 8)
        p += 1
    return c ^ _MASK32


@intrinsic
def _crc32_u64(typingctx, crc, word):
    """SSE4.2 crc32 over 8 bytes: raw CRC state in, raw CRC state out."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.64.64")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _crc32_u8(typingctx, crc, byte):
    """SSE4.2 crc32 over one byte: raw CRC state in, raw CRC state out."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i32, i8 = ir.IntType(32), ir.IntType(8)
        fnty = ir.FunctionType(i32, [i32, i8])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.32.8")
        state = builder.trunc(args[0], i32)
        result = builder.call(fn, [state, builder.trunc(args[1], i8)])
        return builder.zext(result, ir.IntType(64))

    return sig, codegen


@intrinsic
def _load_u64(typingctx, buf, index):
    """The 8 bytes at buf[index:index+8] as one word, host byte order (x86: little-endian)."""
    if not (isinstance(buf, types.Array) and buf.dtype == types.uint8 and buf.layout == "C"):
        return None
    sig = types.int64(buf, types.intp)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        byte_ptr = builder.gep(array.data, [args[1]])
        word_ptr = builder.bitcast(byte_ptr, ir.IntType(64).as_pointer())
        return builder.load(word_ptr, align=1)

    return sig, codegen


@njit(cache=True)
def _crc_shift(table, c):
    """Raw CRC state `c` advanced over the zero block `table` was built for."""
    return table[0, c & 0xFF] ^ table[1, (c >> 8) & 0xFF] ^ table[2, (c >> 16) & 0xFF] ^ table[3, c >> 24]


@njit(cache=True)
def _crc_hw_blocks(buf, p, end, c0, block_bytes, shift_table):
    """Three interleaved chains over consecutive 3 x block_bytes runs; returns (state, p)."""
    while end - p >= 3 * block_bytes:
        c1 = 0
        c2 = 0
        stop = p + block_bytes
        while p < stop:
            c0 = _crc32_u64(c0, _load_u64(buf, p))
            c1 = _crc32_u64(c1, _load_u64(buf, p + block_bytes))
            c2 = _crc32_u64(c2, _load_u64(buf, p + 2 * block_bytes))
            p += 8
        c0 = _crc_shift(shift_table, c0) ^ c1
        c0 = _crc_shift(shift_table, c0) ^ c2
        p += 2 * block_bytes
    return c0, p


@njit(cache=True)
def crc32c_hw(buf, start, end, crc):
    """CRC32C of buf[start:end] continuing from `crc` (0 to start), SSE4.2 instructions."""
    c = (crc ^ _MASK32) & _MASK32
    c, p = _crc_hw_blocks(buf, start, end, c, CRC_LONG_BLOCK_BYTES, _CRC_LONG_SHIFT)
    c, p = _crc_hw_blocks(buf, p, end, c, CRC_SHORT_BLOCK_BYTES, _CRC_SHORT_SHIFT)
    while end - p >= 8:
        c = _crc32_u64(c, _load_u64(buf, p))
        p += 8
    while p < end:
        c = _crc32_u8(c, np.int64(buf[p]))
        p += 1
    return c ^ _MASK32


if HAS_SSE42:

    @njit(cache=True)
    def crc32c(buf, start, end, crc=0):
        """CRC32C of buf[start:end] continuing from `crc`; the SSE4.2 path on this host."""
        return crc32c_hw(buf, start, end, crc)

else:

    @njit(cache=True)
    def crc32c(buf, start, end, crc=0):
        """CRC32C of buf[start:end] continuing from `crc`; the portable path on this host."""
        return crc32c_sw(buf, start, end, crc)


def crc32c_bytes(data, crc: int = 0) -> int:
    """CRC32C of a bytes-like object, continuing from `crc` (0 to start)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    return int(crc32c(buf, 0, buf.size, crc))


# ---------------------------------------------------------------------------------------
# Fixed-width big-endian fields and zigzag varints (Kafka's ByteUtils).


@njit(cache=True)
def _read_u32(buf, p):
    return (
        (np.int64(buf[p]) << 24)
        | (np.int64(buf[p + 1]) << 16)
        | (np.int64(buf[p + 2]) << 8)
        | np.int64(buf[p + 3])
    )


@njit(cache=True)
def _read_i32(buf, p):
    value = _read_u32(buf, p)
    return value - (1 << 32) if value >= (1 << 31) else value


@njit(cache=True)
def _read_i16(buf, p):
    value = (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
    return value - (1 << 16) if value >= (1 << 15) else value


@njit(cache=True)
def _read_i64(buf, p):
    return (_read_u32(buf, p) << 32) | _read_u32(buf, p + 4)


@njit(cache=True)
def _write_be(out, p, value, width):
    """Write the low `width` bytes of `value` big-endian at out[p]; returns p + width."""
    for i in range(width):
        out[p + width - 1 - i] = (value >> (8 * i)) & 0xFF
    return p + width


@njit(cache=True)
def _read_varint(buf, p, limit, bytes_max):
    """(value, next position) of the zigzag varint at buf[p], or (0, -1) if it is longer
    than bytes_max bytes or runs past limit. With bytes_max 5 the raw value is cut to 32
    bits before unzigzagging, as Kafka's int32 readVarint does."""
    raw = 0
    for i in range(bytes_max):
        if p >= limit:
            return 0, -1
        b = np.int64(buf[p])
        p += 1
        raw |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            if bytes_max == VARINT_BYTES_MAX:
                raw &= _MASK32
            return ((raw >> 1) & _MASK63) ^ -(raw & 1), p
    return 0, -1


@njit(cache=True)
def _zigzag(value):
    return (value << 1) ^ (value >> 63)


@njit(cache=True)
def _varint_size(zigzagged):
    """Bytes of the base-128 encoding of a zigzagged value (unsigned 64-bit pattern)."""
    if zigzagged < 0:  # top bit set: the full 10 bytes
        return VARLONG_BYTES_MAX
    size = 1
    while zigzagged >= 0x80:
        zigzagged >>= 7
        size += 1
    return size


@njit(cache=True)
def _write_varint(out, p, zigzagged):
    """Write a zigzagged value base-128 at out[p]; returns the next position."""
    while zigzagged & ~0x7F != 0:
        out[p] = (zigzagged & 0x7F) | 0x80
        zigzagged = (zigzagged >> 7) & (_MASK63 >> 6)
        p += 1
    out[p] = zigzagged
    return p + 1


# ---------------------------------------------------------------------------------------
# Validation and scanning.


@njit(cache=True)
def _skip_bytes_field(buf, p, limit, nullable):
    """Position after a varint length + bytes field at buf[p], or -1 if malformed."""
    length, p = _read_varint(buf, p, limit, VARINT_BYTES_MAX)
    if p < 0 or length < -1 or (length == -1 and not nullable) or length > limit - p:
        return -1
    return p + max(length, 0)


@njit(cache=True)
def _check_record_body(buf, p, record_end, offset_delta_expected):
    """Position after the record body at buf[p] (attributes first), or -1 if malformed."""
    p += 1  # attributes: unused by Kafka, any value accepted
    _, p = _read_varint(buf, p, record_end, VARLONG_BYTES_MAX)  # timestampDelta
    if p < 0:
        return -1
    offset_delta, p = _read_varint(buf, p, record_end, VARINT_BYTES_MAX)
    if p < 0 or offset_delta != offset_delta_expected:
        return -1
    p = _skip_bytes_field(buf, p, record_end, True)  # key
    if p < 0:
        return -1
    p = _skip_bytes_field(buf, p, record_end, True)  # value
    if p < 0:
        return -1
    headers_count, p = _read_varint(buf, p, record_end, VARINT_BYTES_MAX)
    if p < 0 or headers_count < 0:
        return -1
    for _ in range(headers_count):
        p = _skip_bytes_field(buf, p, record_end, False)  # header key: a string, never null
        if p < 0:
            return -1
        p = _skip_bytes_field(buf, p, record_end, True)  # header value
        if p < 0:
            return -1
    return p


@njit(cache=True)
def validate_records(buf, p, end, records_count, last_offset_delta):
    """OK if buf[p:end] is exactly `records_count` well-formed records with offset deltas
    0..n-1 and last_offset_delta == n-1; ERR_RECORDS otherwise. A batch holds >= 1 record."""
    if records_count < 1 or last_offset_delta != records_count - 1:
        return ERR_RECORDS
    if records_count > (end - p) // RECORD_MIN_BYTES:
        return ERR_RECORDS
    for i in range(records_count):
        length, p = _read_varint(buf, p, end, VARINT_BYTES_MAX)
        if p < 0 or length < RECORD_MIN_BYTES - 1 or length > end - p:
            return ERR_RECORDS
        record_end = p + length
        if _check_record_body(buf, p, record_end, i) != record_end:
            return ERR_RECORDS
        p = record_end
    return OK if p == end else ERR_RECORDS


@njit(cache=True)
def validate_batch(buf, pos, end, max_batch_bytes):
    """Error code of the batch at buf[pos:end] (OK = 0): header fits, batchLength in
    [BATCH_LENGTH_MIN, max_batch_bytes] and within end, magic 2, CRC32C, and for
    uncompressed batches every record in bounds and consistent with the header."""
    end = min(end, buf.size)
    if end - pos < RECORD_BATCH_OVERHEAD:
        return ERR_SHORT
    batch_length = _read_i32(buf, pos + LENGTH_OFFSET)
    if batch_length < BATCH_LENGTH_MIN or batch_length > max_batch_bytes:
        return ERR_LENGTH
    batch_end = pos + LOG_OVERHEAD + batch_length
    if batch_end > end:
        return ERR_SHORT
    if buf[pos + MAGIC_OFFSET] != MAGIC_V2:
        return ERR_MAGIC
    if crc32c(buf, pos + ATTRIBUTES_OFFSET, batch_end, 0) != _read_u32(buf, pos + CRC_OFFSET):
        return ERR_CRC
    codec = _read_i16(buf, pos + ATTRIBUTES_OFFSET) & COMPRESSION_CODEC_MASK
    if codec > CODEC_MAX:
        return ERR_COMPRESSION
    if codec != 0:
        return OK  # records are compressed: header and CRC are all a kernel can check
    records_count = _read_i32(buf, pos + RECORDS_COUNT_OFFSET)
    last_offset_delta = _read_i32(buf, pos + LAST_OFFSET_DELTA_OFFSET)
    return validate_records(buf, pos + RECORDS_OFFSET, batch_end, records_count, last_offset_delta)


@njit(cache=True)
def scan_batches(buf, start, end, max_batch_bytes, positions, base_offsets, last_offsets,
                 max_timestamps, sizes):
    """Walk and validate consecutive batches from `start`, one output row per valid batch.

    Returns (count, valid_end, error_code): error_code != OK means the batch at valid_end
    is invalid (ERR_SHORT: a torn tail); OK with valid_end == end means every byte up to
    end is valid batches; OK with valid_end < end means the arrays are full: call again
    from valid_end.
    """
    capacity = min(positions.size, base_offsets.size, last_offsets.size,
                   max_timestamps.size, sizes.size)
    end = min(end, buf.size)
    count = 0
    pos = start
    while pos < end:
        if count == capacity:
            return count, pos, OK
        code = validate_batch(buf, pos, end, max_batch_bytes)
        if code != OK:
            return count, pos, code
        base_offset = _read_i64(buf, pos)
        size = LOG_OVERHEAD + _read_i32(buf, pos + LENGTH_OFFSET)
        positions[count] = pos
        base_offsets[count] = base_offset
        last_offsets[count] = base_offset + _read_i32(buf, pos + LAST_OFFSET_DELTA_OFFSET)
        max_timestamps[count] = _read_i64(buf, pos + MAX_TIMESTAMP_OFFSET)
        sizes[count] = size
        count += 1
        pos += size
    return count, pos, OK


# ---------------------------------------------------------------------------------------
# Partitioning: Kafka's Utils.murmur2 and the default partitioner's toPositive.
_MURMUR2_SEED = 0x9747B28C
_MURMUR2_M = 0x5BD1E995


@njit(cache=True)
def murmur2(buf, start, end):
    """Kafka's Utils.murmur2 of buf[start:end], as the signed int32 Java returns."""
    length = end - start
    h = (_MURMUR2_SEED ^ length) & _MASK32
    p = start
    for _ in range(length // 4):
        k = (
            np.int64(buf[p])
            | (np.int64(buf[p + 1]) << 8)
            | (np.int64(buf[p + 2]) << 16)
            | (np.int64(buf[p + 3]) << 24)
        )
        k = (k * _MURMUR2_M) & _MASK32
        k ^= k >> 24
        k = (k * _MURMUR2_M) & _MASK32
        h = ((h * _MURMUR2_M) & _MASK32) ^ k
        p += 4
    extra = length & 3
    if extra >= 3:
        h ^= np.int64(buf[p + 2]) << 16
    if extra >= 2:
        h ^= np.int64(buf[p + 1]) << 8
    if extra >= 1:
        h ^= np.int64(buf[p])
        h = (h * _MURMUR2_M) & _MASK32
    h ^= h >> 13
    h = (h * _MURMUR2_M) & _MASK32
    h ^= h >> 15
    return np.int32(h - (1 << 32) if h >= (1 << 31) else h)


@njit(cache=True)
def partition_for_key(buf, start, end, num_partitions):
    """Kafka's default partition for a non-null key: toPositive(murmur2(key)) % n."""
    return (np.int64(murmur2(buf, start, end)) & 0x7FFFFFFF) % num_partitions
