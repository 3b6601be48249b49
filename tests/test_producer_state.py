"""Idempotent producers: retries are answered with the original offsets, never stored twice;
gaps and fenced epochs are refused; the state survives restarts (snapshot + log rebuild)."""

import pytest

from ingest.shards import batch as batch_codec
from ingest.shards.log import LogConfig
from ingest.shards.partition import Partition
from ingest.shards.producer_state import (RETAINED_BATCHES, InvalidProducerEpochError, OutOfOrderSequenceError,
                                          ProducerState)


def test_a_retry_of_any_of_the_last_five_batches_gets_its_original_offsets():
    state = ProducerState()
    for b in range(8):
        assert state.check(7, 0, b * 10, b * 10 + 9) is None
        state.record(7, 0, b * 10, b * 10 + 9, 100 + b * 10, 109 + b * 10, now_ms=1)
    for b in range(8 - RETAINED_BATCHES, 8):
        assert state.check(7, 0, b * 10, b * 10 + 9) == (100 + b * 10, 109 + b * 10)
    with pytest.raises(OutOfOrderSequenceError):  # too old to tell: refused, not stored twice
        state.check(7, 0, 0, 9)


def test_gaps_unknown_producers_past_zero_and_old_epochs_are_refused():
    state = ProducerState()
    with pytest.raises(OutOfOrderSequenceError):
        state.check(1, 0, 5, 9)  # its first batches are not here
    state.record(1, 0, 0, 4, 0, 4, now_ms=1)
    with pytest.raises(OutOfOrderSequenceError):
        state.check(1, 0, 6, 9)  # skips sequence 5
    assert state.check(1, 1, 0, 3) is None  # a new epoch starts over at 0
    state.record(1, 1, 0, 3, 5, 8, now_ms=2)
    with pytest.raises(InvalidProducerEpochError):
        state.check(1, 0, 5, 9)  # the old epoch is fenced


def test_snapshot_round_trip_and_truncation(tmp_path):
    state = ProducerState()
    state.record(3, 2, 0, 9, 50, 59, now_ms=10)
    state.record(3, 2, 10, 19, 60, 69, now_ms=11)
    state.save(tmp_path, covered_offset=70)
    loaded, covered = ProducerState.load(tmp_path)
    assert covered == 70 and loaded.check(3, 2, 10, 19) == (60, 69)
    loaded.truncate_to(60)  # the log lost offsets 60.. : that batch is no longer a duplicate
    assert loaded.check(3, 2, 10, 19) is None


def test_a_partition_rebuilds_producer_state_from_its_log_after_a_crash(tmp_path):
    config = LogConfig()
    part = Partition(tmp_path, "t", 0, config, now_ms=0)
    batches = [batch_codec.encode_batch([batch_codec.Record(0, 1, None, b"v%d" % i) for i in range(3)],
                                        producer_id=42, producer_epoch=0, base_sequence=3 * b) for b in range(4)]
    offsets = [part.append(b, batch_codec.parse_header(b), now_ms=1)[:2] for b in batches]
    part.log.flush()
    # A crash: no close(), no snapshot. The new process rebuilds from batch headers.
    reopened = Partition(tmp_path, "t", 0, config, now_ms=2)
    for b, (base, last) in zip(batches, offsets):
        assert reopened.append(b, batch_codec.parse_header(b), now_ms=3) == (base, last, True)
    assert reopened.log.log_end_offset == 12  # nothing stored twice
