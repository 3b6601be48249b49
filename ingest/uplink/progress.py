"""Progress of one local partition through one uplink: sans-IO bookkeeping, no Kafka here.

Offsets, low to high:

    committed <= delivered <= sent <= flushed (the local log's durable end)

- `sent`: the next local offset to read and hand to the producer.
- `delivered`: every record below it was reported delivered by the remote cluster (the
  longest prefix of chunks whose every record was acknowledged with acks=all).
- `committed`: `delivered` as last written to the consumer-group file; a restart resumes
  here, so a crash resends at most `delivered - committed` plus what was in flight.

Records are handed over in chunks (one local read each). A failed delivery fails its chunk;
once no chunk of the partition is in flight any more the partition rewinds `sent` to
`delivered` and resends: records of later chunks that did arrive are sent again (counted as
`resent`), the only duplicates outside a crash.
"""

from __future__ import annotations

from collections import deque


class Chunk:
    """Records [start, end) of one partition handed to the producer together."""

    __slots__ = ("progress", "start", "end", "records", "pending", "failed", "generation")

    def __init__(self, progress: PartitionProgress, start: int, end: int, records: int, generation: int) -> None:
        assert start <= end and records >= 0, (start, end, records)
        self.progress = progress
        self.start = start
        self.end = end
        self.records = records
        self.pending = records
        self.failed = False
        self.generation = generation

    def on_delivery(self, error, _message) -> None:
        """librdkafka's delivery report of one record of this chunk (acks=all reached, or not)."""
        self.pending -= 1
        if error is not None:
            self.failed = True
            self.progress.on_failure(self, error)
        if self.pending == 0:
            self.progress.on_chunk_done(self)


class PartitionProgress:
    def __init__(self, topic: str, partition: int, remote_topic: str, committed: int) -> None:
        assert committed >= 0
        self.topic = topic
        self.partition = partition
        self.remote_topic = remote_topic
        self.source = b""  # this log's name in the `ingest.offset` header (readback.py)
        self.committed = committed
        self.delivered = committed
        self.sent = committed
        self.chunks: deque[Chunk] = deque()
        self.generation = 0  # bumped by a rewind: reports of older chunks are ignored
        self.rewind_pending = False
        # Set while the cluster's tail is being read back (readback.py): nothing is shipped
        # until resume_after() says where the cluster stands.
        self.resync_pending = False
        self.retry_at_ms = 0
        # Counted here, collected (and reset) by the uplink's metrics.
        self.delivered_records = 0
        self.resent_records = 0
        self.dropped_records = 0
        self.already_delivered_records = 0
        self.errors: list = []  # delivery errors since the uplink last looked
        self.last_success = False

    def check(self) -> None:
        assert self.committed <= self.delivered <= self.sent, (self.committed, self.delivered, self.sent)

    @property
    def in_flight(self) -> int:
        return sum(c.pending for c in self.chunks)

    def open_chunk(self) -> Chunk:
        """A chunk starting at `sent`, for the delivery reports of the records about to be
        produced; close_chunk() registers it once they are handed over."""
        return Chunk(self, self.sent, self.sent, 0, self.generation)

    def close_chunk(self, chunk: Chunk, end: int, records: int) -> None:
        """Records [sent, end), `records` of them, were handed to the producer (reports are
        served only by the producer's poll(), so none can have arrived before this)."""
        assert chunk.start == self.sent and end > self.sent and chunk.pending == 0, (chunk.start, self.sent, end)
        chunk.end = end
        chunk.records = chunk.pending = records
        self.chunks.append(chunk)
        self.sent = end
        if records == 0:
            self.on_chunk_done(chunk)

    def on_failure(self, chunk: Chunk, error) -> None:
        if chunk.generation == self.generation:
            self.errors.append(error)
            self.rewind_pending = True

    def on_chunk_done(self, chunk: Chunk) -> None:
        if chunk.generation != self.generation:
            return
        while self.chunks and self.chunks[0].pending == 0 and not self.chunks[0].failed:
            done = self.chunks.popleft()
            assert done.start == self.delivered, (done.start, self.delivered)
            self.delivered_records += done.records
            self.delivered = done.end
            self.last_success = True
        self.check()

    def rewind_if_settled(self, now_ms: int, backoff_ms: int) -> bool:
        """After a failure and once nothing of this partition is in flight: send again from
        `delivered`. Returns True when it rewound."""
        if not self.rewind_pending or any(c.pending for c in self.chunks):
            return False
        self.resent_records += self.sent - self.delivered
        self.abandon()
        self.retry_at_ms = now_ms + backoff_ms
        return True

    def abandon(self) -> None:
        """Forget what is in flight (its reports are ignored); resume at `delivered`."""
        self.generation += 1
        self.chunks.clear()
        self.sent = self.delivered
        self.rewind_pending = False
        self.check()

    def skip_to(self, log_start_offset: int) -> int:
        """Retention deleted records this uplink had not shipped: count them as dropped and
        go on from the log's start. Returns how many were dropped."""
        if self.sent >= log_start_offset:
            return 0
        dropped = log_start_offset - self.sent
        if not self.chunks:
            self.delivered = log_start_offset
        else:  # delivered moves past the gap once the chunks before it are delivered
            self.close_chunk(self.open_chunk(), log_start_offset, 0)
        self.sent = log_start_offset
        self.dropped_records += dropped
        self.check()
        return dropped

    def ready(self, now_ms: int) -> bool:
        return not self.rewind_pending and not self.resync_pending and now_ms >= self.retry_at_ms

    def resume_after(self, offsets_found: set[int]) -> int:
        """The read-back found these offsets of this partition in the cluster: shipping
        resumes at the first offset from `delivered` on that is not among them. Only a run
        of offsets the cluster holds is passed over, never a record it lacks (a failed
        delivery may have left a gap that later records jumped). Returns how many records
        that spared."""
        assert not self.chunks, "a read-back runs only while nothing is in flight"
        self.resync_pending = False
        resume = self.delivered
        while resume in offsets_found:
            resume += 1
        spared = resume - self.delivered
        self.delivered = self.sent = resume
        self.already_delivered_records += spared
        self.check()
        return spared

    def committable(self) -> int | None:
        """The offset to commit now, or None if the committed one is current."""
        return self.delivered if self.delivered > self.committed else None

    def mark_committed(self, offset: int) -> None:
        assert self.committed <= offset <= self.delivered, (self.committed, offset, self.delivered)
        self.committed = offset
