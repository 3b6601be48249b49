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
ENC_ERR_HEADERS = -6  # a pre-encoded header region does not parse as Kafka headers

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


@intrinsic
def borrowed(typingctx, array):
    """The same array view without its owner reference.

    numba brackets every call that passes an owned array with atomic reference-count
    updates, which cost more than parsing a small record; a borrowed view (null meminfo,
    as numba.carray makes) skips them. Only for use inside a kernel whose caller holds
    the array for the whole call; never return it.
    """
    if not isinstance(array, types.Array):
        return None
    sig = array(array)

    def codegen(context, builder, signature, args):
        source = context.make_array(signature.args[0])(context, builder, args[0])
        view = context.make_array(signature.return_type)(context, builder)
        cgutils.copy_struct(view, source)
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()

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
def zigzag(value):
    return (value << 1) ^ (value >> 63)


@njit(cache=True)
def _varint_size(zigzagged):
    """Bytes of the base-128 encoding of a zigzagged value (unsigned 64-bit pattern)."""
    if zigzagged < 0:  # top bit set: the full 10 bytes
        return VARLONG_BYTES_MAX
    # Predictable comparisons, not a loop: this runs several times per encoded record.
    if zigzagged < (1 << 7):
        return 1
    if zigzagged < (1 << 14):
        return 2
    if zigzagged < (1 << 21):
        return 3
    if zigzagged < (1 << 28):
        return 4
    size = 5
    zigzagged >>= 35
    while zigzagged > 0:
        zigzagged >>= 7
        size += 1
    return size


@njit(cache=True)
def write_varint(out, p, zigzagged):
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
    buf = borrowed(buf)
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
def verify_batches(buf, start, end, max_batch_bytes):
    """Validate the consecutive whole batches in buf[start:end] (a read about to be
    served): (end of the valid prefix, error code of the first bad batch or OK, last
    offset of the last valid batch or -1). No allocation, unlike scan_batches."""
    pos = start
    last_offset = -1
    while pos < end:
        code = validate_batch(buf, pos, end, max_batch_bytes)
        if code != OK:
            return pos, code, last_offset
        last_offset = _read_i64(buf, pos) + _read_i32(buf, pos + LAST_OFFSET_DELTA_OFFSET)
        pos += LOG_OVERHEAD + _read_i32(buf, pos + LENGTH_OFFSET)
    return pos, OK, last_offset


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


# ---------------------------------------------------------------------------------------
# Encoding many records into one batch in one call.


@njit(cache=True)
def _field_bytes(length):
    """Bytes a nullable length-prefixed field takes (length -1: null, one byte)."""
    return 1 if length < 0 else _varint_size(zigzag(length)) + length


@njit(cache=True)
def _slice_ok(offset, length, size, nullable):
    """True if (offset, length) lies inside a buffer of `size` bytes (-1 = null if nullable)."""
    if length < 0:
        return length == -1 and nullable
    return offset >= 0 and offset <= size - length


