"""ingest wire protocol v1: a sans-IO codec between ZeroMQ frames and message objects.

Pure functions over bytes/memoryview; no socket is imported here (docs/PROTOCOL.md is the
byte-by-byte spec, written for firmware developers; this module is its reference).

- One ZeroMQ frame per message. On ROUTER sockets the routing-identity frame belongs to
  the socket layer and never reaches this codec.
- Integers are little-endian, except inside the embedded Kafka RecordBatch (BATCH
  requests, FETCH replies), which stays Kafka's big-endian bytes, untouched.
- Every frame starts with the same 8 bytes, frozen across versions so that any peer can
  answer any version with UNSUPPORTED_VERSION and the right correlation id:

      u8 version | u8 msg_type | u16 flags | u32 correlation_id

- A reply's msg_type is the request's | REPLY_BIT, with the same correlation_id, then
  u16 error_code, u16 reserved; then the type's reply body, or for error_code != 0 the
  error body (i32 partition or -1, UTF-8 message to the end of the frame).
- Encoding is canonical: reserved bits and bytes are zero, a missing timestamp is written
  as 0, so every message has exactly one encoding and decode(encode(m)) == m.
- Decoders never copy payloads: record keys/values/header values, BATCH batches and
  FETCH records are memoryview slices of the input frame (which they keep alive).
- Malformed input of any kind raises WireError (with the error code to reply with);
  encoders run the same checks, so they only produce frames the decoders accept.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, ClassVar, NamedTuple, Union

import orjson

from ingest.net.errors import ErrorCode, IngestError, WireError
from ingest.shards import layout

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------
# Limits. Each bounds what one peer can make the other allocate or loop over.

# Every socket sets zmq MAXMSGSIZE to this. 16 MiB holds the largest SDK batch with room to
# spare (Kafka's default max.message.bytes is 1 MiB) and bounds a worker's memory per frame.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Kafka's own bound (Topic.MAX_NAME_LENGTH): a partition directory "<topic>-<p>" must stay
# within a 255-byte file name.
MAX_TOPIC_BYTES = 249
# Same charset and bound as topics, so a group id is always safe as a file name.
MAX_GROUP_BYTES = 249
# Headers per record: headers are metadata, not payload; bounds the decode loop per frame.
MAX_HEADERS = 64
# Entries of one OFFSET_COMMIT/OFFSET_FETCH request and partitions of one topic: far more
# than one machine's cores can serve, small enough that a request is cheap to check.
MAX_PARTITIONS = 4096
# An error message is one line for a human; bounds what an error reply carries.
MAX_ERROR_MESSAGE_BYTES = 1024
# Longest FETCH long poll. Clients must time requests out later than this.
MAX_FETCH_WAIT_MS = 30_000

# ---------------------------------------------------------------------------------------
# Common header, every frame. Offsets are chained so that they cannot overlap or drift.

VERSION_OFFSET = 0
VERSION_LENGTH = 1
MSG_TYPE_OFFSET = VERSION_OFFSET + VERSION_LENGTH
MSG_TYPE_LENGTH = 1
FLAGS_OFFSET = MSG_TYPE_OFFSET + MSG_TYPE_LENGTH
FLAGS_LENGTH = 2
CORRELATION_ID_OFFSET = FLAGS_OFFSET + FLAGS_LENGTH
CORRELATION_ID_LENGTH = 4
HEADER_BYTES = CORRELATION_ID_OFFSET + CORRELATION_ID_LENGTH

REPLY_BIT = 0x80

# Reply header: the common header, then these.
REPLY_ERROR_CODE_OFFSET = HEADER_BYTES
REPLY_ERROR_CODE_LENGTH = 2
REPLY_RESERVED_OFFSET = REPLY_ERROR_CODE_OFFSET + REPLY_ERROR_CODE_LENGTH
REPLY_RESERVED_LENGTH = 2
REPLY_HEADER_BYTES = REPLY_RESERVED_OFFSET + REPLY_RESERVED_LENGTH

# flags of RECORD and BATCH requests
FLAGS_ACKS_MASK = 0x0003
RECORD_FLAG_NULL_VALUE = 0x0004     # value is null (a tombstone); nothing follows the headers
RECORD_FLAG_HAS_TIMESTAMP = 0x0008  # timestamp_ms is set; else the appliance stamps arrival
RECORD_FLAGS_KNOWN = FLAGS_ACKS_MASK | RECORD_FLAG_NULL_VALUE | RECORD_FLAG_HAS_TIMESTAMP
BATCH_FLAGS_KNOWN = FLAGS_ACKS_MASK

# RECORD request: header, fixed fields, then topic, key, headers, value (rest of frame).
# The numba kernel in the worker parses RECORD frames in bulk with these constants.
RECORD_TOPIC_LENGTH_OFFSET = HEADER_BYTES
RECORD_TOPIC_LENGTH_LENGTH = 1
RECORD_RESERVED_OFFSET = RECORD_TOPIC_LENGTH_OFFSET + RECORD_TOPIC_LENGTH_LENGTH
RECORD_RESERVED_LENGTH = 1
RECORD_HEADER_COUNT_OFFSET = RECORD_RESERVED_OFFSET + RECORD_RESERVED_LENGTH
RECORD_HEADER_COUNT_LENGTH = 2
RECORD_KEY_LENGTH_OFFSET = RECORD_HEADER_COUNT_OFFSET + RECORD_HEADER_COUNT_LENGTH
RECORD_KEY_LENGTH_LENGTH = 4
RECORD_TIMESTAMP_OFFSET = RECORD_KEY_LENGTH_OFFSET + RECORD_KEY_LENGTH_LENGTH
RECORD_TIMESTAMP_LENGTH = 8
RECORD_PARTITION_OFFSET = RECORD_TIMESTAMP_OFFSET + RECORD_TIMESTAMP_LENGTH
RECORD_PARTITION_LENGTH = 4
RECORD_FIXED_BYTES = RECORD_PARTITION_OFFSET + RECORD_PARTITION_LENGTH
RECORD_TOPIC_OFFSET = RECORD_FIXED_BYTES
# Each record header: u16 name length, name (UTF-8), i32 value length (-1 = null), value.
RECORD_HEADER_NAME_LENGTH_LENGTH = 2
RECORD_HEADER_VALUE_LENGTH_LENGTH = 4

# BATCH request: header, fixed fields, topic, then one Kafka RecordBatch (rest of frame).
BATCH_TOPIC_LENGTH_OFFSET = HEADER_BYTES
BATCH_TOPIC_LENGTH_LENGTH = 1
BATCH_RESERVED_OFFSET = BATCH_TOPIC_LENGTH_OFFSET + BATCH_TOPIC_LENGTH_LENGTH
BATCH_RESERVED_LENGTH = 3
BATCH_PARTITION_OFFSET = BATCH_RESERVED_OFFSET + BATCH_RESERVED_LENGTH
BATCH_PARTITION_LENGTH = 4
BATCH_FIXED_BYTES = BATCH_PARTITION_OFFSET + BATCH_PARTITION_LENGTH
BATCH_TOPIC_OFFSET = BATCH_FIXED_BYTES

AUTO_PARTITION = -1      # RECORD partition: the appliance picks (murmur2(key), or sticky)
NULL_LENGTH = -1         # key/header value length of a null
EARLIEST_TIMESTAMP = -2  # LIST_OFFSETS: the log start offset (Kafka's value)
LATEST_TIMESTAMP = -1    # LIST_OFFSETS: the log end offset (Kafka's value)
NO_OFFSET = -1           # replies: no such offset / nothing committed

# The fixed part of each message, header included (field order in PROTOCOL.md).
_HEADER = struct.Struct("<BBHI")
_RECORD = struct.Struct("<BBHIBBHiqi")
_BATCH = struct.Struct("<BBHIBBHi")
_FETCH = struct.Struct("<BBHIBBHiqiii")
_LIST_OFFSETS = struct.Struct("<BBHIBBHiq")
_OFFSETS = struct.Struct("<BBHIBBHI")  # OFFSET_COMMIT and OFFSET_FETCH
_COMMIT_ENTRY = struct.Struct("<iq")
_PARTITION_ENTRY = struct.Struct("<i")
_REPLY = struct.Struct("<BBHIHH")
_PRODUCE_REPLY = struct.Struct("<BBHIHHiqqBBH")
_FETCH_REPLY = struct.Struct("<BBHIHHiqqq")
_LIST_OFFSETS_REPLY = struct.Struct("<BBHIHHiqq")
_OFFSET_FETCH_REPLY = struct.Struct("<BBHIHHI")
_OFFSET_FETCH_ENTRY = struct.Struct("<iq")
_ERROR_REPLY = struct.Struct("<BBHIHHi")
# Replication (ingest/replication/): a follower's fetch, and Kafka's OffsetsForLeaderEpoch.
_REPLICA_FETCH = struct.Struct("<BBHIBBHiqiii")
_REPLICA_FETCH_REPLY = struct.Struct("<BBHIHHiqqqii")
_EPOCH_END_OFFSET = struct.Struct("<BBHIBBHii")
_EPOCH_END_OFFSET_REPLY = struct.Struct("<BBHIHHiiq")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_BATCH_LENGTH = struct.Struct(">i")  # Kafka's batchLength, big-endian like all of Kafka's

FETCH_FIXED_BYTES = _FETCH.size
LIST_OFFSETS_BYTES = _LIST_OFFSETS.size
OFFSETS_FIXED_BYTES = _OFFSETS.size
PRODUCE_REPLY_BYTES = _PRODUCE_REPLY.size
FETCH_REPLY_FIXED_BYTES = _FETCH_REPLY.size
LIST_OFFSETS_REPLY_BYTES = _LIST_OFFSETS_REPLY.size
OFFSET_FETCH_REPLY_FIXED_BYTES = _OFFSET_FETCH_REPLY.size
ERROR_REPLY_FIXED_BYTES = _ERROR_REPLY.size
# A FETCH reply must fit one frame, records included.
MAX_FETCH_BYTES = MAX_FRAME_BYTES - FETCH_REPLY_FIXED_BYTES

assert _HEADER.size == HEADER_BYTES == 8
assert _REPLY.size == REPLY_HEADER_BYTES == 12
assert _RECORD.size == RECORD_FIXED_BYTES == 28
assert _BATCH.size == BATCH_FIXED_BYTES == 16
assert (FETCH_FIXED_BYTES, LIST_OFFSETS_BYTES, OFFSETS_FIXED_BYTES) == (36, 24, 16)
assert (PRODUCE_REPLY_BYTES, FETCH_REPLY_FIXED_BYTES, LIST_OFFSETS_REPLY_BYTES) == (36, 40, 32)
assert (OFFSET_FETCH_REPLY_FIXED_BYTES, ERROR_REPLY_FIXED_BYTES) == (16, 16)
REPLICA_FETCH_FIXED_BYTES = _REPLICA_FETCH.size
REPLICA_FETCH_REPLY_FIXED_BYTES = _REPLICA_FETCH_REPLY.size
EPOCH_END_OFFSET_BYTES = _EPOCH_END_OFFSET.size
EPOCH_END_OFFSET_REPLY_BYTES = _EPOCH_END_OFFSET_REPLY.size
assert (REPLICA_FETCH_FIXED_BYTES, REPLICA_FETCH_REPLY_FIXED_BYTES) == (36, 48)
assert (EPOCH_END_OFFSET_BYTES, EPOCH_END_OFFSET_REPLY_BYTES) == (20, 28)
# A replica id names the fetching appliance (its appliance_id): at most this many bytes.
MAX_REPLICA_ID_BYTES = 64
NO_EPOCH = -1  # EPOCH_END_OFFSET: the follower's log has no leader epoch yet

# Kafka's topic charset ([a-zA-Z0-9._-]); groups use it too.
NAME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
# 256 bytes, 1 where a byte may appear in a topic or group: for kernels (np.frombuffer).
NAME_BYTE_ALLOWED = bytes(1 if b in NAME_CHARS else 0 for b in range(256))
_NAME_RE = re.compile(rb"[a-zA-Z0-9._-]{1,249}")
# Names already checked: every RECORD frame repeats its topic, and checking it again costs
# more than the rest of the header. An appliance has few topics and groups; the bound
# stops a peer sending endless distinct names from growing the cache.
MAX_CACHED_NAMES = 1024
_VALID_NAMES: dict[bytes, str] = {}
assert MAX_TOPIC_BYTES == MAX_GROUP_BYTES == 249  # _NAME_RE's bound

Buffer = Union[bytes, bytearray, memoryview]


class MsgType(IntEnum):
    RECORD = 0x01
    BATCH = 0x02
    FETCH = 0x03
    LIST_OFFSETS = 0x04
    OFFSET_COMMIT = 0x05
    OFFSET_FETCH = 0x06
    METADATA = 0x07
    CREATE_TOPIC = 0x08
    PING = 0x09
    REPLICA_FETCH = 0x0A
    EPOCH_END_OFFSET = 0x0B
    PROMOTE = 0x0C


class Durability(IntEnum):
    """Requested ``acks`` of a produce request, and the level a PRODUCE reply reached."""

    NONE = 0     # nothing promised (PUSH)
    WRITTEN = 1  # appended to the log (page cache)
    FSYNC = 2    # fdatasync done (group commit)
    ALL = 3      # on disk here and on every in-sync replica


_DURABILITY = tuple(Durability)


class Header(NamedTuple):
    version: int
    msg_type: int
    flags: int
    correlation_id: int


# ---------------------------------------------------------------------------------------
# Checks shared by encoders and decoders, so that both sides enforce the same rules.

def _corrupt(message: str) -> WireError:
    return WireError(ErrorCode.CORRUPT_MESSAGE, message)


def _invalid(message: str) -> WireError:
    return WireError(ErrorCode.INVALID_REQUEST, message)


def _truncated(what: str, have: int, need: int) -> WireError:
    return _corrupt(f"truncated {what}: frame has {have} bytes, needs at least {need}")


def _check_name(raw: bytes, what: str, code: ErrorCode) -> None:
    if _NAME_RE.fullmatch(raw) is None or raw == b"." or raw == b"..":
        shown = raw[:64].decode("ascii", "backslashreplace")
        raise WireError(code, f"invalid {what} {shown!r}: 1..249 bytes of [a-zA-Z0-9._-]")


def _encode_name(name: str, what: str, code: ErrorCode) -> bytes:
    try:
        raw = name.encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        raise WireError(code, f"invalid {what} {name!r}: 1..249 bytes of [a-zA-Z0-9._-]") from None
    _check_name(raw, what, code)
    return raw


def _decode_name(view: memoryview, pos: int, length: int, what: str, code: ErrorCode) -> str:
    end = pos + length
    if end > len(view):
        raise _truncated(f"{what} name", len(view), end)
    raw = bytes(view[pos:end])
    name = _VALID_NAMES.get(raw)
    if name is None:
        _check_name(raw, what, code)
        name = raw.decode("ascii")
        if len(_VALID_NAMES) < MAX_CACHED_NAMES:
            _VALID_NAMES[raw] = name
    return name


def _check_partition(partition: int) -> None:
    if not 0 <= partition <= 0x7FFFFFFF:
        raise _invalid(f"partition {partition} is not in 0..2**31-1")


def _check_offset(offset: int, what: str, low: int = 0) -> None:
    if not low <= offset <= 0x7FFFFFFFFFFFFFFF:
        raise _invalid(f"{what} {offset} is not in {low}..2**63-1")


def _check_durability(level: int, what: str) -> None:
    if type(level) is not Durability and level not in (0, 1, 2, 3):
        raise _invalid(f"{what} {level!r} is not 0 (none), 1 (written), 2 (fsync) or 3 (all)")


def _nbytes(buffer: Buffer) -> int:
    return len(buffer) if type(buffer) is bytes else memoryview(buffer).nbytes


def _check_frame_size(frame_bytes: int) -> None:
    if frame_bytes > MAX_FRAME_BYTES:
        raise WireError(ErrorCode.MESSAGE_TOO_LARGE,
                        f"frame of {frame_bytes} bytes exceeds MAX_FRAME_BYTES {MAX_FRAME_BYTES}")


def _pack(layout_struct: struct.Struct, *values: int) -> bytes:
    try:
        return layout_struct.pack(*values)
    except struct.error as error:  # an int outside its field's range (e.g. i32, u32)
        raise _invalid(f"field out of range: {error}") from None


def _join(parts: list) -> bytes:
    frame = b"".join(parts)
    _check_frame_size(len(frame))
    return frame


def _as_view(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    if view.format != "B":
        view = view.cast("B")
    if len(view) > MAX_FRAME_BYTES:
        _check_frame_size(len(view))
    return view


def _loads_object(body: memoryview, what: str, code: ErrorCode) -> dict:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise WireError(code, f"{what} is not valid JSON: {error}") from None
    if type(document) is not dict:
        raise WireError(code, f"{what} must be a JSON object")
    return document


def _dumps(document: Any, what: str) -> bytes:
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError as error:
        raise _invalid(f"{what} cannot be encoded as JSON: {error}") from None


def _check_reserved(what: str, flags: int, *reserved: int) -> None:
    """v1 defines no flag for ``what`` and every reserved field must be zero: a peer that
    sets them means something this version does not know, so refuse, don't guess."""
    if flags or any(reserved):
        raise _invalid(f"{what} sets flags 0x{flags:04x} or reserved bytes {reserved}: "
                       f"v1 defines none, they must be 0")


