"""The replication model without processes: leader-epoch cache, truncation of a log
directory, the role decision, the in-sync set and high watermark, the wire messages."""

from __future__ import annotations

import pytest

from ingest.net import wire
from ingest.replication.epochs import CHECKPOINT_FILE, NO_EPOCH, LeaderEpochCache
from ingest.replication.leader import LeaderTracker
from ingest.replication.peers import PeerLeader, decide
from ingest.replication.role import Role
from ingest.replication.truncate import restart_log_dir, truncate_log_dir
from ingest.shards import batch as batch_codec
from ingest.shards.log import Log, LogConfig


def test_epoch_cache_answers_offsets_for_leader_epoch_like_kafka(tmp_path):
    cache = LeaderEpochCache(tmp_path)
    assert cache.end_offset_for(0, 10) == (NO_EPOCH, 10)
    assert cache.assign(0, 0) and cache.assign(2, 100) and cache.assign(5, 250)
    assert not cache.assign(2, 300)  # an older epoch never comes back
    assert cache.end_offset_for(0, 400) == (0, 100)
    assert cache.end_offset_for(1, 400) == (0, 100)     # epoch 1 never appended: epoch 0's end
    assert cache.end_offset_for(2, 400) == (2, 250)
    assert cache.end_offset_for(5, 400) == (5, 400)     # the latest epoch ends at the log end
    assert cache.end_offset_for(9, 400) == (5, 400)
    assert (tmp_path / CHECKPOINT_FILE).read_text() == "0\n3\n0 0\n2 100\n5 250\n"  # Kafka's format
    assert LeaderEpochCache(tmp_path).entries == [(0, 0), (2, 100), (5, 250)]
    cache.truncate_from_end(250)
    assert LeaderEpochCache(tmp_path).entries == [(0, 0), (2, 100)]


def _log_with_batches(directory, batches: int, per_batch: int, segment_bytes: int) -> Log:
    log = Log(directory, LogConfig(segment_bytes=segment_bytes))
    for b in range(batches):
        records = [batch_codec.Record(0, 1_700_000_000_000, None, b"b%d-r%d" % (b, r)) for r in range(per_batch)]
        log.append(batch_codec.encode_batch(records))
    log.close()
    return log


@pytest.mark.parametrize("offset, expected_end", [(30, 30), (35, 30), (0, 0), (100, 100)])
def test_truncation_cuts_whole_batches_across_segments_and_the_log_reopens_there(tmp_path, offset, expected_end):
    _log_with_batches(tmp_path, batches=10, per_batch=10, segment_bytes=600)  # several segments
    assert truncate_log_dir(tmp_path, offset) == expected_end
    log = Log(tmp_path, LogConfig(segment_bytes=600))
    assert log.log_end_offset == expected_end
    data = b"".join(log.read(o, 1 << 20) for o in [0] if expected_end)
    offsets = [r.offset for pos, _ in batch_codec.iter_batches(data) for r in batch_codec.decode_batch(data, pos)[1]]
    assert offsets == list(range(len(offsets))) and (not offsets or offsets[-1] < expected_end)
    base, last = log.append(batch_codec.encode_batch([batch_codec.Record(0, 1, None, b"next")]))
    assert (base, last) == (expected_end, expected_end)
    log.close()


def _leader(epoch: int, appliance_id: str = "b") -> PeerLeader:
    return PeerLeader("tcp://peer:7400", epoch, appliance_id, ("tcp://peer:7402",), {})


def test_a_leader_that_sees_a_newer_epoch_becomes_its_follower_and_never_the_reverse():
    assert decide(Role("leader", 0), "a", [_leader(1)]) == (Role("follower", 1), _leader(1))
    assert decide(Role("leader", 1), "a", [_leader(0)]) == (Role("leader", 1), None)
    assert decide(Role("leader", 1), "a", []) == (Role("leader", 1), None)
    assert decide(Role("follower", 0), "a", [_leader(0)]) == (Role("follower", 0), _leader(0))
    assert decide(Role("follower", 2), "a", [_leader(1)]) == (Role("follower", 2), None)  # a stale leader
    # Two leaders of one epoch (misconfigured): the larger appliance id follows.
    assert decide(Role("leader", 0), "c", [_leader(0, "b")])[0] == Role("follower", 0)
    assert decide(Role("leader", 0), "a", [_leader(0, "b")])[0] == Role("leader", 0)


