"""Fire-and-forget intake: thousands of PUSH frames in, a few RecordBatches out.

Per record the worker's Python does only `recv` and a list append; everything else is one
kernel call per loop turn over all frames at once: parse and check each RECORD frame,
find its topic, pick its partition (Kafka's murmur2 of the key), convert its headers to
Kafka's encoding. Python then groups the rows by (topic, partition) with numpy and hands
each group to the batch encoder: one append (or one forwarded BATCH frame, for
partitions another worker owns) per group.

BATCH frames on PULL (SDK with acks=0, batches forwarded by other workers) go through the
same validation and append as acked produce.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

from ingest.clock import now_ms as wall_ms
from ingest.net import wire
from ingest.net.errors import ErrorCode, IngestError
from ingest.shards import batch as batch_codec
from ingest.shards import kernels
from ingest.shards.kernels import borrowed, partition_for_key, write_varint, zigzag

log = logging.getLogger("ingest.intake")

# Row status codes written by parse_record_frames (>= 0 means: the topic's index).
ROW_MALFORMED = -1
ROW_UNKNOWN_TOPIC = -2
ROW_TOO_LARGE = -3
ROW_BAD_PARTITION = -4
ROW_BATCH_FRAME = -5
ROW_UNSUPPORTED_VERSION = -6
ROW_REASONS = {ROW_MALFORMED: "malformed", ROW_UNKNOWN_TOPIC: "unknown_topic", ROW_TOO_LARGE: "too_large",
               ROW_BAD_PARTITION: "bad_partition", ROW_UNSUPPORTED_VERSION: "unsupported_version"}

# Columns of the int64 rows array filled by the kernel.
C_STATUS, C_PARTITION, C_KEY_OFF, C_KEY_LEN, C_VAL_OFF, C_VAL_LEN, C_TS, C_HDR_OFF, C_HDR_LEN = range(9)
COLUMNS = 9
# Kafka's varints take at most 5 bytes where our frame fields take 2 or 4: converted
# headers need at most this many bytes per frame byte, plus the count varint per frame.
HEADER_EXPANSION = 2

_V = wire.VERSION_OFFSET
_T = wire.MSG_TYPE_OFFSET
_F = wire.FLAGS_OFFSET
_TL = wire.RECORD_TOPIC_LENGTH_OFFSET
_RS = wire.RECORD_RESERVED_OFFSET
_HC = wire.RECORD_HEADER_COUNT_OFFSET
_KL = wire.RECORD_KEY_LENGTH_OFFSET
_TS = wire.RECORD_TIMESTAMP_OFFSET
_PA = wire.RECORD_PARTITION_OFFSET
_FIXED = wire.RECORD_FIXED_BYTES
_VERSION = wire.PROTOCOL_VERSION
_TYPE_RECORD = int(wire.MsgType.RECORD)
_TYPE_BATCH = int(wire.MsgType.BATCH)
_FLAGS_KNOWN = wire.RECORD_FLAGS_KNOWN
_FLAG_NULL_VALUE = wire.RECORD_FLAG_NULL_VALUE
_FLAG_HAS_TIMESTAMP = wire.RECORD_FLAG_HAS_TIMESTAMP
_MAX_HEADERS = wire.MAX_HEADERS


@njit(cache=True)
def _le(buf, p, width):
    v = 0
    for j in range(width):
        v |= np.int64(buf[p + j]) << (8 * j)
    return v


@njit(cache=True)
def _le_signed(buf, p, width):
    v = _le(buf, p, width)
    sign = np.int64(1) << (8 * width - 1)
    return v - (sign << 1) if v & sign else v


@njit(cache=True)
def _find_topic(buf, p, length, names, name_starts, name_ends):
    for t in range(name_starts.size):
        if name_ends[t] - name_starts[t] != length:
            continue
        same = True
        for j in range(length):
            if names[name_starts[t] + j] != buf[p + j]:
                same = False
                break
        if same:
            return t
    return ROW_UNKNOWN_TOPIC


@njit(cache=True)
def _utf8_ok(buf, p, end):
    """True if buf[p:end] is well-formed UTF-8 (Kafka header keys are strings; a consumer
    decoding them must not fail on bytes we accepted)."""
    while p < end:
        b = buf[p]
        if b < 0x80:
            p += 1
            continue
        if 0xC2 <= b <= 0xDF:
            n, low, high = 1, 0x80, 0xBF
        elif 0xE0 <= b <= 0xEF:
            n = 2
            low = 0xA0 if b == 0xE0 else 0x80
            high = 0x9F if b == 0xED else 0xBF
        elif 0xF0 <= b <= 0xF4:
            n = 3
            low = 0x90 if b == 0xF0 else 0x80
            high = 0x8F if b == 0xF4 else 0xBF
        else:
            return False
        if p + 1 + n > end or not low <= buf[p + 1] <= high:
            return False
        for j in range(2, n + 1):
            if not 0x80 <= buf[p + j] <= 0xBF:
                return False
        p += 1 + n
    return True


@njit(cache=True)
def _convert_headers(buf, p, end, count, out, q):
    """Wire headers at buf[p:] -> Kafka's (count varint, then varint-prefixed fields).

    Returns (position after the wire headers, new out position), or (-1, q) if malformed.
    """
    q = write_varint(out, q, zigzag(count))
    for _ in range(count):
        if p + 2 > end:
            return -1, q
        name_len = _le(buf, p, 2)
        p += 2
        if p + name_len + 4 > end or not _utf8_ok(buf, p, p + name_len):
            return -1, q
        q = write_varint(out, q, zigzag(name_len))
        for j in range(name_len):
            out[q + j] = buf[p + j]
        q += name_len
        p += name_len
        value_len = _le_signed(buf, p, 4)
        p += 4
        if value_len < -1 or p + max(value_len, 0) > end:
            return -1, q
        q = write_varint(out, q, zigzag(value_len))
        for j in range(max(value_len, 0)):
            out[q + j] = buf[p + j]
        q += max(value_len, 0)
        p += max(value_len, 0)
    return p, q


@njit(cache=True)
def _parse_one(buf, p, end, names, name_starts, name_ends, partitions, max_record_bytes,
               now_ms, rows, i, hdr_out, q):
    """Fill rows[i] for the frame buf[p:end]; returns the new header-output position."""
    rows[i, C_STATUS] = ROW_MALFORMED
    if end - p < _F:
        return q
    if buf[p + _V] != _VERSION:
        rows[i, C_STATUS] = ROW_UNSUPPORTED_VERSION
        return q
    if buf[p + _T] == _TYPE_BATCH:
        rows[i, C_STATUS] = ROW_BATCH_FRAME
        return q
    if buf[p + _T] != _TYPE_RECORD or end - p < _FIXED:
        return q
    flags = _le(buf, p + _F, 2)
    topic_len = buf[p + _TL]
    header_count = _le(buf, p + _HC, 2)
    key_len = _le_signed(buf, p + _KL, 4)
    if flags & ~_FLAGS_KNOWN or buf[p + _RS] != 0 or topic_len == 0 or header_count > _MAX_HEADERS:
        return q
    pos = p + _FIXED + topic_len
    if key_len < -1 or pos + max(key_len, 0) > end:
        return q
    topic = _find_topic(buf, p + _FIXED, topic_len, names, name_starts, name_ends)
    key_off = pos
    pos += max(key_len, 0)
    hdr_start = q
    if header_count > 0:
        pos, q = _convert_headers(buf, pos, end, header_count, hdr_out, q)
        if pos < 0:
            return hdr_start
    null_value = flags & _FLAG_NULL_VALUE
    if null_value and pos != end:
        return hdr_start
    value_len = -1 if null_value else end - pos
    if max(key_len, 0) + max(value_len, 0) + (q - hdr_start) > max_record_bytes:
        rows[i, C_STATUS] = ROW_TOO_LARGE
        return hdr_start
    timestamp = _le_signed(buf, p + _TS, 8)
    if timestamp < 0 or (timestamp != 0 and not flags & _FLAG_HAS_TIMESTAMP):
        return hdr_start  # the spec: timestamp_ms is 0 unless its flag says it is set
    if not flags & _FLAG_HAS_TIMESTAMP:
        timestamp = now_ms
    rows[i, C_STATUS] = topic
    if topic < 0:
        return hdr_start
    partition = _le_signed(buf, p + _PA, 4)
    if partition == -1 and key_len >= 0:
        partition = partition_for_key(buf, key_off, key_off + key_len, partitions[topic])
    elif partition < -1 or partition >= partitions[topic]:
        rows[i, C_STATUS] = ROW_BAD_PARTITION
        return hdr_start
    rows[i, C_PARTITION] = partition
    rows[i, C_KEY_OFF] = key_off
    rows[i, C_KEY_LEN] = key_len
    rows[i, C_VAL_OFF] = pos
    rows[i, C_VAL_LEN] = value_len
    rows[i, C_TS] = timestamp
    rows[i, C_HDR_OFF] = hdr_start
    rows[i, C_HDR_LEN] = q - hdr_start
    return q


@njit(cache=True)
def parse_record_frames(buf, frame_ends, names, name_starts, name_ends, partitions,
                        max_record_bytes, now_ms, rows, hdr_out):
    """Parse every frame buf[frame_ends[i-1]:frame_ends[i]] into rows[i]; no I/O."""
    # Borrowed views: no atomic reference counting around each per-frame call.
    buf, frame_ends, rows, hdr_out = borrowed(buf), borrowed(frame_ends), borrowed(rows), borrowed(hdr_out)
    names, name_starts, name_ends = borrowed(names), borrowed(name_starts), borrowed(name_ends)
    partitions = borrowed(partitions)
    q = 0
    start = 0
    for i in range(frame_ends.size):
        q = _parse_one(buf, start, frame_ends[i], names, name_starts, name_ends, partitions,
                       max_record_bytes, now_ms, rows, i, hdr_out, q)
        start = frame_ends[i]
    return q


class TopicTable:
    """The worker's topics as flat arrays for the kernel; rebuilt when topics change."""

    def __init__(self, topics: dict[str, dict]) -> None:
        self.names = list(topics)
        encoded = [n.encode() for n in self.names]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        self.name_ends = np.cumsum(lengths)
        self.name_starts = self.name_ends - lengths
        self.blob = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
        self.partitions = np.array([topics[n]["partitions"] for n in self.names], dtype=np.int64)


