"""The wire protocol v1 codec: what each frame looks like, byte by byte, and what a
malformed frame does (raise WireError, never anything else)."""

from __future__ import annotations

import ast
import random
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch

from ingest.net import errors, wire
from ingest.net.errors import ErrorCode, IngestError, WireError
from ingest.net.wire import (
    BatchMessage, CreateTopicReply, CreateTopicRequest, Durability, ErrorReply, FetchReply,
    FetchRequest, ListOffsetsReply, ListOffsetsRequest, MetadataReply, MetadataRequest,
    MsgType, OffsetCommitReply, OffsetCommitRequest, OffsetFetchReply, OffsetFetchRequest,
    PingReply, PingRequest, ProduceReply, RecordMessage, decode_reply, decode_request,
    encode, error_reply_for, peek_header)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"

# The RECORD frame documented in docs/PROTOCOL.md. Fixed bytes: if the layout changes,
# this test fails, and so must the document and every device's firmware.
GOLDEN_RECORD = RecordMessage(
    topic="sensors", value=b'{"t":21.5}', key=b"dev-42", partition=wire.AUTO_PARTITION,
    timestamp_ms=1_700_000_000_000, headers=(("ct", b"json"),), acks=Durability.FSYNC,
    correlation_id=7)
GOLDEN_RECORD_HEX = (
    "01010a00" "07000000"          # version 1, RECORD, flags acks=2|timestamp, correlation 7
    "07" "00" "0100" "06000000"    # topic_len 7, reserved, 1 header, key_len 6
    "0068e5cf8b010000"             # timestamp_ms 1700000000000
    "ffffffff"                     # partition -1: the appliance picks
    "73656e736f7273"               # "sensors"
    "6465762d3432"                 # key "dev-42"
    "0200" "6374" "04000000" "6a736f6e"  # header "ct" = "json"
    "7b2274223a32312e357d")        # value {"t":21.5}

# A real Kafka RecordBatch v2 (built by kafka-python: producerId 1000, epoch 0,
# baseSequence 0, two records), embedded untouched, big-endian.
KAFKA_BATCH_HEX = (
    "0000000000000000000000600000000002c959dac00000000000010000018bcfe568000000018bcfe568fa"
    "00000000000003e8000000000000000000022c0000000c6465762d3432147b2274223a32312e357d002e00"
    "f403020c6465762d3432147b2274223a32312e367d00")
GOLDEN_BATCH = BatchMessage(topic="sensors", partition=3,
                            batch=bytes.fromhex(KAFKA_BATCH_HEX), acks=Durability.ALL,
                            correlation_id=0x01020304)
GOLDEN_BATCH_HEX = (
    "01020300" "04030201"   # version 1, BATCH, flags acks=3, correlation 0x01020304
    "07" "000000"           # topic_len 7, 3 reserved bytes
    "03000000"              # partition 3
    "73656e736f7273"        # "sensors"
    + KAFKA_BATCH_HEX)


# --- golden bytes --------------------------------------------------------------------

def test_record_frame_is_exactly_the_documented_bytes():
    assert encode(GOLDEN_RECORD).hex() == GOLDEN_RECORD_HEX
    assert decode_request(bytes.fromhex(GOLDEN_RECORD_HEX)) == GOLDEN_RECORD


def test_batch_frame_is_exactly_the_documented_bytes_with_kafkas_batch_untouched():
    frame = encode(GOLDEN_BATCH)
    assert frame.hex() == GOLDEN_BATCH_HEX
    decoded = decode_request(frame)
    assert decoded == GOLDEN_BATCH
    kafka_batch = DefaultRecordBatch(bytes(decoded.batch))
    assert (kafka_batch.producer_id, kafka_batch.producer_epoch,
            kafka_batch.base_sequence) == (1000, 0, 0)
    assert [record.value for record in kafka_batch] == [b'{"t":21.5}', b'{"t":21.6}']


def _doc_hex_dump(marker: str) -> str:
    text = PROTOCOL_MD.read_text()
    match = re.search(re.escape(marker) + r"\s*```[a-z]*\n(.*?)```", text, re.S)
    assert match, f"{marker} block missing from {PROTOCOL_MD}"
    rows = [line.split()[1:] for line in match.group(1).strip().splitlines()]
    return "".join("".join(row) for row in rows)


def test_protocol_md_hex_dump_is_what_the_codec_produces():
    assert _doc_hex_dump("<!-- golden: record-frame -->") == encode(GOLDEN_RECORD).hex()