class _Part:
    def __init__(self, end: int) -> None:
        self.topic, self.index = "t", 0
        self.log = type("L", (), {"log_end_offset": end, "log_start_offset": 0})()


def test_high_watermark_is_the_smallest_in_sync_offset_and_a_lagging_follower_drops_out():
    tracker = LeaderTracker(replica_lag_max_ms=1000)
    part = _Part(end=10)
    assert tracker.high_watermark(part) == 10 and tracker.in_sync_count(part, 0) == 1
    tracker.on_fetch(part, "f", 10, now_ms=100)             # caught up: in sync
    part.log.log_end_offset = 20
    assert not tracker.update_high_watermark(part, 150)
    assert tracker.high_watermark(part) == 10 and tracker.in_sync_count(part, 150) == 2
    # At 15 it holds the log end seen at its previous fetch: caught up as of that fetch (100).
    assert tracker.on_fetch(part, "f", 15, now_ms=200)
    assert tracker.high_watermark(part) == 15
    assert tracker.in_sync_count(part, 1100) == 2
    assert tracker.in_sync_count(part, 1101) == 1           # not caught up for replica_lag_max_ms
    assert tracker.update_high_watermark(part, 1101) and tracker.high_watermark(part) == 20
    tracker.on_fetch(part, "f", 20, now_ms=1300)            # back: caught up, in sync again
    assert tracker.in_sync_count(part, 1300) == 2 and tracker.high_watermark(part) == 20


@pytest.mark.parametrize("message", [
    wire.ReplicaFetchRequest("telemetry", 3, 42, 1 << 20, 500, 7, "3f9c00aa11bb22cc", 9),
    wire.EpochEndOffsetRequest("telemetry", 3, wire.NO_EPOCH, 10),
    wire.PromoteRequest(11),
])
def test_replication_requests_round_trip(message):
    assert wire.decode_request(message.encode()) == message


def test_replication_replies_round_trip_and_malformed_ones_are_refused():
    reply = wire.decode_reply(wire.ReplicaFetchReply(3, 5, 0, 6, 7, b"", 9).encode())
    assert (reply.high_watermark, reply.log_end_offset, reply.leader_epoch) == (5, 6, 7)
    assert wire.decode_reply(wire.EpochEndOffsetReply(3, 2, 100, 4).encode()) == wire.EpochEndOffsetReply(3, 2, 100, 4)
    assert wire.decode_reply(wire.PromoteReply({"role": "leader"}, 1).encode()).document == {"role": "leader"}
    frame = bytearray(wire.ReplicaFetchRequest("t", 0, 0, 100, 0, 0, "a", 1).encode())
    with pytest.raises(wire.WireError):
        wire.decode_request(bytes(frame[:-1]) + b"/")  # a replica id outside the name charset
    with pytest.raises(wire.WireError):
        wire.ReplicaFetchRequest("t", 0, 0, 100, 0, -2, "a").encode()


def test_a_log_restarted_at_the_leaders_log_start_is_empty_there_and_appends_follow_on(tmp_path):
    _log_with_batches(tmp_path, batches=3, per_batch=10, segment_bytes=1 << 20)
    (tmp_path / CHECKPOINT_FILE).write_text("0\n1\n0 0\n")
    restart_log_dir(tmp_path, 500)
    log = Log(tmp_path, LogConfig())
    assert (log.log_start_offset, log.log_end_offset) == (500, 500)
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    batch = bytearray(batch_codec.encode_batch([batch_codec.Record(0, 1, None, b"x")]))
    batch[:8] = (500).to_bytes(8, "big")  # a replicated batch carries its offset
    assert log.append(bytes(batch)) == (500, 500)
    log.close()


def test_a_peer_whose_metadata_is_not_usable_counts_as_no_leader():
    from ingest.replication.peers import leader_of
    assert leader_of("tcp://p:1", None) is None
    assert leader_of("tcp://p:1", {"replication": {"role": "follower"}}) is None
    assert leader_of("tcp://p:1", {"replication": {"role": "leader"}, "workers": [{"id": "x"}]}) is None
    peer = leader_of("tcp://p:1", {"replication": {"role": "leader", "leader_epoch": 4}, "appliance_id": "b",
                                   "workers": [{"id": 1, "router": "r1"}, {"id": 0, "router": "r0"}]})
    assert (peer.leader_epoch, peer.routers) == (4, ("r0", "r1"))
