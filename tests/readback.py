"""Reading a topic back the way a data engineer would: the SDK's Consumer, from the start."""

from __future__ import annotations

import time

from ingest import Consumer
from ingest.net.consumer import Record

# A pass ends after this long without a new record; records sent fire-and-forget may
# still be in flight, so read_back() starts another pass until it has enough.
IDLE_TIMEOUT_MS = 500


def read_back(bootstrap: str, topic: str, count_min: int, timeout_s: float = 30) -> list[Record]:
    """Every record of `topic` once at least `count_min` are stored (or the deadline has
    passed: the caller's assertions then say what is missing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with Consumer(bootstrap, topic, from_beginning=True) as consumer:
            records = list(consumer.records(idle_timeout_ms=IDLE_TIMEOUT_MS))
        if len(records) >= count_min or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
