"""A processor's position between outputs: a small file beside its sink partition.

The sink's own batches carry the position whenever there is output (the rule that makes
output exactly-once, see runtime.py). A processor whose output is sparse (a filter that
rarely matches) would otherwise re-read everything since its last output after each
restart; this file bounds that. It is only a shortcut, checked against the sink on load:

    {"position": {...ingest.streams.position...}, "sink_end_offset": E}

means "at this source position, the sink held exactly E records". It is used only if the
sink still holds at least E records and its newest positioned batch ends at or before E
(else the sink knows better: it was written after the file, or lost its tail in a power
cut); the sink records after E are then a cut chunk's outputs, skipped by count as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson

from ingest.streams import position as position_mod
from ingest.streams.position import Position
from ingest.topics import write_atomically

log = logging.getLogger("ingest.streams")

# Write the file at most this often: each write is an fsync; the cost of a longer
# interval is re-reading that much source after a crash, never wrong output.
CHECKPOINT_INTERVAL_MS = 5_000


def path_for(sink_dir: Path, processor: str) -> Path:
    return Path(sink_dir) / f"processor-{processor}.json"


def save(sink_dir: Path, position: Position, sink_end_offset: int) -> None:
    doc = {"position": orjson.loads(position_mod.encode(position)), "sink_end_offset": sink_end_offset}
    write_atomically(path_for(sink_dir, position.processor), orjson.dumps(doc))


def load(sink_dir: Path, processor: str) -> tuple[Position, int] | None:
    """(position, sink_end_offset) from the file, or None if absent or unreadable."""
    try:
        doc = orjson.loads(path_for(sink_dir, processor).read_bytes())
        found = position_mod.decode([(position_mod.HEADER_KEY, orjson.dumps(doc["position"]))])
        return (found, int(doc["sink_end_offset"])) if found else None
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        log.warning("processor %s: ignoring its checkpoint file: %s", processor, e)
        return None
