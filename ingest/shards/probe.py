"""A worker's metrics: plain local numbers, bumped once per batch, snapshotted ~1/s.

Kept apart from the worker's logic (Redpanda's probe objects do the same) so the hot path
pays a dict increment per batch and nothing per record. The supervisor turns snapshots
into Prometheus families (ingest.metrics).
"""

from __future__ import annotations

from collections import defaultdict


class Probe:
    def __init__(self) -> None:
        # (name, labels tuple) -> value; labels are tuples of (key, value) pairs.
        self.counters: dict[tuple, float] = defaultdict(float)

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        self.counters[(name, tuple(labels.items()))] += value

    def records_in(self, topic: str, records: int, size_bytes: int) -> None:
        self.counters[("records_received_total", (("topic", topic),))] += records
        self.counters[("bytes_received_total", (("topic", topic),))] += size_bytes
        self.counters[("batches_received_total", (("topic", topic),))] += 1

    def invalid(self, reason: str, frames: int = 1) -> None:
        self.counters[("frames_invalid_total", (("reason", reason),))] += frames

    def dropped(self, reason: str, records: int = 1) -> None:
        self.counters[("records_dropped_total", (("reason", reason),))] += records

    def fsync(self, seconds: float) -> None:
        self.counters[("fsyncs_total", ())] += 1
        self.counters[("fsync_seconds_total", ())] += seconds

    def snapshot(self, gauges: list[tuple[str, dict, float]]) -> dict:
        return {"counters": [(name, dict(labels), value) for (name, labels), value in self.counters.items()],
                "gauges": gauges}