# ---------------------------------------------------------------------------------------
# Requests. Each is a frozen value; ``encode()`` returns the frame's bytes.

@dataclass(frozen=True, slots=True)
class RecordMessage:
    """One record: PUSH fire-and-forget (acks NONE), or an acked produce on DEALER.

    ``partition`` AUTO_PARTITION lets the appliance choose: murmur2(key) % partitions as
    Kafka does, or a sticky partition for a null key. ``timestamp_ms`` None: the appliance
    stamps arrival time. ``value`` None is a tombstone.
    """

    topic: str
    value: Buffer | None
    key: Buffer | None = None
    partition: int = AUTO_PARTITION
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, Buffer | None], ...] = ()
    acks: int = Durability.NONE
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.RECORD

    def encode(self) -> bytes:
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_durability(self.acks, "acks")
        flags = int(self.acks)
        if self.partition != AUTO_PARTITION:
            _check_partition(self.partition)
        timestamp_ms = 0
        if self.timestamp_ms is not None:
            _check_offset(self.timestamp_ms, "timestamp_ms")
            timestamp_ms = self.timestamp_ms
            flags |= RECORD_FLAG_HAS_TIMESTAMP
        if len(self.headers) > MAX_HEADERS:
            raise _invalid(f"{len(self.headers)} headers, at most MAX_HEADERS {MAX_HEADERS}")
        parts: list = [b"", topic]
        key_length = NULL_LENGTH
        if self.key is not None:
            key_length = _nbytes(self.key)
            parts.append(self.key)
        for name, value in self.headers:
            _encode_record_header(parts, name, value)
        if self.value is None:
            flags |= RECORD_FLAG_NULL_VALUE
        else:
            parts.append(self.value)
        parts[0] = _pack(_RECORD, PROTOCOL_VERSION, MsgType.RECORD, flags, self.correlation_id,
                         len(topic), 0, len(self.headers), key_length, timestamp_ms,
                         self.partition)
        return _join(parts)