class RecordIntake:
    def __init__(self, worker) -> None:
        self.w = worker
        self._table: TopicTable | None = None
        self._table_source: dict | None = None
        self._sticky: dict[str, int] = {}
        self._owned: dict[str, tuple[int, list[int]]] = {}

    def table(self) -> TopicTable:
        if self._table_source is not self.w.topics:
            self._table = TopicTable(self.w.topics)
            self._table_source = self.w.topics
        return self._table

    # ---- PUSH frames -------------------------------------------------------------------

    def on_frames(self, frames: list[bytes], mono_ms: int, now_ms: int) -> None:
        table = self.table()
        lengths = np.fromiter(map(len, frames), dtype=np.int64, count=len(frames))
        joined = b"".join(frames)
        buf = np.frombuffer(joined, dtype=np.uint8)
        rows = np.empty((len(frames), COLUMNS), dtype=np.int64)
        hdr_out = np.empty(HEADER_EXPANSION * len(joined) + 5 * len(frames), dtype=np.uint8)
        parse_record_frames(buf, np.cumsum(lengths), table.blob, table.name_starts, table.name_ends,
                            table.partitions, self.w.config.limits.max_record_bytes, now_ms, rows, hdr_out)
        status = rows[:, C_STATUS]
        if (status < 0).any():
            self._on_exceptional_rows(frames, status, now_ms)
        good = np.flatnonzero(status >= 0)
        if good.size:
            self._append_rows(table, rows, good, buf, hdr_out, now_ms)

    def _on_exceptional_rows(self, frames: list[bytes], status: np.ndarray, now_ms: int) -> None:
        for i in np.flatnonzero(status < 0):
            code = int(status[i])
            if code == ROW_BATCH_FRAME:
                self._on_batch_frame(frames[i], now_ms)
            elif code == ROW_UNKNOWN_TOPIC and self.w.config.server.auto_create_topics:
                self._park(frames[i])
            else:
                self.w.probe.invalid(ROW_REASONS[code])

    def _park(self, frame: bytes) -> None:
        try:
            msg = wire.decode_request(frame)
        except wire.WireError:
            self.w.probe.invalid("malformed")
            return
        self.w.park(msg.topic, frame)

    def _on_batch_frame(self, frame: bytes, now_ms: int) -> None:
        records = 1
        try:
            msg = wire.decode_request(frame)
            # The wire codec checked the batch's framing: its header is there to read.
            records = batch_codec.parse_header(msg.batch).last_offset_delta + 1
            if msg.topic not in self.w.topics and self.w.config.server.auto_create_topics:
                self.w.park(msg.topic, frame, records)
                return
            if not self.w.owns(msg.partition) and msg.topic in self.w.topics:
                self.w.forward_batch(msg.topic, msg.partition, msg.batch, records)
                return
            self.w.requests.accept_batch(msg.topic, msg.partition, msg.batch, now_ms)
        except wire.WireError as e:
            self.w.probe.invalid(e.code.name.lower())
        except IngestError as e:
            self._count_refused(e, records)  # a refused batch drops every record in it

    def _count_refused(self, error: IngestError, records: int) -> None:
        """Count a PUSH append that failed exactly once: a drop when the appliance could not
        store good records (disk, I/O), invalid input otherwise. Corrupt and oversized
        batches were already counted as invalid by the worker's append."""
        if error.code in (ErrorCode.CORRUPT_MESSAGE, ErrorCode.MESSAGE_TOO_LARGE):
            return
        reason = ErrorCode(error.code).name.lower()
        if error.code in (ErrorCode.DISK_FULL, ErrorCode.STORAGE_ERROR, ErrorCode.NOT_LEADER):
            self.w.probe.dropped(reason, records)
        else:
            self.w.probe.invalid(reason)

    def _sticky_partition(self, topic: str, count: int) -> int:
        """Where null-key records go: a partition this worker owns (so they never move),
        rotating over the owned ones from one loop turn to the next to spread load."""
        owned = self._owned.get(topic)
        if owned is None or owned[0] != count:
            owned = self._owned[topic] = (count, [q for q in range(count) if self.w.owns(q)] or [0])
        turn = self._sticky.get(topic, 0)
        self._sticky[topic] = turn + 1
        return owned[1][turn % len(owned[1])]

    def _append_rows(self, table: TopicTable, rows, good, buf, hdr_out, now_ms: int) -> None:
        part_col = rows[good, C_PARTITION]
        topic_col = rows[good, C_STATUS]
        keyless = part_col == -1
        if keyless.any():
            for t in np.unique(topic_col[keyless]):
                name = table.names[t]
                sel = keyless & (topic_col == t)
                part_col[sel] = self._sticky_partition(name, int(table.partitions[t]))
        group_keys = topic_col * wire.MAX_PARTITIONS + part_col
        order = np.argsort(group_keys, kind="stable")
        sorted_keys = group_keys[order]
        bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
        for chunk in np.split(order, bounds):
            idx = good[chunk]
            t = int(topic_col[chunk[0]])
            p = int(part_col[chunk[0]])
            self._encode_and_store(table.names[t], p, rows, idx, buf, hdr_out, now_ms)

    def _encode_and_store(self, topic: str, partition: int, rows, idx, buf, hdr_out, now_ms: int) -> None:
        sel = rows[idx]
        batch = encode_rows(buf, sel, hdr_out)
        if self.w.owns(partition):
            try:
                self.w.requests.accept_batch(topic, partition, batch, now_ms)
            except IngestError as e:
                self._count_refused(e, len(idx))
        else:
            self.w.forward_batch(topic, partition, batch, len(idx))

    # ---- raw listener ------------------------------------------------------------------

    def on_raw_frames(self, topic: str, frames: list[bytes], now_ms: int) -> None:
        """Each frame is one record value, stamped with arrival time, null key."""
        t = self.w.topics.get(topic)
        if t is None:
            return
        limit = self.w.config.limits.max_record_bytes
        lengths = np.fromiter(map(len, frames), dtype=np.int64, count=len(frames))
        too_large = lengths > limit
        if too_large.any():
            self.w.probe.invalid("too_large", int(too_large.sum()))
            frames = [f for f, big in zip(frames, too_large) if not big]
            lengths = lengths[~too_large]
            if not frames:
                return
        n = len(frames)
        ends = np.cumsum(lengths)
        rows = np.zeros((n, COLUMNS), dtype=np.int64)
        rows[:, C_KEY_LEN] = -1
        rows[:, C_VAL_OFF] = ends - lengths
        rows[:, C_VAL_LEN] = lengths
        rows[:, C_TS] = now_ms
        buf = np.frombuffer(b"".join(frames), dtype=np.uint8)
        partition = self._sticky_partition(topic, t["partitions"])
        self._encode_and_store(topic, partition, rows, np.arange(n), buf, _EMPTY, now_ms)

    # ---- acked single records ----------------------------------------------------------

    def single_record_batch(self, msg) -> tuple[str, int, bytes]:
        """(topic, partition, one-record batch) for an acked RECORD request."""
        t = self.w.topics.get(msg.topic)
        if t is None:
            raise IngestError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"topic {msg.topic} does not exist")
        size = sum(len(x) for x in (msg.key or b"", msg.value or b"")) + sum(len(v or b"") for _, v in msg.headers)
        if size > self.w.config.limits.max_record_bytes:
            raise IngestError(ErrorCode.MESSAGE_TOO_LARGE, f"record of {size} bytes exceeds max_record_bytes")
        partition = msg.partition
        if partition == wire.AUTO_PARTITION:
            if msg.key is not None:
                key = np.frombuffer(msg.key, dtype=np.uint8)
                partition = int(partition_for_key(key, 0, key.size, t["partitions"]))
            else:
                partition = self._sticky_partition(msg.topic, t["partitions"])
        timestamp = msg.timestamp_ms if msg.timestamp_ms is not None else wall_ms()
        record = batch_codec.Record(0, timestamp, _bytes(msg.key), _bytes(msg.value),
                                    tuple((n, _bytes(v)) for n, v in msg.headers))
        return msg.topic, partition, batch_codec.encode_batch([record])


