"""A worker's metrics: plain local numbers, bumped once per batch, snapshotted ~1/s.

Kept apart from the worker's logic (Redpanda's probe objects do the same) so the hot path
pays a dict increment per batch and nothing per record. The supervisor turns snapshots
into Prometheus families (ingest.metrics).

Names here are the Prometheus names without the `ingest_` prefix. Histograms are kept as
their cumulative `_bucket`/`_count`/`_sum` counters, so the supervisor's carry-over of
counters across worker restarts covers them too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

# Upper bounds in seconds: from a page-cache append (~100 us) to a stalled disk (seconds).
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Why fire-and-forget records that were valid could not be stored.
DROP_REASONS = ("disk_full", "storage_error", "forward_queue_full", "unknown_topic_backlog", "topic_limit")
_BUCKET_LABELS = tuple(repr(b) for b in LATENCY_BUCKETS_S) + ("+Inf",)


class Probe:
    def __init__(self) -> None:
        # (name, labels tuple) -> value; labels are tuples of (key, value) pairs.
        self.counters: dict[tuple, float] = defaultdict(float)
        # Present from the start at 0, so rate() and alerts see "no drops", not "no data".
        for reason in DROP_REASONS:
            self.counters[("records_dropped_total", (("reason", reason),))] = 0.0
        self.counters[("replies_dropped_total", ())] = 0.0

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

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """One observation of a latency histogram `name` (base unit: seconds)."""
        items = tuple(labels.items())
        first = bisect_left(LATENCY_BUCKETS_S, seconds)
        for le in _BUCKET_LABELS[first:]:
            self.counters[(name + "_bucket", items + (("le", le),))] += 1
        self.counters[(name + "_count", items)] += 1
        self.counters[(name + "_sum", items)] += seconds

    def fsync(self, seconds: float) -> None:
        self.observe("fsync_duration_seconds", seconds)

    def snapshot(self, gauges: list[tuple[str, dict, float]]) -> dict:
        return {"counters": [(name, dict(labels), value) for (name, labels), value in self.counters.items()],
                "gauges": gauges}
