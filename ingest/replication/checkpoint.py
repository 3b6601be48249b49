"""A leader's high-watermark checkpoint per partition: ``high-watermark-checkpoint``.

JSON {"leader_epoch": e, "high_watermark": n, "in_sync": [replica ids]}, replaced
atomically at most every `[replication] high_watermark_checkpoint_interval_ms` (5 s, as
Kafka) when it changed: one small fsynced write per partition, whatever the produce rate. It is read only when a leader worker starts in the same
epoch; a stale value is lower than the truth, so consumers may briefly see less, never
more.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from ingest.topics import write_atomically

CHECKPOINT_FILE = "high-watermark-checkpoint"


def load(directory: Path, leader_epoch: int) -> tuple[int, list[str]] | None:
    """(high watermark, in-sync ids) if a checkpoint of `leader_epoch` is there."""
    try:
        doc = orjson.loads((Path(directory) / CHECKPOINT_FILE).read_bytes())
        if int(doc["leader_epoch"]) != leader_epoch:
            return None
        return int(doc["high_watermark"]), [str(r) for r in doc["in_sync"]]
    except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # none, or unreadable: start as a new leader does


def save(directory: Path, leader_epoch: int, high_watermark: int, in_sync: list[str]) -> None:
    doc = {"leader_epoch": leader_epoch, "high_watermark": high_watermark, "in_sync": in_sync}
    write_atomically(Path(directory) / CHECKPOINT_FILE, orjson.dumps(doc))
