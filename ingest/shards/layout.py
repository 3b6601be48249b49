"""Byte layout of a Kafka RecordBatch v2 (magic 2), defined once.

Shared by the numba kernels and the Python codec so the two can never disagree.
All header integers are big-endian, as Kafka writes them.

RecordBatch =>
  baseOffset           int64    offset of the first record; patched by the broker on append
  batchLength          int32    bytes after this field (total size - 12)
  partitionLeaderEpoch int32
  magic                int8     = 2
  crc                  uint32   CRC32C of bytes [ATTRIBUTES_OFFSET, end)
  attributes           int16    bits 0-2 compression, 3 timestampType, 4 transactional, 5 control
  lastOffsetDelta      int32
  baseTimestamp        int64
  maxTimestamp         int64
  producerId           int64
  producerEpoch        int16
  baseSequence         int32
  recordsCount         int32
  records              [Record]

Record =>
  length         varint  bytes after this field
  attributes     int8    unused, 0
  timestampDelta varlong
  offsetDelta    varint
  keyLength      varint  -1 = null
  key            bytes
  valueLength    varint  -1 = null
  value          bytes
  headersCount   varint
  headers        [headerKeyLength varint, headerKey utf-8, headerValueLength varint, headerValue]

Varints are zigzag-encoded base-128 (protobuf style), as in Kafka's ByteUtils.
"""

BASE_OFFSET_OFFSET = 0
BASE_OFFSET_LENGTH = 8
LENGTH_OFFSET = BASE_OFFSET_OFFSET + BASE_OFFSET_LENGTH
LENGTH_LENGTH = 4
PARTITION_LEADER_EPOCH_OFFSET = LENGTH_OFFSET + LENGTH_LENGTH
PARTITION_LEADER_EPOCH_LENGTH = 4
MAGIC_OFFSET = PARTITION_LEADER_EPOCH_OFFSET + PARTITION_LEADER_EPOCH_LENGTH
MAGIC_LENGTH = 1
CRC_OFFSET = MAGIC_OFFSET + MAGIC_LENGTH
CRC_LENGTH = 4
ATTRIBUTES_OFFSET = CRC_OFFSET + CRC_LENGTH
ATTRIBUTES_LENGTH = 2
LAST_OFFSET_DELTA_OFFSET = ATTRIBUTES_OFFSET + ATTRIBUTES_LENGTH
LAST_OFFSET_DELTA_LENGTH = 4
BASE_TIMESTAMP_OFFSET = LAST_OFFSET_DELTA_OFFSET + LAST_OFFSET_DELTA_LENGTH
BASE_TIMESTAMP_LENGTH = 8
MAX_TIMESTAMP_OFFSET = BASE_TIMESTAMP_OFFSET + BASE_TIMESTAMP_LENGTH
MAX_TIMESTAMP_LENGTH = 8
PRODUCER_ID_OFFSET = MAX_TIMESTAMP_OFFSET + MAX_TIMESTAMP_LENGTH
PRODUCER_ID_LENGTH = 8
PRODUCER_EPOCH_OFFSET = PRODUCER_ID_OFFSET + PRODUCER_ID_LENGTH
PRODUCER_EPOCH_LENGTH = 2
BASE_SEQUENCE_OFFSET = PRODUCER_EPOCH_OFFSET + PRODUCER_EPOCH_LENGTH
BASE_SEQUENCE_LENGTH = 4
RECORDS_COUNT_OFFSET = BASE_SEQUENCE_OFFSET + BASE_SEQUENCE_LENGTH
RECORDS_COUNT_LENGTH = 4
RECORDS_OFFSET = RECORDS_COUNT_OFFSET + RECORDS_COUNT_LENGTH
RECORD_BATCH_OVERHEAD = RECORDS_OFFSET

# The part of the header before batchLength: a reader needs this many bytes to size a batch.
LOG_OVERHEAD = LENGTH_OFFSET + LENGTH_LENGTH

MAGIC_V2 = 2
COMPRESSION_CODEC_MASK = 0x07
TIMESTAMP_TYPE_MASK = 0x08
TRANSACTIONAL_FLAG_MASK = 0x10
CONTROL_FLAG_MASK = 0x20

NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
NO_SEQUENCE = -1
NO_PARTITION_LEADER_EPOCH = -1

# A record's framing can never be shorter than: length(1) attributes(1) tsDelta(1)
# offsetDelta(1) keyLen(1) valueLen(1) headersCount(1).
RECORD_MIN_BYTES = 7

assert RECORD_BATCH_OVERHEAD == 61, RECORD_BATCH_OVERHEAD
assert CRC_OFFSET == 17 and ATTRIBUTES_OFFSET == 21
