"""The replication hooks of one worker: role, leader epoch, leader bookkeeping, fetcher.

The worker and its request handler call these few methods; everything about replication
a worker does is here or in the modules this one uses:

- ``check_leader`` (produce and consumer fetch): a follower refuses with NOT_LEADER.
- ``append_epoch``: the epoch a leader stamps into each batch (None when not replicated).
- ``high_watermark``: what consumers may read (the log end when not replicated).
- ``ack_status``: whether an acks=all reply may go (every in-sync replica has the batch),
  must wait, or must fail with NOT_ENOUGH_REPLICAS.
- ``on_request``: REPLICA_FETCH and EPOCH_END_OFFSET from followers.
- ``apply``: a role change sent by the supervisor (start, promotion, fencing).
- ``step``: once per loop turn: ISR shrink, parked replica fetches, the fetcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ingest.clock import mono_ms, now_ms
from ingest.errors import CorruptDataError, OffsetOutOfRangeError
from ingest.net import wire
from ingest.net.errors import ErrorCode, IngestError
from ingest.replication import checkpoint
from ingest.replication.follower import Fetcher
from ingest.replication.leader import READY, WAIT, LeaderTracker  # noqa: F401 (re-exported)
from ingest.replication.truncate import restart_log_dir, truncate_log_dir
from ingest.shards import batch as batch_codec
from ingest.shards.partition import Partition
from ingest.shards.requests import error_reply

log = logging.getLogger("ingest.replication")

# Replica fetches parked at once per worker (a few followers times the partitions owned).
PARKED_REPLICA_FETCHES_MAX = 4096
# How often the in-sync sets are re-evaluated for time-based shrinking.
ISR_CHECK_INTERVAL_MS = 50



@dataclass(slots=True)
class ParkedFetch:
    deadline_ms: int
    identity: bytes
    request: object
    part: object


class WorkerReplication:
    def __init__(self, worker) -> None:
        self.w = worker
        self.settings = worker.config.replication
        self.enabled = self.settings.enabled
        self.is_leader = True
        self.leader_epoch = 0
        self.replica_id = ""
        self.leader: dict | None = None
        self.replicas: set[str] = set()  # appliance ids of the peers allowed to fetch as followers
        self.tracker = LeaderTracker(self.settings.replica_lag_max_ms)
        self.fetcher: Fetcher | None = None
        self.parked: list[ParkedFetch] = []
        self._next_isr_check_ms = 0
        self._next_checkpoint_ms = 0
        self._checkpointed: dict[tuple[str, int], tuple[int, list[str]]] = {}

    # ---- role --------------------------------------------------------------------------

    def apply(self, doc: dict) -> None:
        """Take the role the supervisor decided: {"role", "leader_epoch", "replica_id",
        "leader": {"routers": [...]} or None}."""
        if not self.enabled:
            return
        was_leader, old_epoch = self.is_leader and self.replica_id != "", self.leader_epoch
        self.is_leader = doc["role"] == "leader"
        self.leader_epoch = int(doc["leader_epoch"])
        self.replica_id = doc["replica_id"]
        self.replicas = set(doc.get("replicas", ()))
        leader = doc.get("leader")
        if self.is_leader:
            if self.fetcher is not None:
                self.fetcher.close()
                self.fetcher = None
            if not was_leader or old_epoch != self.leader_epoch:
                log.info("worker %d: leader at epoch %d", self.w.worker_id, self.leader_epoch)
                self.tracker.reset()
                self._restore_checkpoints()
        else:
            if was_leader:
                log.warning("worker %d: now a follower at epoch %d", self.w.worker_id, self.leader_epoch)
                self._fail_leader_work()
            if self.fetcher is not None and (leader is None or leader["routers"] != self.fetcher.routers
                                             or self.leader_epoch != self.fetcher.leader_epoch):
                self.fetcher.close()
                self.fetcher = None
            if self.fetcher is None and leader is not None:
                self.fetcher = Fetcher(self.w, leader, self.leader_epoch, self.replica_id, mono_ms())
        self.leader = leader

    def _restore_checkpoints(self) -> None:
        """A leader worker restarted within its epoch resumes its high watermark and
        in-sync set (see leader.py); a new epoch starts afresh."""
        self._checkpointed.clear()
        for part in self.w.partitions.values():
            found = checkpoint.load(part.directory, self.leader_epoch)
            if found is not None:
                self.tracker.restore(part, *found, mono_ms())

    def _save_checkpoints(self, t_ms: int) -> None:
        for key, part in self.w.partitions.items():
            current = self.tracker.checkpoint(part, t_ms)
            if self._checkpointed.get(key) == current:
                continue
            try:
                checkpoint.save(part.directory, self.leader_epoch, *current)
            except OSError as e:  # an optimisation (e.g. a full disk): the next one retries
                log.warning("%s-%d: high-watermark checkpoint failed: %s", key[0], key[1], e)
                continue
            self._checkpointed[key] = current

    def _fail_leader_work(self) -> None:
        error = IngestError(ErrorCode.NOT_LEADER, "this appliance is a follower now")
        for part in list(self.w.partitions.values()):
            self.w.requests.fail_pending(part, error.code, error.message)
        self.w.requests.fail_waiting(ErrorCode.NOT_LEADER, error.message)
        for f in self.parked:
            self.w.requests.send(f.identity, error_reply(f.request, error))
        self.parked = []
        self.tracker.reset()

    # ---- produce and consume -----------------------------------------------------------

    def check_leader(self, partition: int) -> None:
        if self.enabled and not self.is_leader:
            raise IngestError(ErrorCode.NOT_LEADER, "this appliance is a follower replica", partition)

    def append_epoch(self) -> int | None:
        return self.leader_epoch if self.enabled else None

    def high_watermark(self, part) -> int:
        if not self.enabled:
            return part.log.log_end_offset
        if self.is_leader:
            # Up to date at every read: with no follower in sync it is the log end at once.
            if self.tracker.update_high_watermark(part, mono_ms()):
                self.w.acks_releasable = True
            return self.tracker.high_watermark(part)
        return self.fetcher.high_watermark((part.topic, part.index), part) if self.fetcher else part.log.log_start_offset

    def check_acks_all(self, part) -> None:
        """Before appending an acks=all batch: refuse if too few replicas are in sync."""
        if not self.enabled:
            return
        in_sync = self.tracker.in_sync_count(part, mono_ms())
        if in_sync < self.settings.min_insync_replicas:
            raise IngestError(ErrorCode.NOT_ENOUGH_REPLICAS,
                              f"{in_sync} in-sync replica(s), min_insync_replicas is "
                              f"{self.settings.min_insync_replicas}", part.index)

    def ack_status(self, part, last_offset: int) -> int:
        """READY once every in-sync replica holds last_offset on disk; WAIT before; raises
        NOT_ENOUGH_REPLICAS if the in-sync set shrank below min_insync_replicas."""
        if not self.enabled:
            return READY
        if not self.is_leader:
            raise IngestError(ErrorCode.NOT_LEADER, "this appliance is a follower now", part.index)
        if self.tracker.high_watermark(part) > last_offset:
            if self.tracker.in_sync_count(part, mono_ms()) < self.settings.min_insync_replicas:
                raise IngestError(ErrorCode.NOT_ENOUGH_REPLICAS,
                                  "the in-sync set shrank below min_insync_replicas", part.index)
            return READY
        return WAIT

    # ---- requests from followers -------------------------------------------------------

    def on_request(self, identity: bytes, request, part) -> bytes | None:
        if not self.enabled or not self.is_leader:
            raise IngestError(ErrorCode.NOT_LEADER, "this appliance is not the leader", request.partition)
        if isinstance(request, wire.EpochEndOffsetRequest):
            epoch, end = part.epochs.end_offset_for(request.leader_epoch, part.log.log_end_offset)
            return wire.EpochEndOffsetReply(request.partition, epoch, end, request.correlation_id).encode()
        if request.replica_id not in self.replicas:
            raise IngestError(ErrorCode.INVALID_REQUEST,
                              f"replica {request.replica_id} is not one of this appliance's peers (yet)",
                              request.partition)
        if request.leader_epoch > self.leader_epoch:
            # A follower knows a newer leader: this appliance was replaced. The supervisor
            # learns it from its peers too; say so at once.
            self.w.report_fenced(request.leader_epoch)
            raise IngestError(ErrorCode.FENCED_LEADER_EPOCH,
                              f"epoch {self.leader_epoch} was replaced by epoch {request.leader_epoch}",
                              request.partition)
        if request.offset > part.log.log_end_offset:
            raise IngestError(ErrorCode.OFFSET_OUT_OF_RANGE,
                              f"offset {request.offset} is past the leader's log end {part.log.log_end_offset}",
                              request.partition)
        if self.tracker.on_fetch(part, request.replica_id, request.offset, mono_ms()):
            self.w.acks_releasable = True
        if (request.offset == part.log.log_end_offset and request.max_wait_ms > 0
                and len(self.parked) < PARKED_REPLICA_FETCHES_MAX):
            self.parked.append(ParkedFetch(mono_ms() + request.max_wait_ms, identity, request, part))
            return None
        return self._fetch_reply(request, part)

    def _fetch_reply(self, request, part) -> bytes:
        lg = part.log
        if request.offset < lg.log_start_offset:
            # Retention deleted what the follower needs next: the reply's log start tells
            # it where to start over.
            return wire.ReplicaFetchReply(request.partition, self.tracker.high_watermark(part), lg.log_start_offset,
                                          lg.log_end_offset, self.leader_epoch, b"", request.correlation_id).encode()
        try:
            data = lg.read(request.offset, request.max_bytes)
        except OffsetOutOfRangeError as e:
            raise IngestError(ErrorCode.OFFSET_OUT_OF_RANGE, str(e), request.partition) from None
        except CorruptDataError as e:
            raise IngestError(ErrorCode.STORAGE_ERROR, str(e), request.partition) from None
        return wire.ReplicaFetchReply(request.partition, self.tracker.high_watermark(part), lg.log_start_offset,
                                      lg.log_end_offset, self.leader_epoch, data, request.correlation_id).encode()

    def _serve_parked(self, t_ms: int) -> None:
        if not self.parked:
            return
        still = []
        for f in self.parked:
            if f.part.log.log_end_offset > f.request.offset or t_ms >= f.deadline_ms or self.w.stopping:
                try:
                    reply = self._fetch_reply(f.request, f.part)
                except IngestError as e:
                    reply = error_reply(f.request, e)
                self.w.requests.send(f.identity, reply)
            else:
                still.append(f)
        self.parked = still

    # ---- follower side -----------------------------------------------------------------

    def append_fetched(self, part, records) -> int:
        """Append the batches of a REPLICA_FETCH reply as they are; returns how many."""
        data = bytes(records)
        appended = 0
        t = now_ms()
        for pos, header in batch_codec.iter_batches(data):
            if header.last_offset < part.log.log_end_offset:
                continue  # already here (a resent fetch)
            batch = memoryview(data)[pos:pos + header.size_bytes]
            try:
                part.append_replica(batch, header, t)
            except (ValueError, OSError) as e:  # invalid batch, disk full, I/O error
                log.error("%s-%d: cannot append a replicated batch at %d: %s",
                          part.topic, part.index, header.base_offset, e)
                break
            self.w.dirty.add(part)
            self.w.probe.records_in(part.topic, header.last_offset_delta + 1, header.size_bytes)
            appended += 1
        return appended

    def truncate(self, part, offset: int, restart: bool = False) -> None:
        """Cut a partition's log back to `offset`, or with `restart` replace it by an empty
        log starting there (closed, changed, reopened by a recovery scan)."""
        key = (part.topic, part.index)
        self.w.dirty.discard(part)
        part.close()
        if restart:
            restart_log_dir(part.directory, offset)
            end = offset
        else:
            end = truncate_log_dir(part.directory, offset)
        reopened = Partition(self.w.config.server.data_dir, part.topic, part.index, self.w.config.storage, now_ms())
        assert reopened.log.log_end_offset == end, (reopened.log.log_end_offset, end)
        reopened.epochs.truncate_from_end(end)
        self.w.partitions[key] = reopened

    # ---- each loop turn ----------------------------------------------------------------

    def step(self, events: dict) -> None:
        if not self.enabled:
            return
        t = mono_ms()
        if self.fetcher is not None:
            for sock in list(self.fetcher.sockets.values()):
                if sock in events:
                    self.fetcher.on_readable(sock, t)
            if not self.w.stopping:
                self.fetcher.step(t)
        if self.is_leader:
            if t >= self._next_isr_check_ms:
                self._next_isr_check_ms = t + ISR_CHECK_INTERVAL_MS
                for part in self.w.partitions.values():
                    if self.tracker.update_high_watermark(part, t):
                        self.w.acks_releasable = True
                if self.w.requests.pending:
                    self.w.acks_releasable = True  # an in-sync set may have shrunk: fail or release
            if t >= self._next_checkpoint_ms:
                self._next_checkpoint_ms = t + self.settings.high_watermark_checkpoint_interval_ms
                self._save_checkpoints(t)
            self._serve_parked(t)

    def next_deadline_in_ms(self, t_ms: int) -> int:
        if not self.enabled:
            return 1000
        waits = [f.deadline_ms for f in self.parked]
        if self.fetcher is not None:
            waits.append(self.fetcher.next_deadline_ms())
        if self.is_leader and self.w.requests.pending:
            waits.append(t_ms + ISR_CHECK_INTERVAL_MS)
        return max(0, min(waits) - t_ms) if waits else 1000

    # ---- metrics -----------------------------------------------------------------------

    def gauges(self, t_wall_ms: int) -> list[tuple[str, dict, float]]:
        """Per partition: in-sync replicas (leader) or lag (follower); per worker: role,
        epoch, under-replicated partitions. A lone appliance is a replica set of one."""
        t = mono_ms()
        rows = []
        under = 0
        replicas = len(self.settings.peers) + 1
        for key, part in self.w.partitions.items():
            labels = {"topic": key[0], "partition": str(key[1])}
            if not self.enabled:
                rows.append(("partition_in_sync_replicas", labels, 1))
            elif self.is_leader:
                in_sync = self.tracker.in_sync_count(part, t)
                under += in_sync < replicas
                rows.append(("partition_in_sync_replicas", labels, in_sync))
                for replica_id, records, seconds, _ in self.tracker.follower_lag(part, t):
                    rows.append(("replica_lag_records", {**labels, "replica": replica_id}, records))
                    rows.append(("replica_lag_seconds", {**labels, "replica": replica_id}, seconds))
            elif self.fetcher is not None:
                records, seconds = self.fetcher.lag(key, part, t)
                rows.append(("replica_lag_records", {**labels, "replica": self.replica_id}, records))
                rows.append(("replica_lag_seconds", {**labels, "replica": self.replica_id}, seconds))
        worker = {"worker": str(self.w.worker_id)}
        rows.append(("under_replicated_partitions", worker, under))
        rows.append(("leader_epoch", worker, self.leader_epoch))
        rows.append(("replication_is_leader", worker, 1.0 if self.is_leader else 0.0))
        return rows

    def close(self) -> None:
        if self.enabled and self.is_leader:
            self._save_checkpoints(mono_ms())
        if self.fetcher is not None:
            self.fetcher.close()
            self.fetcher = None