def _encode_record_header(parts: list, name: str, value: Buffer | None) -> None:
    try:
        raw_name = name.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        raise _invalid(f"header name {name!r} is not a str encodable as UTF-8") from None
    if len(raw_name) > 0xFFFF:
        raise _invalid(f"header name of {len(raw_name)} bytes exceeds 65535")
    parts.append(_U16.pack(len(raw_name)))
    parts.append(raw_name)
    if value is None:
        parts.append(_I32.pack(NULL_LENGTH))
    else:
        parts.append(_pack(_I32, _nbytes(value)))
        parts.append(value)


@dataclass(frozen=True, slots=True)
class BatchMessage:
    """One Kafka RecordBatch v2 for one partition, encoded by the producer (the SDK).

    ``batch`` is exactly one batch, big-endian as Kafka writes it; its header carries the
    idempotence fields (producerId, producerEpoch, baseSequence). Decoding checks only its
    framing (size, magic, batchLength); CRC and records are the worker kernel's job.
    """

    topic: str
    partition: int
    batch: Buffer
    acks: int = Durability.NONE
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.BATCH

    def encode(self) -> bytes:
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_durability(self.acks, "acks")
        _check_partition(self.partition)
        _check_record_batch_framing(memoryview(self.batch).cast("B"))
        head = _pack(_BATCH, PROTOCOL_VERSION, MsgType.BATCH, int(self.acks),
                     self.correlation_id, len(topic), 0, 0, self.partition)
        return _join([head, topic, self.batch])


def _check_record_batch_framing(batch: memoryview) -> None:
    size = len(batch)
    if size < layout.RECORD_BATCH_OVERHEAD:
        raise _corrupt(f"RecordBatch of {size} bytes is shorter than its "
                       f"{layout.RECORD_BATCH_OVERHEAD}-byte header")
    magic = batch[layout.MAGIC_OFFSET]
    if magic != layout.MAGIC_V2:
        raise _corrupt(f"RecordBatch magic {magic}, only {layout.MAGIC_V2} is supported")
    (batch_length,) = _BATCH_LENGTH.unpack_from(batch, layout.LENGTH_OFFSET)
    if batch_length + layout.LOG_OVERHEAD != size:
        raise _corrupt(f"RecordBatch batchLength {batch_length} + {layout.LOG_OVERHEAD} "
                       f"!= the {size} bytes that follow the topic")


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Read batches of one partition from ``offset``; wait up to ``max_wait_ms`` until
    ``min_bytes`` are available. The first batch is returned even if larger than
    ``max_bytes`` (as Kafka does) so that a consumer always makes progress."""

    topic: str
    partition: int
    offset: int
    max_bytes: int
    max_wait_ms: int = 0
    min_bytes: int = 0
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.FETCH

    def encode(self) -> bytes:
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_fetch(self.partition, self.offset, self.max_bytes, self.max_wait_ms,
                     self.min_bytes)
        head = _pack(_FETCH, PROTOCOL_VERSION, MsgType.FETCH, 0, self.correlation_id,
                     len(topic), 0, 0, self.partition, self.offset, self.max_bytes,
                     self.max_wait_ms, self.min_bytes)
        return head + topic


def _check_fetch(partition: int, offset: int, max_bytes: int, max_wait_ms: int,
                 min_bytes: int) -> None:
    _check_partition(partition)
    _check_offset(offset, "offset")
    if not 1 <= max_bytes <= MAX_FETCH_BYTES:
        raise _invalid(f"max_bytes {max_bytes} is not in 1..MAX_FETCH_BYTES {MAX_FETCH_BYTES}")
    if not 0 <= max_wait_ms <= MAX_FETCH_WAIT_MS:
        raise _invalid(f"max_wait_ms {max_wait_ms} is not in 0..{MAX_FETCH_WAIT_MS}")
    if not 0 <= min_bytes <= max_bytes:
        raise _invalid(f"min_bytes {min_bytes} is not in 0..max_bytes {max_bytes}")


@dataclass(frozen=True, slots=True)
class ListOffsetsRequest:
    """Find an offset of one partition: ``timestamp_ms`` EARLIEST_TIMESTAMP (log start),
    LATEST_TIMESTAMP (log end), else the first offset whose timestamp is >= it."""

    topic: str
    partition: int
    timestamp_ms: int
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.LIST_OFFSETS

    def encode(self) -> bytes:
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_partition(self.partition)
        _check_offset(self.timestamp_ms, "timestamp_ms", EARLIEST_TIMESTAMP)
        head = _pack(_LIST_OFFSETS, PROTOCOL_VERSION, MsgType.LIST_OFFSETS, 0,
                     self.correlation_id, len(topic), 0, 0, self.partition, self.timestamp_ms)
        return head + topic


@dataclass(frozen=True, slots=True)
class OffsetCommitRequest:
    """Store a consumer group's next offsets: ``offsets`` is ((partition, offset), ...),
    at least one, each partition once. All are stored or none (one error code)."""

    group: str
    topic: str
    offsets: tuple[tuple[int, int], ...]
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.OFFSET_COMMIT

    def encode(self) -> bytes:
        group = _encode_name(self.group, "group", ErrorCode.INVALID_GROUP)
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_partition_list([partition for partition, _ in self.offsets], 1)
        parts = [b"", group, topic]
        for partition, offset in self.offsets:
            _check_offset(offset, "committed offset")
            parts.append(_COMMIT_ENTRY.pack(partition, offset))
        parts[0] = _pack(_OFFSETS, PROTOCOL_VERSION, MsgType.OFFSET_COMMIT, 0,
                         self.correlation_id, len(group), len(topic), 0, len(self.offsets))
        return _join(parts)


def _check_partition_list(partitions: list[int], count_min: int) -> None:
    if not count_min <= len(partitions) <= MAX_PARTITIONS:
        raise _invalid(f"{len(partitions)} partitions, must be {count_min}..{MAX_PARTITIONS}")
    for partition in partitions:
        _check_partition(partition)
    if len(set(partitions)) != len(partitions):
        raise _invalid("a partition appears twice")


@dataclass(frozen=True, slots=True)
class OffsetFetchRequest:
    """Read a consumer group's committed offsets; ``partitions`` () means all of them."""

    group: str
    topic: str
    partitions: tuple[int, ...] = ()
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.OFFSET_FETCH

    def encode(self) -> bytes:
        group = _encode_name(self.group, "group", ErrorCode.INVALID_GROUP)
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_partition_list(list(self.partitions), 0)
        head = _pack(_OFFSETS, PROTOCOL_VERSION, MsgType.OFFSET_FETCH, 0,
                     self.correlation_id, len(group), len(topic), 0, len(self.partitions))
        entries = struct.pack(f"<{len(self.partitions)}i", *self.partitions)
        return b"".join([head, group, topic, entries])