def test_protocol_md_error_table_matches_the_error_codes():
    text = PROTOCOL_MD.read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`?([A-Z_]+)`?\s*\|\s*(yes|no)\s*\|", text, re.M)
    documented = {int(number): (name, retriable == "yes") for number, name, retriable in rows}
    actual = {int(code): (code.name, code.retriable) for code in ErrorCode}
    assert documented == actual


def test_protocol_md_message_type_table_matches_the_codec():
    text = PROTOCOL_MD.read_text()
    rows = re.findall(r"^\|\s*0x([0-9a-f]{2})\s*\|\s*`?([A-Z_]+)`?\s*\|", text, re.M)
    assert {int(number, 16): name for number, name in rows} == {
        int(msg_type): msg_type.name for msg_type in MsgType}


def test_record_layout_constants_locate_the_fields_of_a_real_frame():
    frame = encode(GOLDEN_RECORD)

    def field(offset: int, length: int) -> int:
        return int.from_bytes(frame[offset:offset + length], "little", signed=True)

    assert wire.RECORD_FIXED_BYTES == wire.RECORD_TOPIC_OFFSET == 28
    assert field(wire.RECORD_TOPIC_LENGTH_OFFSET, wire.RECORD_TOPIC_LENGTH_LENGTH) == 7
    assert field(wire.RECORD_HEADER_COUNT_OFFSET, wire.RECORD_HEADER_COUNT_LENGTH) == 1
    assert field(wire.RECORD_KEY_LENGTH_OFFSET, wire.RECORD_KEY_LENGTH_LENGTH) == 6
    assert field(wire.RECORD_TIMESTAMP_OFFSET, wire.RECORD_TIMESTAMP_LENGTH) == 1_700_000_000_000
    assert field(wire.RECORD_PARTITION_OFFSET, wire.RECORD_PARTITION_LENGTH) == -1
    assert frame[wire.RECORD_TOPIC_OFFSET:wire.RECORD_TOPIC_OFFSET + 7] == b"sensors"
    flags = field(wire.FLAGS_OFFSET, wire.FLAGS_LENGTH)
    assert flags & wire.FLAGS_ACKS_MASK == Durability.FSYNC
    assert flags & wire.RECORD_FLAG_HAS_TIMESTAMP and not flags & wire.RECORD_FLAG_NULL_VALUE


def test_layout_constants_are_plain_ints_a_numba_kernel_can_freeze():
    suffixes = ("_OFFSET", "_LENGTH", "_BYTES", "_MASK", "_KNOWN")
    names = [name for name in dir(wire) if name.isupper() and not name.startswith("_")
             and (name.endswith(suffixes) or name.startswith("RECORD_FLAG"))]
    assert len(names) > 30
    assert all(type(getattr(wire, name)) is int for name in names)
    assert len(wire.NAME_BYTE_ALLOWED) == 256
    assert bytes(b for b in range(256) if wire.NAME_BYTE_ALLOWED[b]) == bytes(sorted(
        wire.NAME_CHARS))


def test_codec_imports_no_socket_library():
    for module in (wire, errors):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"zmq", "socket", "asyncio", "selectors", "select"}, module


# --- strategies ----------------------------------------------------------------------

NAME_ALPHABET = wire.NAME_CHARS.decode()
names = st.text(NAME_ALPHABET, min_size=1, max_size=wire.MAX_TOPIC_BYTES).filter(
    lambda name: name not in (".", ".."))
short_names = st.text(NAME_ALPHABET, min_size=1, max_size=12).filter(
    lambda name: name not in (".", ".."))
topics = st.one_of(short_names, names)
partitions = st.integers(0, 2**31 - 1)
offsets = st.integers(0, 2**63 - 1)
correlation_ids = st.integers(0, 2**32 - 1)
durabilities = st.sampled_from(Durability)
payloads = st.binary(max_size=200)
json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                        st.text(max_size=20))
documents = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


def _frame_a_batch(data: bytes) -> bytes:
    """Random bytes made into a well-framed RecordBatch (magic 2, exact batchLength)."""
    batch = bytearray(data)
    batch[8:12] = struct.pack(">i", len(batch) - 12)
    batch[16] = 2
    return bytes(batch)


record_messages = st.builds(
    RecordMessage, topic=topics, value=st.none() | payloads, key=st.none() | payloads,
    partition=st.just(-1) | partitions, timestamp_ms=st.none() | offsets,
    headers=st.lists(st.tuples(st.text(max_size=12), st.none() | st.binary(max_size=20)),
                     max_size=wire.MAX_HEADERS).map(tuple),
    acks=durabilities, correlation_id=correlation_ids)
batch_messages = st.builds(
    BatchMessage, topic=topics, partition=partitions,
    batch=st.binary(min_size=61, max_size=300).map(_frame_a_batch), acks=durabilities,
    correlation_id=correlation_ids)


