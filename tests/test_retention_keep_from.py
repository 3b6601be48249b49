"""Log.apply_retention(keep_from_offset=...): the hook the uplink holds retention with
(docs/UPLINK.md, store-and-forward). Retention by size and by age deletes no segment that
holds an offset at or above keep_from_offset, and deletes as before once it moves on."""

from __future__ import annotations

from ingest.shards.log import Log, LogConfig
from tests.test_log import DAY_MS, NOW_MS, fill


def test_retention_keeps_every_segment_holding_an_offset_at_or_above_keep_from(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=3000, retention_bytes=0, retention_ms=-1))
    fill(log, 100)
    bases = [s.base_offset for s in log.segments]
    assert len(bases) > 4
    assert log.apply_retention(NOW_MS, keep_from_offset=0) == 0
    # keep_from inside the third segment: the first two go, the third (holding it) stays.
    keep_from = bases[2] + 1
    assert log.apply_retention(NOW_MS, keep_from_offset=keep_from) == 2
    assert log.log_start_offset == bases[2] <= keep_from
    # Exactly at a segment's base: every segment before it may go.
    assert log.apply_retention(NOW_MS, keep_from_offset=bases[4]) == 2
    assert log.log_start_offset == bases[4]
    # Nothing held back: retention_bytes = 0 leaves the active segment only.
    log.apply_retention(NOW_MS)
    assert len(log.segments) == 1


def test_retention_by_age_is_held_the_same_way(tmp_path):
    log = Log(tmp_path / "t-0", LogConfig(segment_bytes=3000, retention_ms=DAY_MS))
    fill(log, 60, timestamp_ms=NOW_MS - 10 * DAY_MS)
    assert len(log.segments) > 2
    assert log.apply_retention(NOW_MS, keep_from_offset=log.log_start_offset) == 0
    before = len(log.segments)
    assert log.apply_retention(NOW_MS, keep_from_offset=log.log_end_offset) == before - 1
    assert len(log.segments) == 1