@dataclass(frozen=True, slots=True)
class MetadataRequest:
    """Ask for topics, partitions and worker endpoints; ``query`` None sends no body."""

    query: dict | None = None
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.METADATA

    def encode(self) -> bytes:
        head = _pack(_HEADER, PROTOCOL_VERSION, MsgType.METADATA, 0, self.correlation_id)
        if self.query is None:
            return head
        if type(self.query) is not dict:
            raise _invalid("METADATA query must be a JSON object (dict) or None")
        return _join([head, _dumps(self.query, "METADATA query")])


@dataclass(frozen=True, slots=True)
class CreateTopicRequest:
    """Create ``topic`` with ``partitions``; ``config`` holds per-topic settings whose
    keys end in their unit (retention_ms, segment_bytes); the supervisor checks them."""

    topic: str
    partitions: int
    config: dict = field(default_factory=dict)
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.CREATE_TOPIC

    def encode(self) -> bytes:
        _check_create_topic(self.topic, self.partitions, self.config)
        document = {"topic": self.topic, "partitions": self.partitions}
        if self.config:
            document["config"] = self.config
        head = _pack(_HEADER, PROTOCOL_VERSION, MsgType.CREATE_TOPIC, 0, self.correlation_id)
        return _join([head, _dumps(document, "CREATE_TOPIC request")])


_CREATE_TOPIC_KEYS = frozenset(("topic", "partitions", "config"))


def _check_create_topic(topic: Any, partitions: Any, config: Any) -> None:
    if type(topic) is not str:
        raise WireError(ErrorCode.INVALID_TOPIC, f"topic {topic!r} is not a string")
    _encode_name(topic, "topic", ErrorCode.INVALID_TOPIC)
    if type(partitions) is not int or not 1 <= partitions <= MAX_PARTITIONS:
        raise _invalid(f"partitions {partitions!r} is not an integer in 1..{MAX_PARTITIONS}")
    if type(config) is not dict:
        raise _invalid("config must be a JSON object")


@dataclass(frozen=True, slots=True)
class PingRequest:
    """Liveness probe: the reply proves the worker's loop is turning."""

    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.PING

    def encode(self) -> bytes:
        return _pack(_HEADER, PROTOCOL_VERSION, MsgType.PING, 0, self.correlation_id)


@dataclass(frozen=True, slots=True)
class ReplicaFetchRequest:
    """A follower appliance's fetch: like FETCH, but reads up to the log end (not the high
    watermark) and tells the leader that ``replica_id`` holds every offset below
    ``offset`` on disk. ``leader_epoch`` is the epoch the follower follows; a leader with
    an older epoch answers FENCED_LEADER_EPOCH (it has been replaced)."""

    topic: str
    partition: int
    offset: int
    max_bytes: int
    max_wait_ms: int
    leader_epoch: int
    replica_id: str
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.REPLICA_FETCH

    def encode(self) -> bytes:
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        replica = _encode_replica_id(self.replica_id)
        _check_fetch(self.partition, self.offset, self.max_bytes, self.max_wait_ms, 0)
        _check_epoch(self.leader_epoch)
        head = _pack(_REPLICA_FETCH, PROTOCOL_VERSION, MsgType.REPLICA_FETCH, 0,
                     self.correlation_id, len(topic), len(replica), 0, self.partition,
                     self.offset, self.max_bytes, self.max_wait_ms, self.leader_epoch)
        return b"".join([head, topic, replica])


def _encode_replica_id(replica_id: str) -> bytes:
    raw = replica_id.encode("ascii", "replace") if isinstance(replica_id, str) else b""
    if not 1 <= len(raw) <= MAX_REPLICA_ID_BYTES or not _NAME_RE.fullmatch(raw):
        raise _invalid(f"replica id {replica_id!r} is not 1..{MAX_REPLICA_ID_BYTES} bytes "
                       "of [a-zA-Z0-9._-]")
    return raw


def _check_epoch(epoch: int, low: int = 0) -> None:
    if not low <= epoch <= 0x7FFFFFFF:
        raise _invalid(f"leader epoch {epoch} is not in {low}..2**31-1")


@dataclass(frozen=True, slots=True)
class EpochEndOffsetRequest:
    """Kafka's OffsetsForLeaderEpoch for one partition: where does ``leader_epoch`` end in
    the leader's log? NO_EPOCH asks about a log that has no epoch yet."""

    topic: str
    partition: int
    leader_epoch: int
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.EPOCH_END_OFFSET

    def encode(self) -> bytes:
        topic = _encode_name(self.topic, "topic", ErrorCode.INVALID_TOPIC)
        _check_partition(self.partition)
        _check_epoch(self.leader_epoch, NO_EPOCH)
        head = _pack(_EPOCH_END_OFFSET, PROTOCOL_VERSION, MsgType.EPOCH_END_OFFSET, 0,
                     self.correlation_id, len(topic), 0, 0, self.partition, self.leader_epoch)
        return head + topic


@dataclass(frozen=True, slots=True)
class PromoteRequest:
    """Make this appliance the leader with a new leader epoch (`ingest promote`);
    served by the bootstrap endpoint."""

    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.PROMOTE

    def encode(self) -> bytes:
        return _pack(_HEADER, PROTOCOL_VERSION, MsgType.PROMOTE, 0, self.correlation_id)


Request = Union[RecordMessage, BatchMessage, FetchRequest, ListOffsetsRequest,
                OffsetCommitRequest, OffsetFetchRequest, MetadataRequest, CreateTopicRequest,
                PingRequest, ReplicaFetchRequest, EpochEndOffsetRequest, PromoteRequest]


# ---------------------------------------------------------------------------------------
# Replies. Success replies carry error_code 0; any failure is an ErrorReply.

def _reply_head(layout_struct: struct.Struct, request_type: int, correlation_id: int,
                *body: int) -> bytes:
    return _pack(layout_struct, PROTOCOL_VERSION, request_type | REPLY_BIT, 0, correlation_id,
                 ErrorCode.NONE, 0, *body)


@dataclass(frozen=True, slots=True)
class ProduceReply:
    """Reply to RECORD (``request_type`` 1) or BATCH (2): the records are at offsets
    base_offset..last_offset of ``partition`` and reached ``durability`` (>= the acks
    asked for). A retried duplicate gets its original offsets."""

    request_type: int
    partition: int
    base_offset: int
    last_offset: int
    durability: int
    correlation_id: int = 0

    @property
    def msg_type(self) -> int:
        return self.request_type | REPLY_BIT

    def encode(self) -> bytes:
        if self.request_type not in (MsgType.RECORD, MsgType.BATCH):
            raise _invalid(f"a PRODUCE reply answers RECORD or BATCH, not {self.request_type!r}")
        _check_produce_reply(self.partition, self.base_offset, self.last_offset,
                             self.durability)
        return _reply_head(_PRODUCE_REPLY, self.request_type, self.correlation_id,
                           self.partition, self.base_offset, self.last_offset,
                           self.durability, 0, 0)


def _check_produce_reply(partition: int, base_offset: int, last_offset: int,
                         durability: int) -> None:
    _check_partition(partition)
    _check_offset(base_offset, "base_offset")
    _check_offset(last_offset, "last_offset", base_offset)
    _check_durability(durability, "durability")