@st.composite
def fetch_requests(draw):
    max_bytes = draw(st.integers(1, wire.MAX_FETCH_BYTES))
    return FetchRequest(draw(topics), draw(partitions), draw(offsets), max_bytes,
                        draw(st.integers(0, wire.MAX_FETCH_WAIT_MS)),
                        draw(st.integers(0, max_bytes)), draw(correlation_ids))


def _unique_partitions(min_size: int, max_size: int = 40):
    return st.lists(partitions, min_size=min_size, max_size=max_size, unique=True)


list_offsets_requests = st.builds(
    ListOffsetsRequest, topic=topics, partition=partitions,
    timestamp_ms=st.integers(wire.EARLIEST_TIMESTAMP, 2**63 - 1),
    correlation_id=correlation_ids)
offset_commit_requests = st.builds(
    lambda group, topic, parts, data, cid: OffsetCommitRequest(
        group, topic, tuple(zip(parts, data.draw(st.lists(
            offsets, min_size=len(parts), max_size=len(parts))))), cid),
    names, topics, _unique_partitions(1), st.data(), correlation_ids)
offset_fetch_requests = st.builds(
    lambda group, topic, parts, cid: OffsetFetchRequest(group, topic, tuple(parts), cid),
    names, topics, _unique_partitions(0), correlation_ids)
metadata_requests = st.builds(MetadataRequest, query=st.none() | documents,
                              correlation_id=correlation_ids)
create_topic_requests = st.builds(
    CreateTopicRequest, topic=topics, partitions=st.integers(1, wire.MAX_PARTITIONS),
    config=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    correlation_id=correlation_ids)
ping_requests = st.builds(PingRequest, correlation_id=correlation_ids)

requests = st.one_of(record_messages, batch_messages, fetch_requests(),
                     list_offsets_requests, offset_commit_requests, offset_fetch_requests,
                     metadata_requests, create_topic_requests, ping_requests)


@st.composite
def produce_replies(draw):
    base_offset = draw(offsets)
    return ProduceReply(draw(st.sampled_from([MsgType.RECORD, MsgType.BATCH])),
                        draw(partitions), base_offset, draw(st.integers(base_offset, 2**63 - 1)),
                        draw(durabilities), draw(correlation_ids))


@st.composite
def fetch_replies(draw):
    log_start, high_watermark, log_end = sorted(draw(st.lists(offsets, min_size=3,
                                                              max_size=3)))
    return FetchReply(draw(partitions), high_watermark, log_start, log_end,
                      draw(st.binary(max_size=300)), draw(correlation_ids))


list_offsets_replies = st.builds(
    ListOffsetsReply, partition=partitions, offset=st.integers(-1, 2**63 - 1),
    timestamp_ms=st.integers(-1, 2**63 - 1), correlation_id=correlation_ids)
offset_fetch_replies = st.builds(
    lambda parts, data, cid: OffsetFetchReply(tuple(zip(parts, data.draw(st.lists(
        st.integers(-1, 2**63 - 1), min_size=len(parts), max_size=len(parts))))), cid),
    _unique_partitions(0), st.data(), correlation_ids)
error_replies = st.builds(
    ErrorReply, request_type=st.integers(0, 0x7F), error_code=st.integers(1, 0xFFFF),
    message=st.text(max_size=250), partition=st.just(-1) | partitions,
    correlation_id=correlation_ids)

replies = st.one_of(
    produce_replies(), fetch_replies(), list_offsets_replies,
    st.builds(OffsetCommitReply, correlation_id=correlation_ids), offset_fetch_replies,
    st.builds(MetadataReply, document=documents, correlation_id=correlation_ids),
    st.builds(CreateTopicReply, document=documents, correlation_id=correlation_ids),
    st.builds(PingReply, correlation_id=correlation_ids), error_replies)

JSON_TYPES = (MetadataRequest, CreateTopicRequest, MetadataReply, CreateTopicReply)
fast = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- round trips ---------------------------------------------------------------------

@fast
@given(requests)
def test_every_request_decodes_to_itself_and_has_exactly_one_encoding(message):
    frame = encode(message)
    assert len(frame) <= wire.MAX_FRAME_BYTES
    decoded = decode_request(frame)
    assert decoded == message
    assert encode(decoded) == frame
    assert peek_header(frame) == (1, message.msg_type, peek_header(frame).flags,
                                  message.correlation_id)


@fast
@given(replies)
def test_every_reply_decodes_to_itself_and_has_exactly_one_encoding(message):
    frame = encode(message)
    decoded = decode_reply(frame)
    assert decoded == message
    assert encode(decoded) == frame
    assert peek_header(frame) == (1, message.msg_type, 0, message.correlation_id)
    assert message.msg_type & wire.REPLY_BIT


