"""docs/PROTOCOL.md stays true to the code: its hex dumps are what the codec produces now,
its RecordBatch table matches the layout the appliance validates, and the example batch
is one that Kafka's own decoder accepts."""

from __future__ import annotations

import re
from pathlib import Path

from kafka.record.default_records import DefaultRecordBatch

from ingest.net import wire, wire_examples
from ingest.shards import layout

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def test_every_hex_dump_in_protocol_md_is_what_the_codec_produces():
    text = PROTOCOL_MD.read_text()
    assert sorted(wire_examples.golden_names(text)) == sorted(wire_examples.EXAMPLES)
    assert wire_examples.regenerate(text) == text, (
        "a hex dump in docs/PROTOCOL.md differs from the codec: if the protocol changed on "
        "purpose, run `python -m ingest.net.wire_examples docs/PROTOCOL.md` and bump the version")


def test_the_generator_rewrites_a_drifted_dump(tmp_path):
    drifted = tmp_path / "PROTOCOL.md"
    text = PROTOCOL_MD.read_text()
    drifted.write_text(text.replace("0000  01 07 00 00 01 00 00 00", "0000  01 07 00 00 09 00 00 00"))
    assert drifted.read_text() != text
    assert wire_examples.main([str(drifted)]) == 0
    assert drifted.read_text() == text


def test_every_example_frame_decodes_back_with_the_codec():
    for name, frame in wire_examples.EXAMPLES.items():
        header = wire.peek_header(frame)
        decode = wire.decode_reply if header.msg_type & wire.REPLY_BIT else wire.decode_request
        assert decode(frame).encode() == frame, name


def test_the_example_batch_is_an_idempotent_kafka_record_batch():
    frame = wire_examples.EXAMPLES["batch-frame"]
    message = wire.decode_request(frame)
    batch = DefaultRecordBatch(bytes(message.batch))
    assert batch.validate_crc()
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (1000, 0, 0)
    assert [(r.key, r.value) for r in batch] == [(b"dev-42", b'{"t":21.5}')]
    # Section 12 says the batch starts at frame offset 23.
    assert frame[23:] == wire_examples.EXAMPLE_RECORD_BATCH


def test_protocol_md_record_batch_table_matches_the_layout():
    text = PROTOCOL_MD.read_text()
    section = text[text.index("### 8.1"):text.index("## 9.")]
    rows = re.findall(r"^\| (\d+) \|\s*(\d*)\s*\| (\w+) \|", section, re.M)
    documented = {name: (int(offset), int(size) if size else None) for offset, size, name in rows}
    expected = {
        "baseOffset": (layout.BASE_OFFSET_OFFSET, layout.BASE_OFFSET_LENGTH),
        "batchLength": (layout.LENGTH_OFFSET, layout.LENGTH_LENGTH),
        "partitionLeaderEpoch": (layout.PARTITION_LEADER_EPOCH_OFFSET, layout.PARTITION_LEADER_EPOCH_LENGTH),
        "magic": (layout.MAGIC_OFFSET, layout.MAGIC_LENGTH),
        "crc": (layout.CRC_OFFSET, layout.CRC_LENGTH),
        "attributes": (layout.ATTRIBUTES_OFFSET, layout.ATTRIBUTES_LENGTH),
        "lastOffsetDelta": (layout.LAST_OFFSET_DELTA_OFFSET, layout.LAST_OFFSET_DELTA_LENGTH),
        "baseTimestamp": (layout.BASE_TIMESTAMP_OFFSET, layout.BASE_TIMESTAMP_LENGTH),
        "maxTimestamp": (layout.MAX_TIMESTAMP_OFFSET, layout.MAX_TIMESTAMP_LENGTH),
        "producerId": (layout.PRODUCER_ID_OFFSET, layout.PRODUCER_ID_LENGTH),
        "producerEpoch": (layout.PRODUCER_EPOCH_OFFSET, layout.PRODUCER_EPOCH_LENGTH),
        "baseSequence": (layout.BASE_SEQUENCE_OFFSET, layout.BASE_SEQUENCE_LENGTH),
        "recordsCount": (layout.RECORDS_COUNT_OFFSET, layout.RECORDS_COUNT_LENGTH),
        "records": (layout.RECORDS_OFFSET, None),
    }
    assert documented == expected