@dataclass(frozen=True, slots=True)
class FetchReply:
    """Whole RecordBatches of ``partition`` (``records`` may be empty), and the log's
    offsets: log_start_offset <= high_watermark <= log_end_offset."""

    partition: int
    high_watermark: int
    log_start_offset: int
    log_end_offset: int
    records: Buffer = b""
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.FETCH | REPLY_BIT

    def encode(self) -> bytes:
        _check_fetch_reply(self.partition, self.high_watermark, self.log_start_offset,
                           self.log_end_offset)
        head = _reply_head(_FETCH_REPLY, MsgType.FETCH, self.correlation_id, self.partition,
                           self.high_watermark, self.log_start_offset, self.log_end_offset)
        return _join([head, self.records])


def _check_fetch_reply(partition: int, high_watermark: int, log_start_offset: int,
                       log_end_offset: int) -> None:
    _check_partition(partition)
    _check_offset(log_start_offset, "log_start_offset")
    _check_offset(high_watermark, "high_watermark", log_start_offset)
    _check_offset(log_end_offset, "log_end_offset", high_watermark)


@dataclass(frozen=True, slots=True)
class ListOffsetsReply:
    """``offset`` NO_OFFSET if no record matched; ``timestamp_ms`` -1 unless a timestamp
    was searched for and matched (then the matching record's timestamp)."""

    partition: int
    offset: int
    timestamp_ms: int
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.LIST_OFFSETS | REPLY_BIT

    def encode(self) -> bytes:
        _check_list_offsets_reply(self.partition, self.offset, self.timestamp_ms)
        return _reply_head(_LIST_OFFSETS_REPLY, MsgType.LIST_OFFSETS, self.correlation_id,
                           self.partition, self.offset, self.timestamp_ms)


def _check_list_offsets_reply(partition: int, offset: int, timestamp_ms: int) -> None:
    _check_partition(partition)
    _check_offset(offset, "offset", NO_OFFSET)
    _check_offset(timestamp_ms, "timestamp_ms", -1)


@dataclass(frozen=True, slots=True)
class OffsetCommitReply:
    """The committed offsets are stored (durably: fsynced before this reply)."""

    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.OFFSET_COMMIT | REPLY_BIT

    def encode(self) -> bytes:
        return _reply_head(_REPLY, MsgType.OFFSET_COMMIT, self.correlation_id)


@dataclass(frozen=True, slots=True)
class OffsetFetchReply:
    """((partition, committed offset or NO_OFFSET), ...) in the order asked for."""

    offsets: tuple[tuple[int, int], ...]
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.OFFSET_FETCH | REPLY_BIT

    def encode(self) -> bytes:
        _check_partition_list([partition for partition, _ in self.offsets], 0)
        parts = [_reply_head(_OFFSET_FETCH_REPLY, MsgType.OFFSET_FETCH, self.correlation_id,
                             len(self.offsets))]
        for partition, offset in self.offsets:
            _check_offset(offset, "committed offset", NO_OFFSET)
            parts.append(_OFFSET_FETCH_ENTRY.pack(partition, offset))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class MetadataReply:
    """The appliance's metadata document (topics, partitions, worker endpoints)."""

    document: dict
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.METADATA | REPLY_BIT

    def encode(self) -> bytes:
        return _encode_json_reply(MsgType.METADATA, self.correlation_id, self.document)


@dataclass(frozen=True, slots=True)
class CreateTopicReply:
    """The topic exists now, as described by ``document``."""

    document: dict
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.CREATE_TOPIC | REPLY_BIT

    def encode(self) -> bytes:
        return _encode_json_reply(MsgType.CREATE_TOPIC, self.correlation_id, self.document)


def _encode_json_reply(request_type: int, correlation_id: int, document: dict) -> bytes:
    if type(document) is not dict:
        raise _invalid("a JSON reply's document must be a JSON object (dict)")
    head = _reply_head(_REPLY, request_type, correlation_id)
    return _join([head, _dumps(document, "reply document")])


@dataclass(frozen=True, slots=True)
class PingReply:
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.PING | REPLY_BIT

    def encode(self) -> bytes:
        return _reply_head(_REPLY, MsgType.PING, self.correlation_id)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A request of ``request_type`` failed with ``error_code`` (never NONE).
    ``partition`` is -1 when the error is not about one partition."""

    request_type: int
    error_code: int
    message: str = ""
    partition: int = -1
    correlation_id: int = 0

    @property
    def msg_type(self) -> int:
        return self.request_type | REPLY_BIT

    def encode(self) -> bytes:
        raw = _check_error_reply(self.request_type, self.error_code, self.message,
                                 self.partition)
        head = _pack(_ERROR_REPLY, PROTOCOL_VERSION, self.request_type | REPLY_BIT, 0,
                     self.correlation_id, self.error_code, 0, self.partition)
        return head + raw

    def exception(self) -> IngestError:
        """The exception a client raises for this reply."""
        return IngestError(self.error_code, self.message, self.partition)


def _check_error_reply(request_type: int, error_code: int, message: str,
                       partition: int) -> bytes:
    if not 0 <= request_type < REPLY_BIT:
        raise _invalid(f"request_type {request_type!r} is not in 0..0x7f")
    if not 1 <= error_code <= 0xFFFF:
        raise _invalid(f"error_code {error_code!r} of an error reply must be in 1..65535")
    if partition != -1:
        _check_partition(partition)
    try:
        raw = message.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        raise _invalid(f"error message {message!r} is not a str encodable as UTF-8") from None
    if len(raw) > MAX_ERROR_MESSAGE_BYTES:
        raise _invalid(f"error message of {len(raw)} bytes exceeds {MAX_ERROR_MESSAGE_BYTES}")
    return raw


@dataclass(frozen=True, slots=True)
class ReplicaFetchReply:
    """Batches for a follower (up to the log end), the leader's offsets and its epoch."""

    partition: int
    high_watermark: int
    log_start_offset: int
    log_end_offset: int
    leader_epoch: int
    records: Buffer = b""
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.REPLICA_FETCH | REPLY_BIT

    def encode(self) -> bytes:
        _check_fetch_reply(self.partition, self.high_watermark, self.log_start_offset,
                           self.log_end_offset)
        _check_epoch(self.leader_epoch)
        head = _reply_head(_REPLICA_FETCH_REPLY, MsgType.REPLICA_FETCH, self.correlation_id,
                           self.partition, self.high_watermark, self.log_start_offset,
                           self.log_end_offset, self.leader_epoch, 0)
        return _join([head, self.records])


@dataclass(frozen=True, slots=True)
class EpochEndOffsetReply:
    """``leader_epoch`` is the largest epoch <= the one asked about in the leader's log
    (NO_EPOCH if none); ``end_offset`` where it ends there (the next epoch's start, or the
    log end for the latest epoch). A follower truncates its log to at most end_offset."""

    partition: int
    leader_epoch: int
    end_offset: int
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.EPOCH_END_OFFSET | REPLY_BIT

    def encode(self) -> bytes:
        _check_partition(self.partition)
        _check_epoch(self.leader_epoch, NO_EPOCH)
        _check_offset(self.end_offset, "end_offset")
        return _reply_head(_EPOCH_END_OFFSET_REPLY, MsgType.EPOCH_END_OFFSET,
                           self.correlation_id, self.partition, self.leader_epoch,
                           self.end_offset)


@dataclass(frozen=True, slots=True)
class PromoteReply:
    """The appliance is the leader now: ``document`` holds its role and leader epoch."""

    document: dict
    correlation_id: int = 0
    msg_type: ClassVar[int] = MsgType.PROMOTE | REPLY_BIT

    def encode(self) -> bytes:
        return _encode_json_reply(MsgType.PROMOTE, self.correlation_id, self.document)


Reply = Union[ProduceReply, FetchReply, ListOffsetsReply, OffsetCommitReply, OffsetFetchReply,
              MetadataReply, CreateTopicReply, PingReply, ErrorReply, ReplicaFetchReply,
              EpochEndOffsetReply, PromoteReply]


def encode(message: Request | Reply) -> bytes:
    """The frame of ``message``: one ZeroMQ frame, at most MAX_FRAME_BYTES."""
    return message.encode()