@fast
@given(requests)
def test_a_request_is_never_taken_for_a_reply(message):
    with pytest.raises(WireError):
        decode_reply(encode(message))


@fast
@given(replies)
def test_a_reply_is_never_taken_for_a_request(message):
    with pytest.raises(WireError) as caught:
        decode_request(encode(message))
    assert caught.value.code == ErrorCode.INVALID_REQUEST


# --- malformed input: WireError and nothing else ---------------------------------------

def _decode_or_wire_error(frame: bytes, decoder) -> object | None:
    """Decodes ``frame``; a frame that decodes must be canonical (re-encode to itself)."""
    try:
        message = decoder(frame)
    except WireError as error:
        assert isinstance(error.code, int) and error.code != ErrorCode.NONE
        assert error.message
        return None
    if isinstance(message, JSON_TYPES):
        assert decoder(encode(message)) == message
    else:
        assert encode(message) == frame
    return message


@fast
@given(st.one_of(requests, replies))
def test_every_truncation_of_a_valid_frame_raises_wire_error_or_is_itself_valid(message):
    frame = encode(message)
    decoder = decode_request if isinstance(message, wire.Request.__args__) else decode_reply
    for end in range(len(frame)):
        _decode_or_wire_error(frame[:end], decoder)


def test_fixed_size_frames_cut_short_always_raise():
    fixed = [FetchRequest("t", 0, 0, 100), ListOffsetsRequest("t", 1, -2), PingRequest(3),
             OffsetFetchRequest("g", "t", (1, 2)), OffsetCommitRequest("g", "t", ((1, 5),)),
             GOLDEN_BATCH, ProduceReply(1, 0, 5, 6, 2), ListOffsetsReply(0, 5, -1),
             PingReply(1), OffsetCommitReply(2), OffsetFetchReply(((0, 1),))]
    for message in fixed:
        frame = encode(message)
        decoder = decode_reply if isinstance(message, wire.Reply.__args__) else decode_request
        for end in range(len(frame)):
            with pytest.raises(WireError):
                decoder(frame[:end])


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_raise_wire_error_only(frame):
    _decode_or_wire_error(frame, decode_request)
    _decode_or_wire_error(frame, decode_reply)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=120))
def test_random_bodies_behind_a_valid_header_raise_wire_error_only(msg_type, flags, body):
    frame = struct.pack("<BBHI", 1, msg_type, flags, 9) + body
    _decode_or_wire_error(frame, decode_request)
    _decode_or_wire_error(frame, decode_reply)


INTERESTING_INTS = [0, 1, -1, -2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, -0x80000000,
                    249, 250, 61, 64, 65]


def _mutate(frame: bytes, rnd: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rnd.randint(1, 3)):
        choice = rnd.randrange(6)
        if choice == 0 and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        elif choice == 1 and data:
            data[rnd.randrange(len(data))] = rnd.choice([0, 1, 0x7F, 0x80, 0xFE, 0xFF])
        elif choice == 2 and len(data) >= 4:
            pos = rnd.randrange(len(data) - 3)
            value = rnd.choice(INTERESTING_INTS + [len(data), len(data) - pos])
            data[pos:pos + 4] = struct.pack("<i" if value < 0x80000000 else "<I", value)
        elif choice == 3:
            del data[rnd.randrange(len(data) + 1):]
        elif choice == 4:
            data += rnd.randbytes(rnd.randint(1, 16))
        elif data:
            pos = rnd.randrange(len(data))
            del data[pos:pos + rnd.randint(1, 8)]
    return bytes(data)


def _corpus() -> list[bytes]:
    examples = [GOLDEN_RECORD, GOLDEN_BATCH, RecordMessage("t", None, None, 5),
                RecordMessage("t", b"v", headers=(("a", None), ("b", b""), ("ü", b"x"))),
                FetchRequest("topic", 2, 100, 1 << 20, 500, 1), ListOffsetsRequest("t", 0, -1),
                OffsetCommitRequest("grp", "t", ((0, 10), (1, 20))),
                OffsetFetchRequest("grp", "t", (0, 1, 2)), OffsetFetchRequest("grp", "t"),
                MetadataRequest({"topics": ["t"]}), MetadataRequest(),
                CreateTopicRequest("t", 4, {"retention_ms": 1000}), PingRequest(1),
                ProduceReply(2, 3, 100, 104, 2, 5),
                FetchReply(3, 10, 0, 12, bytes.fromhex(KAFKA_BATCH_HEX), 6),
                ListOffsetsReply(1, 5, 1000), OffsetCommitReply(), OffsetFetchReply(((0, 5), (1, -1))),
                MetadataReply({"workers": [{"id": 0}]}), CreateTopicReply({"topic": "t"}),
                PingReply(3), ErrorReply(3, ErrorCode.NOT_OWNER, "owned by worker 1", 4, 8)]
    return [encode(message) for message in examples]


