"""What a leader worker knows about its followers, per partition (Kafka's Partition.scala).

- A follower's fetch at offset o says: every offset below o is on the follower's disk (a
  follower fetches again only after its group commit covered what it appended).
- Caught up (Kafka's lastCaughtUpTimeMs): a fetch at o >= the leader's log end makes the
  follower caught up now; a fetch at o >= the log end the leader had at the follower's
  previous fetch makes it caught up as of that previous fetch.
- In sync: caught up within replica_lag_max_ms. A follower that falls behind (or stops
  fetching) leaves the in-sync set (ISR) by itself; it rejoins once it is caught up.
- High watermark: the smallest offset every in-sync replica holds (the leader's own log
  end included); it never moves back. Consumers read only below it.
- A restarted leader worker starts from its checkpoint (Kafka's replication-offset-
  checkpoint): the high watermark and the in-sync followers of its last checkpoint, each
  counted as caught up now at that high watermark. So a restart does not show consumers
  what only the leader holds; a follower that does not come back leaves after
  replica_lag_max_ms as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class FollowerProgress:
    offset: int = 0                # everything below is on the follower's disk
    last_caught_up_ms: int = -1    # -1: never caught up since this leader started
    last_fetch_ms: int = 0
    leader_end_at_last_fetch: int = 0


@dataclass(slots=True)
class PartitionReplicas:
    followers: dict[str, FollowerProgress] = field(default_factory=dict)
    high_watermark: int = 0


class LeaderTracker:
    def __init__(self, replica_lag_max_ms: int) -> None:
        self.replica_lag_max_ms = replica_lag_max_ms
        self.partitions: dict[tuple[str, int], PartitionReplicas] = {}

    def reset(self) -> None:
        self.partitions.clear()

    def _state(self, part) -> PartitionReplicas:
        key = (part.topic, part.index)
        state = self.partitions.get(key)
        if state is None:
            # A new leader counts no follower in sync until it has fetched (Kafka starts
            # from the ISR the controller hands over; here there is no controller).
            state = self.partitions[key] = PartitionReplicas(high_watermark=part.log.log_end_offset)
        return state

    def restore(self, part, high_watermark: int, in_sync: list[str], now_ms: int) -> None:
        """Start a partition from a checkpoint of this same leader epoch."""
        hw = max(part.log.log_start_offset, min(high_watermark, part.log.log_end_offset))
        followers = {replica_id: FollowerProgress(offset=hw, last_caught_up_ms=now_ms) for replica_id in in_sync}
        self.partitions[(part.topic, part.index)] = PartitionReplicas(followers, hw)

    def checkpoint(self, part, now_ms: int) -> tuple[int, list[str]]:
        """(high watermark, in-sync follower ids) to write down."""
        state = self._state(part)
        return state.high_watermark, sorted(r for r, f in state.followers.items() if self.in_sync(f, now_ms))

    def in_sync(self, progress: FollowerProgress, now_ms: int) -> bool:
        return progress.last_caught_up_ms >= 0 and now_ms - progress.last_caught_up_ms <= self.replica_lag_max_ms

    def in_sync_count(self, part, now_ms: int) -> int:
        """Replicas in sync, the leader included."""
        state = self._state(part)
        return 1 + sum(self.in_sync(f, now_ms) for f in state.followers.values())

    def on_fetch(self, part, replica_id: str, offset: int, now_ms: int) -> bool:
        """A follower fetched at `offset`; True if the high watermark moved."""
        state = self._state(part)
        end = part.log.log_end_offset
        progress = state.followers.setdefault(replica_id, FollowerProgress())
        if offset >= end:
            progress.last_caught_up_ms = now_ms
        elif offset >= progress.leader_end_at_last_fetch and progress.last_fetch_ms:
            progress.last_caught_up_ms = max(progress.last_caught_up_ms, progress.last_fetch_ms)
        progress.offset = offset
        progress.last_fetch_ms = now_ms
        progress.leader_end_at_last_fetch = end
        return self.update_high_watermark(part, now_ms)

    def update_high_watermark(self, part, now_ms: int) -> bool:
        state = self._state(part)
        end = part.log.log_end_offset
        candidate = min([end] + [f.offset for f in state.followers.values() if self.in_sync(f, now_ms)])
        candidate = max(candidate, part.log.log_start_offset)
        if candidate > state.high_watermark:
            state.high_watermark = candidate
            return True
        return False

    def high_watermark(self, part) -> int:
        hw = self._state(part).high_watermark
        assert hw <= part.log.log_end_offset, (hw, part.log.log_end_offset)
        return hw

    def follower_lag(self, part, now_ms: int) -> list[tuple[str, int, float, bool]]:
        """(replica id, lag in records, seconds since caught up, in sync) per follower."""
        state = self._state(part)
        end = part.log.log_end_offset
        rows = []
        for replica_id, f in state.followers.items():
            caught_up = f.last_caught_up_ms if f.last_caught_up_ms >= 0 else f.last_fetch_ms
            seconds = 0.0 if f.offset >= end else max(0.0, (now_ms - caught_up) / 1000)
            rows.append((replica_id, max(0, end - f.offset), seconds, self.in_sync(f, now_ms)))
        return rows


# What an acks=all reply waits for: WAIT (not yet on every in-sync replica) or READY.
WAIT, READY = 0, 1