def error_reply_for(frame: Buffer, error: IngestError) -> bytes | None:
    """The error reply to send for ``frame`` that failed with ``error``, or None when there
    is no one to answer: a frame shorter than the header carries no correlation id, and a
    reply is never answered (two peers would bounce errors forever)."""
    assert error.code != ErrorCode.NONE, error
    view = memoryview(frame).cast("B")
    if len(view) < HEADER_BYTES or view[MSG_TYPE_OFFSET] & REPLY_BIT:
        return None
    _, msg_type, _, correlation_id = _HEADER.unpack_from(view)
    raw = error.message.encode("utf-8")[:MAX_ERROR_MESSAGE_BYTES]
    message = raw.decode("utf-8", "ignore")  # drops a character cut in half by the bound
    partition = error.partition if 0 <= error.partition <= 0x7FFFFFFF else -1
    return ErrorReply(msg_type, error.code, message, partition, correlation_id).encode()


# ---------------------------------------------------------------------------------------
# Decoding. decode_request/decode_reply check the header, then dispatch on msg_type.

def peek_header(frame: Buffer) -> Header:
    """The common header of any frame, any version; WireError if shorter than 8 bytes."""
    try:
        return Header._make(_HEADER.unpack_from(frame))
    except struct.error:
        raise _truncated("header", memoryview(frame).nbytes, HEADER_BYTES) from None


def _check_version(view: memoryview) -> None:
    if len(view) < HEADER_BYTES:
        raise _truncated("header", len(view), HEADER_BYTES)
    if view[VERSION_OFFSET] != PROTOCOL_VERSION:
        raise WireError(ErrorCode.UNSUPPORTED_VERSION,
                        f"protocol version {view[VERSION_OFFSET]}; this peer speaks "
                        f"{PROTOCOL_VERSION}")


def decode_request(frame: Buffer) -> Request:
    """The request in ``frame`` (bytes, bytearray, memoryview or a zmq.Frame's buffer).

    Payloads in the result are memoryview slices of ``frame``: keep it unmodified while
    they are in use. Raises WireError for any malformed frame.
    """
    view = _as_view(frame)
    _check_version(view)
    decoder = _REQUEST_DECODERS.get(view[MSG_TYPE_OFFSET])
    if decoder is None:
        raise _invalid(f"unknown request type 0x{view[MSG_TYPE_OFFSET]:02x}")
    return decoder(view)


def decode_reply(frame: Buffer) -> Reply:
    """The reply in ``frame``; an ErrorReply whenever error_code != 0 (also for request
    types this client does not know). Raises WireError for any malformed frame."""
    view = _as_view(frame)
    _check_version(view)
    msg_type = view[MSG_TYPE_OFFSET]
    if not msg_type & REPLY_BIT:
        raise _corrupt(f"type 0x{msg_type:02x} is a request, not a reply")
    if len(view) < REPLY_HEADER_BYTES:
        raise _truncated("reply header", len(view), REPLY_HEADER_BYTES)
    (error_code,) = _U16.unpack_from(view, REPLY_ERROR_CODE_OFFSET)
    if error_code != ErrorCode.NONE:
        return _decode_error_reply(view)
    decoder = _REPLY_DECODERS.get(msg_type & ~REPLY_BIT)
    if decoder is None:
        raise _corrupt(f"unknown reply type 0x{msg_type:02x}")
    try:
        return decoder(view)
    except WireError as error:
        if error.code != ErrorCode.INVALID_REQUEST:
            raise
        # The checks are shared with the encoders, which speak of requests; a bad value in
        # a reply is the appliance's fault, not something the client should "fix".
        raise _corrupt(f"malformed reply: {error.message}") from None


def _decode_record(view: memoryview) -> RecordMessage:
    size = len(view)
    if size < RECORD_FIXED_BYTES:
        raise _truncated("RECORD", size, RECORD_FIXED_BYTES)
    (_, _, flags, correlation_id, topic_length, reserved, header_count, key_length,
     timestamp_ms, partition) = _RECORD.unpack_from(view)
    if flags & ~RECORD_FLAGS_KNOWN or reserved:
        raise _invalid(f"RECORD sets reserved bits (flags 0x{flags:04x}, reserved {reserved})")
    if header_count > MAX_HEADERS:
        raise _invalid(f"RECORD has {header_count} headers, at most MAX_HEADERS {MAX_HEADERS}")
    if partition < AUTO_PARTITION:
        raise _invalid(f"RECORD partition {partition}: must be >= 0 or -1 (appliance picks)")
    if flags & RECORD_FLAG_HAS_TIMESTAMP:
        if timestamp_ms < 0:
            raise _invalid(f"RECORD timestamp_ms {timestamp_ms} is negative")
    elif timestamp_ms != 0:
        raise _invalid("RECORD timestamp_ms must be 0 when flag bit 3 (timestamp) is clear")
    else:
        timestamp_ms = None
    pos = RECORD_TOPIC_OFFSET
    topic = _decode_name(view, pos, topic_length, "topic", ErrorCode.INVALID_TOPIC)
    key, pos = _slice(view, pos + topic_length, key_length, "key")
    headers: tuple = ()
    if header_count:
        headers, pos = _decode_record_headers(view, pos, header_count)
    if flags & RECORD_FLAG_NULL_VALUE:
        if pos != size:
            raise _corrupt(f"RECORD value is null (flag bit 2) but {size - pos} bytes follow")
        value = None
    else:
        value = view[pos:]
    return RecordMessage(topic, value, key, partition, timestamp_ms, headers,
                         _DURABILITY[flags & FLAGS_ACKS_MASK], correlation_id)


def _slice(view: memoryview, pos: int, length: int, what: str) -> tuple[memoryview | None, int]:
    if length == NULL_LENGTH:
        return None, pos
    if length < 0:
        raise _corrupt(f"{what} length {length}: only -1 (null) may be negative")
    end = pos + length
    if end > len(view):
        raise _corrupt(f"{what} of {length} bytes at {pos} runs past the frame's {len(view)}")
    return view[pos:end], end