def test_thousands_of_mutated_frames_raise_wire_error_only():
    rnd = random.Random(20240601)
    corpus = _corpus()
    decoded = 0
    for _ in range(6000):
        frame = _mutate(rnd.choice(corpus), rnd)
        for decoder in (decode_request, decode_reply):
            decoded += _decode_or_wire_error(frame, decoder) is not None
    assert decoded > 100  # the mutations also reach the deep, valid paths


# --- zero copy -----------------------------------------------------------------------

def test_record_key_value_and_header_values_are_views_of_the_frame_not_copies():
    frame = bytearray(encode(GOLDEN_RECORD))
    message = decode_request(frame)
    header_value = message.headers[0][1]
    for view in (message.key, message.value, header_value):
        assert isinstance(view, memoryview) and view.obj is frame
    frame[-1] = ord("]")  # the value's last byte: the view sees the change
    assert bytes(message.value) == b'{"t":21.5]'


def test_batch_payload_is_a_view_of_the_frame_not_a_copy():
    frame = bytearray(encode(GOLDEN_BATCH))
    message = decode_request(frame)
    assert isinstance(message.batch, memoryview) and message.batch.obj is frame
    assert message.batch.nbytes == len(KAFKA_BATCH_HEX) // 2
    frame[-1] ^= 0xFF
    assert message.batch[-1] == frame[-1]


def test_fetch_reply_records_are_a_view_of_the_frame_not_a_copy():
    frame = bytearray(encode(FetchReply(0, 5, 0, 5, bytes.fromhex(KAFKA_BATCH_HEX))))
    reply = decode_reply(frame)
    assert isinstance(reply.records, memoryview) and reply.records.obj is frame
    assert bytes(reply.records) == bytes.fromhex(KAFKA_BATCH_HEX)


def test_a_zeromq_frame_received_without_copy_decodes_in_place():
    import zmq  # the codec itself never imports zmq; the test drives a real socket pair

    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        receiver.bind("inproc://wire-test")
        sender.connect("inproc://wire-test")
        sender.send(encode(GOLDEN_BATCH), copy=False)
        frame = receiver.recv(copy=False)
        message = decode_request(frame.buffer)
        assert message == GOLDEN_BATCH
        assert isinstance(message.batch, memoryview) and message.batch.obj is frame.buffer.obj
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        context.term()


def test_decoders_take_memoryview_slices_of_a_larger_buffer():
    frame = encode(GOLDEN_RECORD)
    buffer = b"\xaa" * 5 + frame + b"\xbb" * 5
    assert decode_request(memoryview(buffer)[5:5 + len(frame)]) == GOLDEN_RECORD


# --- rules, one by one ---------------------------------------------------------------

def _error_of(frame: bytes, decoder=decode_request) -> ErrorCode:
    with pytest.raises(WireError) as caught:
        decoder(frame)
    return caught.value.code


