"""The example frames of docs/PROTOCOL.md, built by the real codec.

Each `<!-- golden: NAME -->` marker in the document is followed by a hex dump of
EXAMPLES[NAME]; tests/test_protocol_doc.py fails when a dump differs from what the codec
produces now, so the document cannot drift from the code. After a deliberate change of
the protocol, regenerate the dumps with

    python -m ingest.net.wire_examples docs/PROTOCOL.md

(and bump the protocol version: section 9 of the document).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec

TIMESTAMP_MS = 1_700_000_000_000
BYTES_PER_LINE = 16
_BLOCK = re.compile(r"(<!-- golden: ([a-z0-9-]+) -->\s*```text\n)(.*?)(```)", re.S)

# An idempotent producer's first batch for partition 3: producer id 1000, epoch 0,
# sequence 0, one record, as a device without the SDK would encode it.
EXAMPLE_RECORD_BATCH = batch_codec.encode_batch(
    [batch_codec.Record(0, TIMESTAMP_MS, b"dev-42", b'{"t":21.5}')],
    producer_id=1000, producer_epoch=0, base_sequence=0)

EXAMPLES: dict[str, bytes] = {
    "record-frame": wire.RecordMessage(
        topic="sensors", value=b'{"t":21.5}', key=b"dev-42", partition=wire.AUTO_PARTITION,
        timestamp_ms=TIMESTAMP_MS, headers=(("ct", b"json"),), acks=wire.Durability.FSYNC,
        correlation_id=7).encode(),
    "produce-reply": wire.ProduceReply(
        wire.MsgType.RECORD, partition=1, base_offset=42, last_offset=42,
        durability=wire.Durability.FSYNC, correlation_id=7).encode(),
    "error-reply": wire.ErrorReply(
        wire.MsgType.RECORD, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "topic sensors does not exist",
        partition=-1, correlation_id=7).encode(),
    "batch-frame": wire.BatchMessage(
        topic="sensors", partition=3, batch=EXAMPLE_RECORD_BATCH, acks=wire.Durability.FSYNC,
        correlation_id=8).encode(),
    "metadata-request": wire.MetadataRequest(correlation_id=1).encode(),
}


def hex_dump(frame: bytes) -> str:
    """Offset (4 hex digits), then up to 16 bytes per line, as the document shows them."""
    lines = []
    for start in range(0, len(frame), BYTES_PER_LINE):
        chunk = frame[start:start + BYTES_PER_LINE]
        lines.append(f"{start:04x}  " + " ".join(f"{b:02x}" for b in chunk))
    return "\n".join(lines) + "\n"


def golden_names(text: str) -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(text)]


def regenerate(text: str) -> str:
    """`text` with every golden block replaced by the codec's current bytes."""
    def dump(match: re.Match) -> str:
        name = match.group(2)
        if name not in EXAMPLES:
            raise KeyError(f"golden block {name!r} has no example in ingest.net.wire_examples")
        return match.group(1) + hex_dump(EXAMPLES[name]) + match.group(4)

    return _BLOCK.sub(dump, text)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ingest.net.wire_examples docs/PROTOCOL.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(regenerate(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