def _decode_record_headers(view: memoryview, pos: int, count: int) -> tuple[tuple, int]:
    headers = []
    size = len(view)
    for _ in range(count):
        if pos + RECORD_HEADER_NAME_LENGTH_LENGTH > size:
            raise _truncated("record header", size, pos + RECORD_HEADER_NAME_LENGTH_LENGTH)
        (name_length,) = _U16.unpack_from(view, pos)
        pos += RECORD_HEADER_NAME_LENGTH_LENGTH
        end = pos + name_length
        if end + RECORD_HEADER_VALUE_LENGTH_LENGTH > size:
            raise _truncated("record header", size, end + RECORD_HEADER_VALUE_LENGTH_LENGTH)
        try:
            name = bytes(view[pos:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"record header name at {pos} is not UTF-8") from None
        (value_length,) = _I32.unpack_from(view, end)
        value, pos = _slice(view, end + RECORD_HEADER_VALUE_LENGTH_LENGTH, value_length,
                            f"header {name!r} value")
        headers.append((name, value))
    return tuple(headers), pos


def _decode_batch(view: memoryview) -> BatchMessage:
    if len(view) < BATCH_FIXED_BYTES:
        raise _truncated("BATCH", len(view), BATCH_FIXED_BYTES)
    (_, _, flags, correlation_id, topic_length, reserved8, reserved16,
     partition) = _BATCH.unpack_from(view)
    if flags & ~BATCH_FLAGS_KNOWN or reserved8 or reserved16:
        raise _invalid(f"BATCH sets reserved bits (flags 0x{flags:04x}, reserved "
                       f"{reserved8}/{reserved16})")
    _check_partition(partition)
    topic = _decode_name(view, BATCH_TOPIC_OFFSET, topic_length, "topic",
                         ErrorCode.INVALID_TOPIC)
    batch = view[BATCH_TOPIC_OFFSET + topic_length:]
    _check_record_batch_framing(batch)
    return BatchMessage(topic, partition, batch, _DURABILITY[flags & FLAGS_ACKS_MASK],
                        correlation_id)


def _decode_fetch(view: memoryview) -> FetchRequest:
    if len(view) < FETCH_FIXED_BYTES:
        raise _truncated("FETCH", len(view), FETCH_FIXED_BYTES)
    (_, _, flags, correlation_id, topic_length, reserved8, reserved16, partition, offset,
     max_bytes, max_wait_ms, min_bytes) = _FETCH.unpack_from(view)
    _check_reserved("FETCH", flags, reserved8, reserved16)
    _check_fetch(partition, offset, max_bytes, max_wait_ms, min_bytes)
    topic = _decode_name(view, FETCH_FIXED_BYTES, topic_length, "topic",
                         ErrorCode.INVALID_TOPIC)
    _check_exact_size(view, FETCH_FIXED_BYTES + topic_length, "FETCH")
    return FetchRequest(topic, partition, offset, max_bytes, max_wait_ms, min_bytes,
                        correlation_id)


def _check_exact_size(view: memoryview, expected: int, what: str) -> None:
    if len(view) != expected:
        raise _corrupt(f"{what} frame has {len(view)} bytes, its fields say {expected}")


def _decode_list_offsets(view: memoryview) -> ListOffsetsRequest:
    if len(view) < LIST_OFFSETS_BYTES:
        raise _truncated("LIST_OFFSETS", len(view), LIST_OFFSETS_BYTES)
    (_, _, flags, correlation_id, topic_length, reserved8, reserved16, partition,
     timestamp_ms) = _LIST_OFFSETS.unpack_from(view)
    _check_reserved("LIST_OFFSETS", flags, reserved8, reserved16)
    _check_partition(partition)
    _check_offset(timestamp_ms, "timestamp_ms", EARLIEST_TIMESTAMP)
    topic = _decode_name(view, LIST_OFFSETS_BYTES, topic_length, "topic",
                         ErrorCode.INVALID_TOPIC)
    _check_exact_size(view, LIST_OFFSETS_BYTES + topic_length, "LIST_OFFSETS")
    return ListOffsetsRequest(topic, partition, timestamp_ms, correlation_id)


def _decode_offsets_head(view: memoryview, what: str,
                         entry_bytes: int) -> tuple[int, str, str, int, memoryview]:
    if len(view) < OFFSETS_FIXED_BYTES:
        raise _truncated(what, len(view), OFFSETS_FIXED_BYTES)
    (_, _, flags, correlation_id, group_length, topic_length, reserved,
     count) = _OFFSETS.unpack_from(view)
    _check_reserved(what, flags, reserved)
    if count > MAX_PARTITIONS:
        raise _invalid(f"{what} lists {count} partitions, at most MAX_PARTITIONS "
                       f"{MAX_PARTITIONS}")
    pos = OFFSETS_FIXED_BYTES
    group = _decode_name(view, pos, group_length, "group", ErrorCode.INVALID_GROUP)
    pos += group_length
    topic = _decode_name(view, pos, topic_length, "topic", ErrorCode.INVALID_TOPIC)
    pos += topic_length
    _check_exact_size(view, pos + count * entry_bytes, what)
    return correlation_id, group, topic, count, view[pos:]


def _decode_offset_commit(view: memoryview) -> OffsetCommitRequest:
    correlation_id, group, topic, _, entries = _decode_offsets_head(
        view, "OFFSET_COMMIT", _COMMIT_ENTRY.size)
    offsets = tuple(_COMMIT_ENTRY.iter_unpack(entries))
    _check_partition_list([partition for partition, _ in offsets], 1)
    for _, offset in offsets:
        _check_offset(offset, "committed offset")
    return OffsetCommitRequest(group, topic, offsets, correlation_id)


def _decode_offset_fetch(view: memoryview) -> OffsetFetchRequest:
    correlation_id, group, topic, count, entries = _decode_offsets_head(
        view, "OFFSET_FETCH", _PARTITION_ENTRY.size)
    partitions = struct.unpack(f"<{count}i", entries)
    _check_partition_list(list(partitions), 0)
    return OffsetFetchRequest(group, topic, partitions, correlation_id)


def _decode_metadata(view: memoryview) -> MetadataRequest:
    (_, _, flags, correlation_id) = _HEADER.unpack_from(view)
    _check_reserved("METADATA", flags)
    query = None
    if len(view) > HEADER_BYTES:
        query = _loads_object(view[HEADER_BYTES:], "METADATA query",
                              ErrorCode.INVALID_REQUEST)
    return MetadataRequest(query, correlation_id)


def _decode_create_topic(view: memoryview) -> CreateTopicRequest:
    (_, _, flags, correlation_id) = _HEADER.unpack_from(view)
    _check_reserved("CREATE_TOPIC", flags)
    document = _loads_object(view[HEADER_BYTES:], "CREATE_TOPIC request",
                             ErrorCode.INVALID_REQUEST)
    unknown = document.keys() - _CREATE_TOPIC_KEYS
    if unknown:
        raise _invalid(f"CREATE_TOPIC has unknown keys {sorted(unknown)}; "
                       f"known: {sorted(_CREATE_TOPIC_KEYS)}")
    topic = document.get("topic")
    partitions = document.get("partitions")
    config = document.get("config", {})
    _check_create_topic(topic, partitions, config)
    return CreateTopicRequest(topic, partitions, config, correlation_id)


def _decode_ping(view: memoryview) -> PingRequest:
    (_, _, flags, correlation_id) = _HEADER.unpack_from(view)
    _check_reserved("PING", flags)
    _check_exact_size(view, HEADER_BYTES, "PING")
    return PingRequest(correlation_id)


def _decode_replica_fetch(view: memoryview) -> ReplicaFetchRequest:
    if len(view) < REPLICA_FETCH_FIXED_BYTES:
        raise _truncated("REPLICA_FETCH", len(view), REPLICA_FETCH_FIXED_BYTES)
    (_, _, flags, correlation_id, topic_length, replica_length, reserved16, partition, offset,
     max_bytes, max_wait_ms, leader_epoch) = _REPLICA_FETCH.unpack_from(view)
    _check_reserved("REPLICA_FETCH", flags, reserved16)
    _check_fetch(partition, offset, max_bytes, max_wait_ms, 0)
    _check_epoch(leader_epoch)
    topic = _decode_name(view, REPLICA_FETCH_FIXED_BYTES, topic_length, "topic",
                         ErrorCode.INVALID_TOPIC)
    start = REPLICA_FETCH_FIXED_BYTES + topic_length
    _check_exact_size(view, start + replica_length, "REPLICA_FETCH")
    replica = bytes(view[start:start + replica_length])
    _encode_replica_id(replica.decode("ascii", "replace"))
    return ReplicaFetchRequest(topic, partition, offset, max_bytes, max_wait_ms, leader_epoch,
                               replica.decode("ascii"), correlation_id)


def _decode_epoch_end_offset(view: memoryview) -> EpochEndOffsetRequest:
    if len(view) < EPOCH_END_OFFSET_BYTES:
        raise _truncated("EPOCH_END_OFFSET", len(view), EPOCH_END_OFFSET_BYTES)
    (_, _, flags, correlation_id, topic_length, reserved8, reserved16, partition,
     leader_epoch) = _EPOCH_END_OFFSET.unpack_from(view)
    _check_reserved("EPOCH_END_OFFSET", flags, reserved8, reserved16)
    _check_partition(partition)
    _check_epoch(leader_epoch, NO_EPOCH)
    topic = _decode_name(view, EPOCH_END_OFFSET_BYTES, topic_length, "topic",
                         ErrorCode.INVALID_TOPIC)
    _check_exact_size(view, EPOCH_END_OFFSET_BYTES + topic_length, "EPOCH_END_OFFSET")
    return EpochEndOffsetRequest(topic, partition, leader_epoch, correlation_id)


def _decode_promote(view: memoryview) -> PromoteRequest:
    (_, _, flags, correlation_id) = _HEADER.unpack_from(view)
    _check_reserved("PROMOTE", flags)
    _check_exact_size(view, HEADER_BYTES, "PROMOTE")
    return PromoteRequest(correlation_id)


_REQUEST_DECODERS: dict[int, Callable[[memoryview], Request]] = {
    MsgType.RECORD: _decode_record,
    MsgType.BATCH: _decode_batch,
    MsgType.FETCH: _decode_fetch,
    MsgType.LIST_OFFSETS: _decode_list_offsets,
    MsgType.OFFSET_COMMIT: _decode_offset_commit,
    MsgType.OFFSET_FETCH: _decode_offset_fetch,
    MsgType.METADATA: _decode_metadata,
    MsgType.CREATE_TOPIC: _decode_create_topic,
    MsgType.PING: _decode_ping,
    MsgType.REPLICA_FETCH: _decode_replica_fetch,
    MsgType.EPOCH_END_OFFSET: _decode_epoch_end_offset,
    MsgType.PROMOTE: _decode_promote,
}
assert set(_REQUEST_DECODERS) == set(MsgType)


def _check_reply_head(view: memoryview, size_min: int, what: str) -> int:
    """Checks the reply's flags and reserved bytes; returns its correlation id."""
    if len(view) < size_min:
        raise _truncated(what, len(view), size_min)
    _, _, flags, correlation_id, _, reserved = _REPLY.unpack_from(view)
    if flags or reserved:
        raise _corrupt(f"{what} sets reserved bits (flags 0x{flags:04x}, reserved {reserved})")
    return correlation_id


def _decode_error_reply(view: memoryview) -> ErrorReply:
    correlation_id = _check_reply_head(view, ERROR_REPLY_FIXED_BYTES, "error reply")
    (_, msg_type, _, _, error_code, _, partition) = _ERROR_REPLY.unpack_from(view)
    if partition < -1:
        raise _corrupt(f"error reply partition {partition}: must be >= 0 or -1")
    raw = view[ERROR_REPLY_FIXED_BYTES:]
    if len(raw) > MAX_ERROR_MESSAGE_BYTES:
        raise _corrupt(f"error message of {len(raw)} bytes exceeds {MAX_ERROR_MESSAGE_BYTES}")
    try:
        message = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt("error message is not UTF-8") from None
    return ErrorReply(msg_type & ~REPLY_BIT, error_code, message, partition, correlation_id)


def _decode_produce_reply(view: memoryview) -> ProduceReply:
    correlation_id = _check_reply_head(view, PRODUCE_REPLY_BYTES, "PRODUCE reply")
    (_, msg_type, _, _, _, _, partition, base_offset, last_offset, durability, reserved8,
     reserved16) = _PRODUCE_REPLY.unpack_from(view)
    if reserved8 or reserved16:
        raise _corrupt("PRODUCE reply sets reserved bytes")
    _check_exact_size(view, PRODUCE_REPLY_BYTES, "PRODUCE reply")
    _check_produce_reply(partition, base_offset, last_offset, durability)
    return ProduceReply(msg_type & ~REPLY_BIT, partition, base_offset, last_offset,
                        _DURABILITY[durability], correlation_id)


def _decode_fetch_reply(view: memoryview) -> FetchReply:
    correlation_id = _check_reply_head(view, FETCH_REPLY_FIXED_BYTES, "FETCH reply")
    (_, _, _, _, _, _, partition, high_watermark, log_start_offset,
     log_end_offset) = _FETCH_REPLY.unpack_from(view)
    _check_fetch_reply(partition, high_watermark, log_start_offset, log_end_offset)
    return FetchReply(partition, high_watermark, log_start_offset, log_end_offset,
                      view[FETCH_REPLY_FIXED_BYTES:], correlation_id)


def _decode_list_offsets_reply(view: memoryview) -> ListOffsetsReply:
    correlation_id = _check_reply_head(view, LIST_OFFSETS_REPLY_BYTES, "LIST_OFFSETS reply")
    _check_exact_size(view, LIST_OFFSETS_REPLY_BYTES, "LIST_OFFSETS reply")
    (_, _, _, _, _, _, partition, offset,
     timestamp_ms) = _LIST_OFFSETS_REPLY.unpack_from(view)
    _check_list_offsets_reply(partition, offset, timestamp_ms)
    return ListOffsetsReply(partition, offset, timestamp_ms, correlation_id)


def _decode_offset_commit_reply(view: memoryview) -> OffsetCommitReply:
    correlation_id = _check_reply_head(view, REPLY_HEADER_BYTES, "OFFSET_COMMIT reply")
    _check_exact_size(view, REPLY_HEADER_BYTES, "OFFSET_COMMIT reply")
    return OffsetCommitReply(correlation_id)


def _decode_offset_fetch_reply(view: memoryview) -> OffsetFetchReply:
    correlation_id = _check_reply_head(view, OFFSET_FETCH_REPLY_FIXED_BYTES,
                                       "OFFSET_FETCH reply")
    (count,) = struct.unpack_from("<I", view, REPLY_HEADER_BYTES)
    if count > MAX_PARTITIONS:
        raise _corrupt(f"OFFSET_FETCH reply lists {count} partitions, at most {MAX_PARTITIONS}")
    _check_exact_size(view, OFFSET_FETCH_REPLY_FIXED_BYTES + count * _OFFSET_FETCH_ENTRY.size,
                      "OFFSET_FETCH reply")
    offsets = tuple(_OFFSET_FETCH_ENTRY.iter_unpack(view[OFFSET_FETCH_REPLY_FIXED_BYTES:]))
    _check_partition_list([partition for partition, _ in offsets], 0)
    for _, offset in offsets:
        _check_offset(offset, "committed offset", NO_OFFSET)
    return OffsetFetchReply(offsets, correlation_id)


def _decode_metadata_reply(view: memoryview) -> MetadataReply:
    correlation_id = _check_reply_head(view, REPLY_HEADER_BYTES, "METADATA reply")
    document = _loads_object(view[REPLY_HEADER_BYTES:], "METADATA reply",
                             ErrorCode.CORRUPT_MESSAGE)
    return MetadataReply(document, correlation_id)


def _decode_create_topic_reply(view: memoryview) -> CreateTopicReply:
    correlation_id = _check_reply_head(view, REPLY_HEADER_BYTES, "CREATE_TOPIC reply")
    document = _loads_object(view[REPLY_HEADER_BYTES:], "CREATE_TOPIC reply",
                             ErrorCode.CORRUPT_MESSAGE)
    return CreateTopicReply(document, correlation_id)


def _decode_ping_reply(view: memoryview) -> PingReply:
    correlation_id = _check_reply_head(view, REPLY_HEADER_BYTES, "PING reply")
    _check_exact_size(view, REPLY_HEADER_BYTES, "PING reply")
    return PingReply(correlation_id)


def _decode_replica_fetch_reply(view: memoryview) -> ReplicaFetchReply:
    correlation_id = _check_reply_head(view, REPLICA_FETCH_REPLY_FIXED_BYTES, "REPLICA_FETCH reply")
    (_, _, _, _, _, _, partition, high_watermark, log_start_offset, log_end_offset,
     leader_epoch, reserved) = _REPLICA_FETCH_REPLY.unpack_from(view)
    if reserved:
        raise _corrupt("REPLICA_FETCH reply sets reserved bytes")
    _check_fetch_reply(partition, high_watermark, log_start_offset, log_end_offset)
    _check_epoch(leader_epoch)
    return ReplicaFetchReply(partition, high_watermark, log_start_offset, log_end_offset,
                             leader_epoch, view[REPLICA_FETCH_REPLY_FIXED_BYTES:], correlation_id)


def _decode_epoch_end_offset_reply(view: memoryview) -> EpochEndOffsetReply:
    correlation_id = _check_reply_head(view, EPOCH_END_OFFSET_REPLY_BYTES, "EPOCH_END_OFFSET reply")
    _check_exact_size(view, EPOCH_END_OFFSET_REPLY_BYTES, "EPOCH_END_OFFSET reply")
    (_, _, _, _, _, _, partition, leader_epoch, end_offset) = _EPOCH_END_OFFSET_REPLY.unpack_from(view)
    _check_partition(partition)
    _check_epoch(leader_epoch, NO_EPOCH)
    _check_offset(end_offset, "end_offset")
    return EpochEndOffsetReply(partition, leader_epoch, end_offset, correlation_id)


def _decode_promote_reply(view: memoryview) -> PromoteReply:
    correlation_id = _check_reply_head(view, REPLY_HEADER_BYTES, "PROMOTE reply")
    document = _loads_object(view[REPLY_HEADER_BYTES:], "PROMOTE reply", ErrorCode.CORRUPT_MESSAGE)
    return PromoteReply(document, correlation_id)


_REPLY_DECODERS: dict[int, Callable[[memoryview], Reply]] = {
    MsgType.RECORD: _decode_produce_reply,
    MsgType.BATCH: _decode_produce_reply,
    MsgType.FETCH: _decode_fetch_reply,
    MsgType.LIST_OFFSETS: _decode_list_offsets_reply,
    MsgType.OFFSET_COMMIT: _decode_offset_commit_reply,
    MsgType.OFFSET_FETCH: _decode_offset_fetch_reply,
    MsgType.METADATA: _decode_metadata_reply,
    MsgType.CREATE_TOPIC: _decode_create_topic_reply,
    MsgType.PING: _decode_ping_reply,
    MsgType.REPLICA_FETCH: _decode_replica_fetch_reply,
    MsgType.EPOCH_END_OFFSET: _decode_epoch_end_offset_reply,
    MsgType.PROMOTE: _decode_promote_reply,
}
assert set(_REPLY_DECODERS) == set(MsgType)