def _with(frame: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(frame)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def test_an_unknown_version_is_refused_and_answered_with_unsupported_version():
    frame = _with(encode(GOLDEN_RECORD), wire.VERSION_OFFSET, "<B", 2)
    assert _error_of(frame) == ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(WireError) as caught:
        decode_request(frame)
    reply = decode_reply(error_reply_for(frame, caught.value))
    assert reply == ErrorReply(MsgType.RECORD, ErrorCode.UNSUPPORTED_VERSION,
                               caught.value.message, -1, GOLDEN_RECORD.correlation_id)
    assert peek_header(error_reply_for(frame, caught.value)).version == wire.PROTOCOL_VERSION


def test_an_unknown_request_type_gets_invalid_request_with_its_correlation_id():
    frame = struct.pack("<BBHI", 1, 0x33, 0, 77)
    assert _error_of(frame) == ErrorCode.INVALID_REQUEST
    error = WireError(ErrorCode.INVALID_REQUEST, "unknown request type 0x33")
    reply = decode_reply(error_reply_for(frame, error))
    assert (reply.request_type, reply.correlation_id, reply.error_code) == (0x33, 77, 8)


def test_no_reply_is_addressed_to_a_headerless_frame_or_to_a_reply():
    error = WireError(ErrorCode.CORRUPT_MESSAGE, "x")
    assert error_reply_for(b"\x01\x01\x00", error) is None
    assert error_reply_for(encode(PingReply(4)), error) is None


def test_error_reply_for_keeps_long_messages_within_the_bound():
    error = IngestError(ErrorCode.STORAGE_ERROR, "é" * 2000, partition=3)
    reply = decode_reply(error_reply_for(encode(PingRequest(5)), error))
    assert len(reply.message.encode()) <= wire.MAX_ERROR_MESSAGE_BYTES
    assert reply.partition == 3 and reply.correlation_id == 5


@pytest.mark.parametrize("topic", ["", ".", "..", "a b", "t/1", "tö", "x" * 250, "a\x00"])
def test_invalid_topic_names_are_refused_by_encoder_and_decoder(topic):
    with pytest.raises(WireError) as caught:
        encode(RecordMessage(topic, b"v"))
    assert caught.value.code == ErrorCode.INVALID_TOPIC
    raw = topic.encode("utf-8")
    frame = struct.pack("<BBHIBBHiqi", 1, 1, 0, 0, len(raw) & 0xFF, 0, 0, -1, 0, -1) + raw
    assert _error_of(frame) in (ErrorCode.INVALID_TOPIC, ErrorCode.CORRUPT_MESSAGE)


def test_the_longest_topic_kafka_allows_is_accepted():
    topic = "a" * wire.MAX_TOPIC_BYTES
    assert decode_request(encode(RecordMessage(topic, b"v"))).topic == topic


def test_invalid_group_names_are_refused_with_invalid_group():
    with pytest.raises(WireError) as caught:
        encode(OffsetFetchRequest("my group", "t"))
    assert caught.value.code == ErrorCode.INVALID_GROUP


@pytest.mark.parametrize("key_length", [-2, -1000, -0x80000000])
def test_negative_lengths_other_than_null_are_corrupt(key_length):
    frame = _with(encode(RecordMessage("t", b"value", key=b"k")),
                  wire.RECORD_KEY_LENGTH_OFFSET, "<i", key_length)
    assert _error_of(frame) == ErrorCode.CORRUPT_MESSAGE


def test_lengths_past_the_end_of_the_frame_are_corrupt():
    frame = _with(encode(RecordMessage("t", None, key=b"k")),
                  wire.RECORD_KEY_LENGTH_OFFSET, "<i", 2)
    assert _error_of(frame) == ErrorCode.CORRUPT_MESSAGE


def test_a_null_value_must_end_the_frame():
    frame = encode(RecordMessage("t", None, key=b"k")) + b"x"
    assert _error_of(frame) == ErrorCode.CORRUPT_MESSAGE
    tombstone = decode_request(encode(RecordMessage("t", None, key=b"k")))
    assert tombstone.value is None and bytes(tombstone.key) == b"k"


def test_null_and_empty_are_different_for_keys_values_and_header_values():
    message = RecordMessage("t", b"", key=b"", headers=(("h", b""), ("n", None)))
    decoded = decode_request(encode(message))
    assert (decoded.value, decoded.key, decoded.headers[0][1]) == (b"", b"", b"")
    assert decoded.headers[1][1] is None
    assert decode_request(encode(RecordMessage("t", None))).key is None


def test_a_record_without_timestamp_writes_zero_and_gets_none_back():
    frame = encode(RecordMessage("t", b"v"))
    assert frame[wire.RECORD_TIMESTAMP_OFFSET:wire.RECORD_PARTITION_OFFSET] == bytes(8)
    assert decode_request(frame).timestamp_ms is None
    stray = _with(frame, wire.RECORD_TIMESTAMP_OFFSET, "<q", 5)
    assert _error_of(stray) == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("message, offset, fmt, value", [
    (RecordMessage("t", b"v"), wire.FLAGS_OFFSET, "<H", 0x0010),
    (RecordMessage("t", b"v"), wire.RECORD_RESERVED_OFFSET, "<B", 1),
    (GOLDEN_BATCH, wire.FLAGS_OFFSET, "<H", 0x0004),
    (GOLDEN_BATCH, wire.BATCH_RESERVED_OFFSET + 2, "<B", 1),
    (FetchRequest("t", 0, 0, 10), wire.FLAGS_OFFSET, "<H", 1),
    (PingRequest(), wire.FLAGS_OFFSET, "<H", 0x8000),
    (OffsetFetchRequest("g", "t"), 10, "<H", 1),
])
def test_reserved_bits_and_bytes_must_be_zero(message, offset, fmt, value):
    assert _error_of(_with(encode(message), offset, fmt, value)) == ErrorCode.INVALID_REQUEST


def test_too_many_headers_are_refused():
    headers = tuple((f"h{i}", b"") for i in range(wire.MAX_HEADERS + 1))
    with pytest.raises(WireError):
        encode(RecordMessage("t", b"v", headers=headers))
    frame = _with(encode(RecordMessage("t", b"v")), wire.RECORD_HEADER_COUNT_OFFSET, "<H",
                  wire.MAX_HEADERS + 1)
    assert _error_of(frame) == ErrorCode.INVALID_REQUEST


def test_a_frame_above_max_frame_bytes_is_message_too_large():
    frame = encode(RecordMessage("t", b"")) + bytes(wire.MAX_FRAME_BYTES)
    assert _error_of(frame) == ErrorCode.MESSAGE_TOO_LARGE
    with pytest.raises(WireError) as caught:
        encode(RecordMessage("t", bytes(wire.MAX_FRAME_BYTES)))
    assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize("patch", [
    lambda batch: batch[:60],                               # shorter than the header
    lambda batch: batch[:16] + b"\x01" + batch[17:],         # magic 1
    lambda batch: batch + b"\x00",                           # a byte beyond batchLength
    lambda batch: batch[:-1],                                # batchLength beyond the frame
])
def test_batch_must_carry_exactly_one_framed_record_batch(patch):
    batch = patch(bytes.fromhex(KAFKA_BATCH_HEX))
    frame = encode(GOLDEN_BATCH)[:wire.BATCH_TOPIC_OFFSET + 7] + batch
    assert _error_of(frame) == ErrorCode.CORRUPT_MESSAGE
    with pytest.raises(WireError):
        encode(BatchMessage("sensors", 0, batch))


@pytest.mark.parametrize("message", [
    lambda: RecordMessage("t", b"v", partition=-2),
    lambda: BatchMessage("t", -1, bytes.fromhex(KAFKA_BATCH_HEX)),
    lambda: FetchRequest("t", 0, -1, 10),
    lambda: FetchRequest("t", 0, 0, 0),
    lambda: FetchRequest("t", 0, 0, wire.MAX_FETCH_BYTES + 1),
    lambda: FetchRequest("t", 0, 0, 10, wire.MAX_FETCH_WAIT_MS + 1),
    lambda: FetchRequest("t", 0, 0, 10, 0, 11),
    lambda: ListOffsetsRequest("t", 0, -3),
    lambda: OffsetCommitRequest("g", "t", ()),
    lambda: OffsetCommitRequest("g", "t", ((0, 1), (0, 2))),
    lambda: OffsetCommitRequest("g", "t", ((0, -1),)),
    lambda: OffsetFetchRequest("g", "t", tuple(range(wire.MAX_PARTITIONS + 1))),
    lambda: CreateTopicRequest("t", 0),
    lambda: CreateTopicRequest("t", True),
    lambda: MetadataRequest(["not", "an", "object"]),
    lambda: ProduceReply(MsgType.FETCH, 0, 0, 0, 1),
    lambda: ProduceReply(MsgType.RECORD, 0, 5, 4, 1),
    lambda: ProduceReply(MsgType.RECORD, 0, 5, 5, 4),
    lambda: FetchReply(0, high_watermark=5, log_start_offset=6, log_end_offset=7),
    lambda: FetchReply(0, high_watermark=5, log_start_offset=0, log_end_offset=4),
    lambda: ErrorReply(MsgType.PING, ErrorCode.NONE),
    lambda: ErrorReply(MsgType.PING, 1, "x" * (wire.MAX_ERROR_MESSAGE_BYTES + 1)),
    lambda: PingRequest(correlation_id=2**32),
    lambda: PingRequest(correlation_id=-1),
])
def test_encoders_refuse_what_decoders_would_refuse(message):
    with pytest.raises(WireError):
        encode(message())


@pytest.mark.parametrize("message, offset, fmt, value, decoder", [
    (RecordMessage("t", b"v"), wire.RECORD_PARTITION_OFFSET, "<i", -2, decode_request),
    (RecordMessage("t", b"v", timestamp_ms=5), wire.RECORD_TIMESTAMP_OFFSET, "<q", -1,
     decode_request),
    (GOLDEN_BATCH, wire.BATCH_PARTITION_OFFSET, "<i", -1, decode_request),
    (FetchRequest("t", 0, 0, 10), 16, "<q", -1, decode_request),        # offset
    (FetchRequest("t", 0, 0, 10), 24, "<i", 0, decode_request),         # max_bytes
    (FetchRequest("t", 0, 0, 10), 28, "<i", wire.MAX_FETCH_WAIT_MS + 1, decode_request),
    (FetchRequest("t", 0, 0, 10), 32, "<i", 11, decode_request),        # min_bytes
    (ListOffsetsRequest("t", 0, -1), 16, "<q", -3, decode_request),
    (OffsetCommitRequest("g", "t", ((0, 1), (1, 2))), 18 + 12, "<i", 0, decode_request),
    (OffsetCommitRequest("g", "t", ((0, 1),)), 18 + 4, "<q", -1, decode_request),
    (OffsetFetchRequest("g", "t", (0,)), 12, "<I", wire.MAX_PARTITIONS + 1, decode_request),
    (ProduceReply(1, 0, 5, 6, 2), 24, "<q", 4, decode_reply),           # last < base
    (ProduceReply(1, 0, 5, 6, 2), 32, "<B", 4, decode_reply),           # durability
    (FetchReply(0, 5, 0, 5), 24, "<q", 6, decode_reply),                # start > hwm
    (ErrorReply(1, 5, "x"), 12, "<i", -2, decode_reply),                # partition
])
def test_decoders_refuse_what_encoders_would_refuse(message, offset, fmt, value, decoder):
    with pytest.raises(WireError) as caught:
        decoder(_with(encode(message), offset, fmt, value))
    if decoder is decode_reply:  # the appliance's fault: nothing for the client to fix
        assert caught.value.code == ErrorCode.CORRUPT_MESSAGE


def test_an_error_message_above_the_bound_is_refused():
    frame = encode(ErrorReply(1, 5, "")) + b"x" * (wire.MAX_ERROR_MESSAGE_BYTES + 1)
    assert _error_of(frame, decode_reply) == ErrorCode.CORRUPT_MESSAGE


def test_create_topic_refuses_unknown_keys_so_typos_are_not_ignored():
    frame = struct.pack("<BBHI", 1, MsgType.CREATE_TOPIC, 0, 1) + b'{"topic":"t","partition":3}'
    assert _error_of(frame) == ErrorCode.INVALID_REQUEST


def test_json_bodies_that_do_not_parse_are_refused():
    head = struct.pack("<BBHI", 1, MsgType.METADATA, 0, 1)
    assert _error_of(head + b"{") == ErrorCode.INVALID_REQUEST
    assert _error_of(head + b"\xff") == ErrorCode.INVALID_REQUEST
    assert _error_of(head + b"[1]") == ErrorCode.INVALID_REQUEST
    assert decode_request(head) == MetadataRequest(None, 1)
    reply_head = struct.pack("<BBHIHH", 1, MsgType.METADATA | 0x80, 0, 1, 0, 0)
    assert _error_of(reply_head, decode_reply) == ErrorCode.CORRUPT_MESSAGE


def test_a_reply_with_an_error_code_decodes_as_error_reply_for_any_request_type():
    frame = struct.pack("<BBHIHHi", 1, 0xFE, 0, 12, ErrorCode.NOT_OWNER, 0, 5) + b"worker 1"
    reply = decode_reply(frame)
    assert reply == ErrorReply(0x7E, ErrorCode.NOT_OWNER, "worker 1", 5, 12)
    error = reply.exception()
    assert error.retriable and error.partition == 5
    assert str(error) == ("NOT_OWNER (3) [partition 5]: worker 1 -- "
                          + ErrorCode.NOT_OWNER.hint)


def test_an_error_code_from_a_newer_appliance_is_not_retried_blindly():
    frame = encode(ErrorReply(MsgType.RECORD, 999, "new"))
    error = decode_reply(frame).exception()
    assert not error.retriable and "UNKNOWN_ERROR (999)" in str(error)


def test_peek_header_reads_any_version_and_refuses_short_frames():
    assert peek_header(struct.pack("<BBHI", 9, 0x42, 0xBEEF, 123) + b"junk") == (
        9, 0x42, 0xBEEF, 123)
    with pytest.raises(WireError):
        peek_header(b"\x01\x01\x00\x00\x00\x00\x00")


# --- error codes ---------------------------------------------------------------------

RETRIABLE = {"NOT_OWNER", "THROTTLED", "DISK_FULL", "TIMEOUT", "NOT_ENOUGH_REPLICAS",
             "SHUTTING_DOWN", "NOT_LEADER", "FENCED_LEADER_EPOCH"}


def test_error_codes_are_u16_unique_and_say_what_to_do_in_one_line():
    assert ErrorCode.NONE == 0
    assert len({int(code) for code in ErrorCode}) == len(ErrorCode)
    for code in ErrorCode:
        assert 0 <= code <= 0xFFFF
        assert code.hint and "\n" not in code.hint
        assert code.retriable == (code.name in RETRIABLE), code


def test_wire_error_is_an_ingest_error_with_its_code():
    error = WireError(ErrorCode.INVALID_TOPIC, "bad name")
    assert isinstance(error, IngestError) and error.code == ErrorCode.INVALID_TOPIC
    assert "\n" not in str(error) and "INVALID_TOPIC (14): bad name" in str(error)
