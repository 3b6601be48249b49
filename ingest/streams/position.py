"""Sans-IO: the source position a sink batch carries, as a Kafka record header.

The last record of every sink batch that ends a processed chunk carries the header
`ingest.position` = JSON {"processor", "next_offset", "replay_offset", "stream_time_ms"}:
- next_offset: every source record below it has been processed and its outputs are in
  this batch or before it;
- replay_offset: the first source offset a restart must re-read to rebuild its window
  state (the oldest open window's first record; next_offset when nothing is open);
- stream_time_ms: the stream time at next_offset (-1 for stateless processors).

Since the position travels inside the sink batch, one append (and one fsync) makes the
output and the position that covers it durable together: there is no second file that a
crash could leave behind or ahead of the sink.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

HEADER_KEY = "ingest.position"


@dataclass(frozen=True, slots=True)
class Position:
    processor: str
    next_offset: int
    replay_offset: int
    stream_time_ms: int = -1

    def __post_init__(self) -> None:
        if not 0 <= self.replay_offset <= self.next_offset:
            raise ValueError(f"replay_offset {self.replay_offset} must be 0..next_offset {self.next_offset}")


def encode(position: Position) -> bytes:
    return orjson.dumps({"processor": position.processor, "next_offset": position.next_offset,
                         "replay_offset": position.replay_offset, "stream_time_ms": position.stream_time_ms})


def decode(headers) -> Position | None:
    """The position among a record's headers, or None if it has none (or a garbled one)."""
    for key, value in headers:
        if key == HEADER_KEY and value:
            try:
                doc = orjson.loads(value)
                return Position(str(doc["processor"]), int(doc["next_offset"]), int(doc["replay_offset"]),
                                int(doc.get("stream_time_ms", -1)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return None
    return None
