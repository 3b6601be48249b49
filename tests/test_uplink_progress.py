"""The uplink's per-partition bookkeeping (ingest/uplink/progress.py), sans-IO: delivery
reports in any order, failures, rewinds, retention gaps. The end-to-end promises are in
tests/test_uplink.py; these pin the offsets that decide what is committed and resent."""

from __future__ import annotations

from ingest.uplink.progress import PartitionProgress


class Error:
    def name(self) -> str:
        return "_MSG_TIMED_OUT"


def handed_over(progress: PartitionProgress, end: int):
    chunk = progress.open_chunk()
    progress.close_chunk(chunk, end, end - chunk.start)
    return chunk


def deliver(chunk, records: int, error=None) -> None:
    for _ in range(records):
        chunk.on_delivery(error, None)


def test_delivered_advances_only_over_a_prefix_of_fully_delivered_chunks():
    p = PartitionProgress("t", 0, "remote.t", committed=10)
    first, second = handed_over(p, 20), handed_over(p, 30)
    assert (p.committed, p.delivered, p.sent) == (10, 10, 30)
    deliver(second, 10)  # the later chunk first: nothing below it is known delivered
    assert p.delivered == 10
    deliver(first, 9)
    assert p.delivered == 10
    deliver(first, 1)
    assert p.delivered == 30 and p.delivered_records == 20 and not p.chunks
    assert p.committable() == 30
    p.mark_committed(30)
    assert p.committable() is None


def test_a_failed_delivery_rewinds_to_delivered_once_nothing_is_in_flight_and_counts_the_resend():
    p = PartitionProgress("t", 0, "remote.t", committed=0)
    first, second = handed_over(p, 10), handed_over(p, 20)
    deliver(first, 5)
    deliver(first, 5, Error())
    assert p.rewind_pending and [e.name() for e in p.errors] == ["_MSG_TIMED_OUT"] * 5
    assert not p.rewind_if_settled(now_ms=1000, backoff_ms=500), "the second chunk is still in flight"
    deliver(second, 10)  # arrived, but after a failed chunk: not delivered in order
    assert p.delivered == 0
    assert p.rewind_if_settled(now_ms=1000, backoff_ms=500)
    assert (p.delivered, p.sent, p.resent_records) == (0, 0, 20)
    assert not p.ready(1200) and p.ready(1500)
    deliver(second, 1)  # a late report of the abandoned generation changes nothing
    assert (p.delivered, p.sent) == (0, 0)


def test_records_retention_deleted_before_they_were_sent_are_counted_and_skipped():
    p = PartitionProgress("t", 0, "remote.t", committed=0)
    chunk = handed_over(p, 10)
    assert p.skip_to(50) == 40 and p.dropped_records == 40
    assert (p.delivered, p.sent) == (0, 50), "delivered waits for the chunk before the gap"
    deliver(chunk, 10)
    assert p.delivered == 50
    assert p.skip_to(40) == 0