_EMPTY = np.zeros(1, dtype=np.uint8)


def _bytes(view) -> bytes | None:
    return None if view is None else bytes(view)


def encode_rows(buf: np.ndarray, sel: np.ndarray, hdr_out: np.ndarray) -> bytes:
    """One RecordBatch (base offset 0) of the rows `sel` whose fields lie in buf/hdr_out."""
    hdr_len = sel[:, C_HDR_LEN]
    has_headers = bool(hdr_len.any())
    hdr_off = sel[:, C_HDR_OFF] if has_headers else _NO_ROWS
    hdr_len = hdr_len if has_headers else _NO_ROWS
    val_len = sel[:, C_VAL_LEN]
    key_len = sel[:, C_KEY_LEN]
    out = np.empty(kernels.encoded_size_upper_bound(val_len, key_len, hdr_len), dtype=np.uint8)
    end = kernels.encode_records(buf, sel[:, C_VAL_OFF].copy(), val_len.copy(), buf, sel[:, C_KEY_OFF].copy(),
                                 key_len.copy(), sel[:, C_TS].copy(), hdr_out, hdr_off.copy(), hdr_len.copy(),
                                 0, -1, -1, -1, -1, out, 0)
    if end < 0:
        raise AssertionError(f"encode_records failed with {end} on rows the parser accepted")
    return out[:end].tobytes()


_NO_ROWS = np.zeros(0, dtype=np.int64)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel of the hot path before READY,
    so the first records do not pay seconds of JIT."""
    frame = wire.RecordMessage(topic="warm-up", value=b"v", key=b"k", headers=(("h", b"x"),)).encode()
    table = TopicTable({"warm-up": {"partitions": 1}})
    buf = np.frombuffer(frame, dtype=np.uint8)
    rows = np.empty((1, COLUMNS), dtype=np.int64)
    hdr_out = np.empty(HEADER_EXPANSION * len(frame) + 5, dtype=np.uint8)
    parse_record_frames(buf, np.array([len(frame)], dtype=np.int64), table.blob, table.name_starts,
                        table.name_ends, table.partitions, 1 << 20, 0, rows, hdr_out)
    assert rows[0, C_STATUS] == 0, rows[0]
    batch = encode_rows(buf, rows, hdr_out)
    code = kernels.validate_batch(np.frombuffer(batch, dtype=np.uint8), 0, len(batch), 1 << 20)
    assert code == kernels.OK, code
    batch_codec.parse_header(batch)