@intrinsic
def _memcpy(typingctx, out, out_index, src, src_index, length):
    """out[out_index:][:length] = src[src_index:][:length] as one llvm.memcpy, unchecked
    (a byte loop is ~10x slower: LLVM cannot prove the arrays do not overlap). A length of
    0 is a no-op."""
    for array in (out, src):
        if not (isinstance(array, types.Array) and array.dtype == types.uint8 and array.layout == "C"):
            return None
    sig = types.void(out, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        out_array = context.make_array(signature.args[0])(context, builder, args[0])
        src_array = context.make_array(signature.args[2])(context, builder, args[2])
        dst = builder.gep(out_array.data, [args[1]])
        source = builder.gep(src_array.data, [args[3]])
        cgutils.raw_memcpy(builder, dst, source, args[4], 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _headers_ok(buf, p, end):
    """True if buf[p:end] is a headersCount varint and exactly that many headers."""
    count, p = _read_varint(buf, p, end, VARINT_BYTES_MAX)
    if p < 0 or count < 0:
        return False
    for _ in range(count):
        p = _skip_bytes_field(buf, p, end, False)
        if p < 0:
            return False
        p = _skip_bytes_field(buf, p, end, True)
        if p < 0:
            return False
    return p == end


@njit(cache=True)
def _record_body_bytes(timestamp_zz, offset_zz, key_length, value_length, header_length):
    """Bytes of a record after its length varint (header_length 0: one headersCount byte)."""
    return (1 + _varint_size(timestamp_zz) + _varint_size(offset_zz) + _field_bytes(key_length)
            + _field_bytes(value_length) + max(header_length, 1))


@njit(cache=True)
def _write_batch_header(out, pos, end, records_count, base_offset, base_timestamp_ms,
                        timestamp_max_ms, producer_id, producer_epoch, base_sequence,
                        partition_leader_epoch):
    """Fill the 61-byte header of the records already at out[pos+61:end], CRC last."""
    _write_be(out, pos, base_offset, 8)
    _write_be(out, pos + LENGTH_OFFSET, end - pos - LOG_OVERHEAD, 4)
    _write_be(out, pos + PARTITION_LEADER_EPOCH_OFFSET, partition_leader_epoch, 4)
    out[pos + MAGIC_OFFSET] = MAGIC_V2
    _write_be(out, pos + ATTRIBUTES_OFFSET, 0, 2)  # uncompressed, CreateTime, not transactional
    _write_be(out, pos + LAST_OFFSET_DELTA_OFFSET, records_count - 1, 4)
    _write_be(out, pos + BASE_TIMESTAMP_OFFSET, base_timestamp_ms, 8)
    _write_be(out, pos + MAX_TIMESTAMP_OFFSET, timestamp_max_ms, 8)
    _write_be(out, pos + PRODUCER_ID_OFFSET, producer_id, 8)
    _write_be(out, pos + PRODUCER_EPOCH_OFFSET, producer_epoch, 2)
    _write_be(out, pos + BASE_SEQUENCE_OFFSET, base_sequence, 4)
    _write_be(out, pos + RECORDS_COUNT_OFFSET, records_count, 4)
    _write_be(out, pos + CRC_OFFSET, crc32c(out, pos + ATTRIBUTES_OFFSET, end, 0), 4)


@njit(cache=True)
def _slices_ok(offsets, lengths, size, nullable):
    """True if every (offset, length) pair lies inside a buffer of `size` bytes."""
    for i in range(lengths.size):
        if not _slice_ok(offsets[i], lengths[i], size, nullable):
            return False
    return True


@njit(cache=True)
def _encode_inputs_error(values_buf, value_offsets, value_lengths, keys_buf, key_offsets,
                         key_lengths, timestamps_ms, headers_buf, header_offsets, header_lengths):
    """0 if the per-record arrays agree in size, point inside their buffers, headers parse
    and timestamps are Kafka-valid; else the ENC_ERR_* code. Checked in a pass of its own
    so the writing loop stays branch-light."""
    n = timestamps_ms.size
    if n == 0:
        return ENC_ERR_EMPTY
    if value_offsets.size != n or value_lengths.size != n:
        return ENC_ERR_SLICE
    if key_offsets.size != n or key_lengths.size != n:
        return ENC_ERR_SLICE
    if header_lengths.size != 0 and (header_lengths.size != n or header_offsets.size != n):
        return ENC_ERR_SLICE
    if not (_slices_ok(value_offsets, value_lengths, values_buf.size, True)
            and _slices_ok(key_offsets, key_lengths, keys_buf.size, True)
            and _slices_ok(header_offsets, header_lengths, headers_buf.size, False)):
        return ENC_ERR_SLICE
    for i in range(header_lengths.size):
        at = header_offsets[i]
        if header_lengths[i] != 0 and not _headers_ok(headers_buf, at, at + header_lengths[i]):
            return ENC_ERR_HEADERS
    if timestamps_ms.min() < NO_TIMESTAMP:
        return ENC_ERR_TIMESTAMP
    return 0


@njit(cache=True)
def encode_records(values_buf, value_offsets, value_lengths, keys_buf, key_offsets, key_lengths,
                   timestamps_ms, headers_buf, header_offsets, header_lengths, base_offset,
                   producer_id, producer_epoch, base_sequence, partition_leader_epoch, out, out_pos):
    """Encode records i = 0..n-1 as one uncompressed batch at out[out_pos:]; returns its end.

    Record i is values_buf[value_offsets[i]:][:value_lengths[i]] (length -1: null), likewise
    its key; its headers are header_lengths[i] pre-encoded bytes from the headersCount varint
    on (0: no headers; empty header arrays: no record has headers). Offsets are assigned by
    position (delta i); baseTimestamp is the first record's (as Kafka). `out` must not overlap any
    input. Returns a negative ENC_ERR_* code, having written nothing meaningful, if the
    inputs are invalid or out is too small (encoded_size_upper_bound always suffices).
    """
    code = _encode_inputs_error(values_buf, value_offsets, value_lengths, keys_buf, key_offsets,
                                key_lengths, timestamps_ms, headers_buf, header_offsets,
                                header_lengths)
    if code != 0:
        return code
    if out_pos < 0 or out.size - out_pos < RECORD_BATCH_OVERHEAD:
        return ENC_ERR_OUT_TOO_SMALL
    # Kafka's MemoryRecordsBuilder takes the first record's timestamp as the base; deltas
    # of later, older records are negative (the varlong is signed), and the bytes match Kafka's.
    base_timestamp_ms = timestamps_ms[0]
    has_headers = header_lengths.size != 0
    p = out_pos + RECORDS_OFFSET
    # One loop body, no calls taking several arrays: numba brackets such calls with atomic
    # reference counting, which would cost more than the record itself.
    for i in range(timestamps_ms.size):
        timestamp_zz = zigzag(timestamps_ms[i] - base_timestamp_ms)
        key_length, value_length = key_lengths[i], value_lengths[i]
        header_length = header_lengths[i] if has_headers else 0
        body_bytes = _record_body_bytes(timestamp_zz, zigzag(i), key_length, value_length, header_length)
        if p + VARINT_BYTES_MAX + body_bytes > out.size:
            return ENC_ERR_OUT_TOO_SMALL
        p = write_varint(out, p, zigzag(body_bytes))
        out[p] = 0  # record attributes: unused by Kafka
        p = write_varint(out, p + 1, timestamp_zz)
        p = write_varint(out, p, zigzag(i))
        p = write_varint(out, p, zigzag(key_length))
        _memcpy(out, p, keys_buf, key_offsets[i], max(key_length, 0))
        p = write_varint(out, p + max(key_length, 0), zigzag(value_length))
        _memcpy(out, p, values_buf, value_offsets[i], max(value_length, 0))
        p += max(value_length, 0)
        if header_length == 0:
            out[p] = 0  # headersCount 0
            p += 1
        else:
            _memcpy(out, p, headers_buf, header_offsets[i], header_length)
            p += header_length
    if p - out_pos - LOG_OVERHEAD > BATCH_LENGTH_MAX:
        return ENC_ERR_TOO_LARGE
    _write_batch_header(out, out_pos, p, timestamps_ms.size, base_offset, base_timestamp_ms,
                        timestamps_ms.max(), producer_id, producer_epoch, base_sequence,
                        partition_leader_epoch)
    return p


@njit(cache=True)
def encoded_size_upper_bound(value_lengths, key_lengths, header_lengths):
    """Bytes that always suffice for encode_records over these records."""
    total = RECORD_BATCH_OVERHEAD + value_lengths.size * RECORD_OVERHEAD_BYTES_MAX
    for i in range(value_lengths.size):
        total += max(value_lengths[i], 0) + max(key_lengths[i], 0)
    for i in range(header_lengths.size):
        total += max(header_lengths[i], 0)
    return total


# ---------------------------------------------------------------------------------------
# Decoding records into columns (positions into the same buffer, no copies).

# Rows of the int64 `columns` array filled by decode_records / decode_columns_into.
COL_OFFSET = 0
COL_TIMESTAMP_MS = 1
COL_KEY_OFFSET = 2
COL_KEY_LENGTH = 3  # -1: null key
COL_VALUE_OFFSET = 4
COL_VALUE_LENGTH = 5  # -1: null value
COL_HEADER_OFFSET = 6  # from the headersCount varint on, as encode_records takes them
COL_HEADER_LENGTH = 7  # 0: no headers
COLUMNS = 8


@njit(cache=True)
def _decode_record(buf, p, columns, row, base_offset, base_timestamp_ms, log_append_time,
                   max_timestamp_ms):
    """Fill columns[:, row] from the validated record at buf[p]; returns the next position."""
    length, p = _read_varint(buf, p, buf.size, VARINT_BYTES_MAX)
    record_end = p + length
    timestamp_delta, p = _read_varint(buf, p + 1, record_end, VARLONG_BYTES_MAX)
    offset_delta, p = _read_varint(buf, p, record_end, VARINT_BYTES_MAX)
    key_length, p = _read_varint(buf, p, record_end, VARINT_BYTES_MAX)
    columns[COL_KEY_OFFSET, row] = p
    columns[COL_KEY_LENGTH, row] = key_length
    value_length, p = _read_varint(buf, p + max(key_length, 0), record_end, VARINT_BYTES_MAX)
    columns[COL_VALUE_OFFSET, row] = p
    columns[COL_VALUE_LENGTH, row] = value_length
    p += max(value_length, 0)
    headers_count, _ = _read_varint(buf, p, record_end, VARINT_BYTES_MAX)
    columns[COL_HEADER_OFFSET, row] = p
    columns[COL_HEADER_LENGTH, row] = record_end - p if headers_count > 0 else 0
    columns[COL_OFFSET, row] = base_offset + offset_delta
    if log_append_time:
        columns[COL_TIMESTAMP_MS, row] = max_timestamp_ms
    else:
        columns[COL_TIMESTAMP_MS, row] = base_timestamp_ms + timestamp_delta
    return record_end


@njit(cache=True)
def decode_records(buf, p, records_count, base_offset, base_timestamp_ms, log_append_time,
                   max_timestamp_ms, columns, row):
    """Fill columns[:, row:row+records_count] from records at buf[p] that validate_records
    accepted. In a LogAppendTime batch every record's timestamp is the batch's
    maxTimestamp, as in Kafka. Returns the position after the records."""
    buf = borrowed(buf)
    columns = borrowed(columns)
    for i in range(records_count):
        p = _decode_record(buf, p, columns, row + i, base_offset, base_timestamp_ms,
                           log_append_time, max_timestamp_ms)
    return p


@njit(cache=True)
def count_records(buf, start, end):
    """Upper bound on the records of the complete batches in buf[start:end], from their
    headers only (each count capped by what the batch's bytes could hold)."""
    end = min(end, buf.size)
    total = 0
    pos = start
    while end - pos >= RECORD_BATCH_OVERHEAD:
        batch_length = _read_i32(buf, pos + LENGTH_OFFSET)
        if batch_length < BATCH_LENGTH_MIN or batch_length > end - pos - LOG_OVERHEAD:
            break
        records_count = _read_i32(buf, pos + RECORDS_COUNT_OFFSET)
        total += max(0, min(records_count, (batch_length - BATCH_LENGTH_MIN) // RECORD_MIN_BYTES))
        pos += LOG_OVERHEAD + batch_length
    return total


@njit(cache=True)
def decode_columns_into(buf, start, end, max_batch_bytes, columns):
    """Validate and decode consecutive uncompressed batches from `start` into columns.

    Returns (n_records, bytes_consumed, error_code). Stops with OK at end, at a partial
    batch at the tail (a fetch response may end with one; it is not an error), or before a
    batch whose records do not fit the columns. Any other invalid batch stops with its code,
    bytes_consumed pointing at it; a compressed batch stops with ERR_COMPRESSION.
    """
    end = min(end, buf.size)
    capacity = columns.shape[1]
    row = 0
    pos = start
    while pos < end:
        code = validate_batch(buf, pos, end, max_batch_bytes)
        if code == ERR_SHORT:
            break
        if code != OK:
            return row, pos - start, code
        attributes = _read_i16(buf, pos + ATTRIBUTES_OFFSET)
        if attributes & COMPRESSION_CODEC_MASK != 0:
            return row, pos - start, ERR_COMPRESSION
        records_count = _read_i32(buf, pos + RECORDS_COUNT_OFFSET)
        if row + records_count > capacity:
            break
        decode_records(buf, pos + RECORDS_OFFSET, records_count, _read_i64(buf, pos),
                       _read_i64(buf, pos + BASE_TIMESTAMP_OFFSET),
                       attributes & TIMESTAMP_TYPE_MASK != 0,
                       _read_i64(buf, pos + MAX_TIMESTAMP_OFFSET), columns, row)
        row += records_count
        pos += LOG_OVERHEAD + _read_i32(buf, pos + LENGTH_OFFSET)
    return row, pos - start, OK


# ---------------------------------------------------------------------------------------


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for both buffer kinds the
    appliance passes, read-only (bytes, zero-copy frames) and writable (bytearray, numpy,
    mmap), so the first real batch does not pay seconds of compilation. Call before READY."""
    raw_header = b"\x02\x02k\x02v"  # headersCount 1, key "k", value "v"
    zero = np.zeros(1, dtype=np.int64)
    for kind in (bytes, bytearray):  # numpy views of these are read-only and writable
        data = np.frombuffer(kind(raw_header), dtype=np.uint8)
        sizes = np.full(1, data.size, dtype=np.int64)
        out = np.zeros(encoded_size_upper_bound(sizes, sizes, sizes), dtype=np.uint8)
        end = encode_records(data, zero, sizes, data, zero, sizes, zero, data, zero, sizes,
                             0, -1, -1, -1, -1, out, 0)
        assert end > 0, end
        batch = np.frombuffer(kind(out[:end]), dtype=np.uint8)
        crc32c(batch, 0, batch.size)
        crc32c_sw(batch, 0, batch.size, 0)
        if HAS_SSE42:
            crc32c_hw(batch, 0, batch.size, 0)
        assert validate_batch(batch, 0, batch.size, BATCH_LENGTH_MAX) == OK
        rows = [np.zeros(1, dtype=np.int64) for _ in range(5)]
        scan_batches(batch, 0, batch.size, BATCH_LENGTH_MAX, *rows)
        count_records(batch, 0, batch.size)
        verify_batches(batch, 0, batch.size, BATCH_LENGTH_MAX)
        decode_columns_into(batch, 0, batch.size, BATCH_LENGTH_MAX, np.zeros((COLUMNS, 1), dtype=np.int64))
        partition_for_key(data, 0, data.size, 1)
