"""One partition as its worker sees it: the log, idempotent-producer state, group offsets.

Contract of `append`: the returned offsets are assigned and the bytes are in the log
(page cache); they are durable once `log.flushed_offset > last_offset` (group commit).
A retried batch from an idempotent producer returns the offsets of the stored original
and stores nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ingest.errors import CorruptDataError, InvalidBatchError, OffsetOutOfRangeError
from ingest.replication.epochs import LeaderEpochCache
from ingest.shards import batch as batch_codec
from ingest.shards.group_offsets import GroupOffsets
from ingest.shards.log import Log, LogConfig
from ingest.shards.producer_state import ProducerState

log = logging.getLogger("ingest.partition")

# How much log a producer-state rebuild reads per step.
REBUILD_READ_BYTES = 4 << 20
# Snapshot producer state at most this often; a crash rescans only what came after.
PRODUCER_SNAPSHOT_INTERVAL_MS = 10_000


def partition_dir(data_dir: Path, topic: str, partition: int) -> Path:
    return Path(data_dir) / f"{topic}-{partition}"


class Partition:
    def __init__(self, data_dir: Path, topic: str, index: int, config: LogConfig, now_ms: int) -> None:
        self.topic = topic
        self.index = index
        self.directory = partition_dir(data_dir, topic, index)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.directory, config)
        self.groups = GroupOffsets(self.directory)
        # The log end offset the snapshot on disk was taken at, while it equals memory
        # (None: memory differs): close skips rewriting an unchanged snapshot.
        self._snapshot_end: int | None = None
        self.producers = self._load_producer_state(now_ms)
        self.epochs = LeaderEpochCache(self.directory)
        # A crash may have cut a tail the checkpoint had already seen.
        self.epochs.truncate_from_end(self.log.log_end_offset)
        self._snapshot_ms = now_ms
        if self.log.recovered_by_scan:
            how = "recovered by scanning its tail"
        elif self.log.log_end_offset == 0:
            how = "new, empty"
        else:
            how = "clean shutdown, scan skipped"
        log.info("%s-%d: %s; offsets %d..%d", topic, index, how, self.log.log_start_offset, self.log.log_end_offset)

    def _load_producer_state(self, now_ms: int) -> ProducerState:
        state, covered = ProducerState.load(self.directory)
        end = self.log.log_end_offset
        if covered == end:  # nothing to rebuild nor to cut: memory will equal the file
            self._snapshot_end = end
        if covered > end:
            # The log lost a torn tail the snapshot had seen: its newest entries may name
            # offsets that no longer exist. Rebuild from the start of what is kept.
            state.truncate_to(end)
            covered = min(covered, end)
        offset = max(covered, self.log.log_start_offset)
        while offset < end:
            try:
                chunk = self.log.read(offset, REBUILD_READ_BYTES)
            except CorruptDataError as e:
                # A corrupt sealed batch is never served; producers seen only beyond it
                # simply count as new (their retries after it cannot be deduplicated).
                log.error("%s-%d: producer state rebuild skips corrupt data: %s", self.topic, self.index, e)
                offset = max(e.next_good_offset, offset + 1)
                continue
            if not chunk:
                break
            for _pos, header in batch_codec.iter_batches(chunk):
                if header.last_offset < offset:
                    continue
                if header.producer_id >= 0:
                    state.record(header.producer_id, header.producer_epoch, header.base_sequence,
                                 header.base_sequence + header.last_offset_delta,
                                 header.base_offset, header.last_offset, now_ms)
                offset = header.last_offset + 1
        return state

    def append(self, batch, header, now_ms: int, leader_epoch: int | None = None) -> tuple[int, int, bool]:
        """Append a validated batch; returns (base_offset, last_offset, was_duplicate).
        With `leader_epoch` (a replicated leader) the batch is stamped with it."""
        pid = header.producer_id
        if pid >= 0:
            last_seq = header.base_sequence + header.last_offset_delta
            original = self.producers.check(pid, header.producer_epoch, header.base_sequence, last_seq)
            if original is not None:
                return original[0], original[1], True
        if leader_epoch is not None:
            self.epochs.assign(leader_epoch, self.log.log_end_offset)  # on disk before the batch is acked
        base, last = self.log.append(batch, leader_epoch)
        if pid >= 0:
            self.producers.record(pid, header.producer_epoch, header.base_sequence, last_seq, base, last, now_ms)
        return base, last, False

    def append_replica(self, batch, header, now_ms: int) -> tuple[int, int]:
        """Append a batch fetched from the leader as it is: same bytes, same offsets, its
        leader epoch. Producer state learns it without judging it (the leader did)."""
        if header.base_offset != self.log.log_end_offset:
            raise InvalidBatchError(f"replicated batch at offset {header.base_offset}, log end is "
                                    f"{self.log.log_end_offset}", "offset")
        self.epochs.assign(header.partition_leader_epoch, header.base_offset)
        base, last = self.log.append(batch)
        assert base == header.base_offset
        pid = header.producer_id
        if pid >= 0:
            self.producers.record(pid, header.producer_epoch, header.base_sequence,
                                  header.base_sequence + header.last_offset_delta, base, last, now_ms)
        return base, last

    def after_flush(self, now_ms: int) -> None:
        """Snapshot producer state now and then; it covers everything below log end."""
        if self.producers.producers and now_ms - self._snapshot_ms >= PRODUCER_SNAPSHOT_INTERVAL_MS:
            self.producers.expire(now_ms)
            self._save_producers()
            self._snapshot_ms = now_ms

    def _save_producers(self) -> None:
        end = self.log.log_end_offset
        self._snapshot_end = None  # a failed write may have left either version
        self.producers.save(self.directory, end)
        self._snapshot_end = end

    def gauges(self, now_ms: int, high_watermark: int) -> list[tuple[str, dict, float]]:
        """This partition's offsets, size and consumer-group lag, for the metrics snapshot."""
        lg = self.log
        labels = {"topic": self.topic, "partition": str(self.index)}
        rows = [("log_start_offset", labels, lg.log_start_offset), ("log_end_offset", labels, lg.log_end_offset),
                ("log_high_watermark", labels, high_watermark), ("log_flushed_offset", labels, lg.flushed_offset),
                ("log_size_bytes", labels, lg.size_bytes), ("log_corrupt_batches", labels, len(lg.problems))]
        for group, committed in self.groups.groups().items():
            group_labels = {"group": group, **labels}
            rows.append(("consumer_group_lag_records", group_labels, max(0, high_watermark - committed)))
            rows.append(("consumer_group_lag_seconds", group_labels, self._lag_seconds(committed, now_ms)))
        return rows

    def _lag_seconds(self, committed: int, now_ms: int) -> float:
        """Age of the first record the group has not consumed (0 when caught up)."""
        if committed >= self.log.log_end_offset:
            return 0.0
        try:
            chunk = self.log.read(max(committed, self.log.log_start_offset), 1)
        except (CorruptDataError, OffsetOutOfRangeError):
            return 0.0
        for _pos, header in batch_codec.iter_batches(chunk):
            return max(0.0, (now_ms - header.base_timestamp_ms) / 1000)
        return 0.0

    def close(self) -> None:
        """Flush, snapshot producer state and mark the log cleanly shut down. A partition
        not appended to since its last snapshot and clean marker writes nothing."""
        self.log.flush()
        try:
            if self._snapshot_end != self.log.log_end_offset:
                self._save_producers()
        except OSError as e:  # an optimisation (e.g. a full disk): the next open rebuilds it from the log
            log.warning("%s-%d: producer state snapshot failed: %s", self.topic, self.index, e)
        self.log.close()
