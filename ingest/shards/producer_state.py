"""Idempotent-producer state of one partition: the last batches of each producer.

Kafka's rule, kept here: a producer (producerId, producerEpoch) numbers its batches per
partition with baseSequence; a batch whose sequences equal one of the producer's last
RETAINED_BATCHES batches is a retry of something already stored, and is acknowledged with
the original offsets instead of being stored twice. A batch that skips ahead is refused
(OUT_OF_ORDER_SEQUENCE), one from an older epoch is fenced (INVALID_PRODUCER_EPOCH).

The state is derived data: every field comes from batch headers in the log. A snapshot
(`producer-state.json`, with the log offset it covers) saves rescanning the whole log on
start; everything after the snapshot offset is rebuilt from the log's headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ingest.topics import write_atomically

# Kafka keeps five: a producer has at most five requests in flight per partition, so a
# retry can only ever repeat one of its last five batches.
RETAINED_BATCHES = 5
# Bound on memory: a partition forgets the least recently seen producers beyond this.
PRODUCERS_MAX = 100_000
# Producers silent this long are forgotten, as with Kafka's producer.id.expiration.ms.
PRODUCER_EXPIRATION_MS = 24 * 3600 * 1000
SNAPSHOT_FILE = "producer-state.json"
SEQUENCE_MODULUS = 1 << 31


class OutOfOrderSequenceError(Exception):
    pass


class InvalidProducerEpochError(Exception):
    pass


@dataclass(slots=True)
class ProducerEntry:
    epoch: int
    last_seen_ms: int
    # (first_sequence, last_sequence, first_offset, last_offset), oldest first
    batches: list[tuple[int, int, int, int]] = field(default_factory=list)


class ProducerState:
    def __init__(self) -> None:
        self.producers: dict[int, ProducerEntry] = {}

    def check(self, producer_id: int, epoch: int, first_seq: int, last_seq: int) -> tuple[int, int] | None:
        """Offsets of the stored original if this batch is a retry, else None (append it).

        Raises if the batch may not be appended at all.
        """
        entry = self.producers.get(producer_id)
        if entry is None:
            # A producer this partition does not know must start at sequence 0: anything
            # else means its earlier batches are not here (lost unacked, or its state
            # expired), and storing this one would put it before them. Kafka refuses the
            # same way; the producer starts over under a new id and resends in order.
            if first_seq != 0:
                raise OutOfOrderSequenceError(
                    f"producer {producer_id} is unknown here and must start at sequence 0, not {first_seq}")
            return None
        if epoch < entry.epoch:
            raise InvalidProducerEpochError(
                f"producer {producer_id} epoch {epoch} is older than {entry.epoch}: fenced")
        if epoch > entry.epoch:
            if first_seq != 0:
                raise OutOfOrderSequenceError(
                    f"producer {producer_id} new epoch {epoch} must start at sequence 0, got {first_seq}")
            return None
        for b_first, b_last, off_first, off_last in entry.batches:
            if b_first == first_seq and b_last == last_seq:
                return off_first, off_last
        expected = (entry.batches[-1][1] + 1) % SEQUENCE_MODULUS if entry.batches else first_seq
        if first_seq != expected:
            raise OutOfOrderSequenceError(
                f"producer {producer_id} sent sequence {first_seq}, expected {expected}")
        return None

    def record(self, producer_id: int, epoch: int, first_seq: int, last_seq: int,
               first_offset: int, last_offset: int, now_ms: int) -> None:
        entry = self.producers.get(producer_id)
        if entry is None or epoch != entry.epoch:
            entry = self.producers[producer_id] = ProducerEntry(epoch, now_ms)
            if len(self.producers) > PRODUCERS_MAX:
                self._forget_oldest()
        entry.last_seen_ms = now_ms
        entry.batches.append((first_seq, last_seq, first_offset, last_offset))
        if len(entry.batches) > RETAINED_BATCHES:
            del entry.batches[0]

    def expire(self, now_ms: int) -> None:
        stale = [pid for pid, e in self.producers.items() if now_ms - e.last_seen_ms > PRODUCER_EXPIRATION_MS]
        for pid in stale:
            del self.producers[pid]

    def truncate_to(self, end_offset: int) -> None:
        """Forget batches at or above end_offset (the log was truncated there)."""
        for pid in list(self.producers):
            entry = self.producers[pid]
            entry.batches = [b for b in entry.batches if b[3] < end_offset]
            if not entry.batches:
                del self.producers[pid]

    def _forget_oldest(self) -> None:
        oldest = min(self.producers, key=lambda pid: self.producers[pid].last_seen_ms)
        del self.producers[oldest]

    def active_ids(self, since_ms: int) -> list[int]:
        return [pid for pid, e in self.producers.items() if e.last_seen_ms >= since_ms]

    # ---- snapshots ---------------------------------------------------------------------

    def save(self, directory: Path, covered_offset: int) -> None:
        """Persist the state; it describes every batch below covered_offset."""
        doc = {"offset": covered_offset,
               "producers": {str(pid): [e.epoch, e.last_seen_ms, e.batches] for pid, e in self.producers.items()}}
        write_atomically(directory / SNAPSHOT_FILE, orjson.dumps(doc))

    @classmethod
    def load(cls, directory: Path) -> tuple["ProducerState", int]:
        """The saved state and the offset it covers (0 with an empty state if none)."""
        state = cls()
        path = directory / SNAPSHOT_FILE
        try:
            doc = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return state, 0
        for pid, (epoch, seen, batches) in doc["producers"].items():
            state.producers[int(pid)] = ProducerEntry(epoch, seen, [tuple(b) for b in batches])
        return state, int(doc["offset"])
