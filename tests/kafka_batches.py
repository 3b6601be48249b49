"""Test helpers: build and parse RecordBatch v2 with kafka-python, independently of ours."""

import random
import struct
from dataclasses import dataclass

from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

BATCH_BUILDER_BYTES_MAX = 1 << 30


def make_batch(count: int = 3, timestamp_ms: int = 1_000, value_bytes: int = 100,
               seed: int = 0, timestamps_ms: list[int] | None = None) -> bytes:
    """One uncompressed batch of `count` records with random values, baseOffset 0."""
    rng = random.Random(seed)
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=BATCH_BUILDER_BYTES_MAX)
    for i in range(count):
        ts = timestamps_ms[i] if timestamps_ms is not None else timestamp_ms + i
        builder.append(i, timestamp=ts, key=None, value=rng.randbytes(value_bytes), headers=[])
    return bytes(builder.build())


@dataclass(frozen=True)
class ParsedBatch:
    position: int
    size: int
    base_offset: int
    last_offset: int
    max_timestamp_ms: int
    leader_epoch: int
    crc_ok: bool
    records: list  # (offset, timestamp_ms, value)


def parse_batches(data: bytes) -> list[ParsedBatch]:
    """Every whole batch in `data`, in order (kafka-python's reader)."""
    out, position = [], 0
    while position + 12 <= len(data):
        size = 12 + struct.unpack_from(">i", data, position + 8)[0]
        if position + size > len(data):
            break
        batch = DefaultRecordBatch(bytes(data[position:position + size]))
        crc_ok = batch.validate_crc()
        records = [(r.offset, r.timestamp, r.value) for r in batch] if crc_ok else []
        out.append(ParsedBatch(position, size, batch.base_offset, batch.last_offset,
                               batch.max_timestamp, batch.leader_epoch, crc_ok, records))
        position += size
    return out


def kafka_index_entries(batches: list[ParsedBatch], base_offset: int,
                        index_interval_bytes: int, sealed: bool):
    """The .index and .timeindex entries Kafka's LogSegment.append would write for these
    batches of one segment, in order: ([(last_offset, position)], [(timestamp, offset)])."""
    offset_entries, time_entries = [], []
    bytes_since_last_entry = 0
    max_ts, offset_of_max = -1, base_offset

    def maybe_append_time(ts, offset):
        if ts > (time_entries[-1][0] if time_entries else -1):
            time_entries.append((ts, offset))

    for batch in batches:
        if batch.max_timestamp_ms > max_ts:
            max_ts, offset_of_max = batch.max_timestamp_ms, batch.last_offset
        if bytes_since_last_entry > index_interval_bytes:
            offset_entries.append((batch.last_offset, batch.position))
            maybe_append_time(max_ts, offset_of_max)
            bytes_since_last_entry = 0
        bytes_since_last_entry += batch.size
    if sealed:
        maybe_append_time(max_ts, offset_of_max)
    return offset_entries, time_entries
