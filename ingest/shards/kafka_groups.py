"""Kafka's committed offsets: FindCoordinator, OffsetCommit, OffsetFetch.

A group's coordinator is one worker (crc32 of the group id modulo workers), as one Kafka
broker coordinates each group. The offsets themselves stay where ZeroMQ consumers keep
theirs: in the partition's consumer-offsets.json, written by the worker that owns the
partition. The coordinator commits its own partitions directly and hands the others to
their owners over the ZeroMQ request protocol (OFFSET_COMMIT / OFFSET_FETCH to the
owner's ROUTER), answering the Kafka client once every owner replied. So a group's
offsets are one set whichever protocol committed them, and its lag metrics cover both.

Group membership (JoinGroup, SyncGroup, Heartbeat, LeaveGroup): kafka_membership.py.
"""

from __future__ import annotations

import errno
import itertools
import zlib

import zmq

from ingest.clock import mono_ms
from ingest.config import TOPIC_NAME_RE
from ingest.net import wire
from ingest.net.errors import IngestError
from ingest.shards.kafka_api import (FROM_INGEST, INVALID_REQUEST, KAFKA_STORAGE_ERROR, NONE, REQUEST_TIMED_OUT,
                                     UNKNOWN_SERVER_ERROR, Deferred)
from ingest.topics import owner_of

COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
INVALID_GROUP_ID = 24
KEY_TYPE_GROUP = 0
# An owner that does not answer a forwarded commit or fetch within this is reported to
# the client as REQUEST_TIMED_OUT (retriable): it is restarting or stalled.
PEER_REPLY_TIMEOUT_MS = 5000
# Correlation ids of forwarded requests wrap here (the wire field is a uint32).
CORRELATION_ID_MODULUS = 1 << 31


def coordinator_of(group: str, workers: int) -> int:
    return zlib.crc32(group.encode()) % workers


def _group_ok(group: str) -> bool:
    return bool(TOPIC_NAME_RE.match(group)) and group not in (".", "..")


class PeerLinks:
    """One DEALER per other worker's ROUTER, on the worker's poller; replies by id."""

    def __init__(self, worker) -> None:
        self.w = worker
        self.socks: dict[int, zmq.Socket] = {}
        self.replies: dict[int, object] = {}
        self._ids = itertools.count(1)

    def send(self, owner: int, make) -> int:
        sock = self.socks.get(owner)
        if sock is None:
            sock = self.w.guard.connect_as_appliance(self.w.ctx.socket(zmq.DEALER))
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.w.config.local_endpoint(self.w.config.worker_router_port(owner)))
            self.w.poller.register(sock, zmq.POLLIN)
            self.socks[owner] = sock
        cid = next(self._ids) % CORRELATION_ID_MODULUS
        sock.send(make(cid).encode())
        return cid

    def on_events(self, events: dict) -> None:
        for sock in self.socks.values():
            if sock not in events:
                continue
            while True:
                try:
                    reply = wire.decode_reply(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                self.replies[reply.correlation_id] = reply

    def take(self, cid: int):
        return self.replies.pop(cid, None)

    def close(self) -> None:
        for sock in self.socks.values():
            self.w.poller.unregister(sock)
            sock.close()


class GroupOffsetsApi:
    def __init__(self, worker) -> None:
        self.w = worker
        self.peers = PeerLinks(worker)

    def _coordinates(self, group: str) -> bool:
        return coordinator_of(group, self.w.workers) == self.w.worker_id

    def find_coordinator(self, version: int, body: dict):
        node = {"throttle_time_ms": 0, "error_code": NONE, "error_message": None, "node_id": -1, "host": "",
                "port": -1}
        if body.get("key_type", KEY_TYPE_GROUP) != KEY_TYPE_GROUP:
            return node | {"error_code": COORDINATOR_NOT_AVAILABLE, "error_message": "transactions are not served"}
        owner = coordinator_of(body["key"], self.w.workers)
        return node | {"node_id": owner, "host": self.w.config.advertised_host(),
                       "port": self.w.config.kafka.worker_port(owner)}

    # ---- commit --------------------------------------------------------------------------

    def offset_commit(self, version: int, body: dict):
        group = body["group_id"]
        topics = body["topics"]
        refusal = self.refusal(group)
        if refusal is not None:
            return {"throttle_time_ms": 0, "topics": [{"name": t["name"], "partitions": [
                {"partition_index": p["partition_index"], "error_code": refusal} for p in t["partitions"]]}
                for t in topics]}
        codes: dict[tuple[str, int], int] = {}
        waiting: dict[int, list[tuple[str, int]]] = {}
        for t in topics:
            remote: dict[int, list[tuple[int, int]]] = {}
            for p in t["partitions"]:
                key = (t["name"], p["partition_index"])
                if self.w.owns(p["partition_index"]):
                    codes[key] = self._commit_here(group, *key, p["committed_offset"])
                else:
                    owner = owner_of(p["partition_index"], self.w.workers)
                    remote.setdefault(owner, []).append((p["partition_index"], p["committed_offset"]))
            for owner, offsets in remote.items():
                cid = self.peers.send(owner, lambda c, name=t["name"], o=tuple(offsets):
                                      wire.OffsetCommitRequest(group=group, topic=name, offsets=o, correlation_id=c))
                waiting[cid] = [(t["name"], p) for p, _ in offsets]

        def response():
            return {"throttle_time_ms": 0, "topics": [{"name": t["name"], "partitions": [
                {"partition_index": p["partition_index"], "error_code": codes[(t["name"], p["partition_index"])]}
                for p in t["partitions"]]} for t in topics]}
        if not waiting:
            return response()
        deadline = mono_ms() + PEER_REPLY_TIMEOUT_MS

        def replies(t_ms: int):
            for cid in list(waiting):
                reply = self.peers.take(cid)
                if reply is None and t_ms < deadline:
                    continue
                code = NONE if isinstance(reply, wire.OffsetCommitReply) else self._peer_error(reply)
                for key in waiting.pop(cid):
                    codes[key] = code
            return None if waiting else response()
        return Deferred(replies, deadline)

    def _commit_here(self, group: str, topic: str, index: int, offset: int) -> int:
        try:
            self.w.requests.partition(topic, index).groups.commit(group, offset)
        except IngestError as e:
            return FROM_INGEST.get(e.code, UNKNOWN_SERVER_ERROR)
        except ValueError:  # GroupOffsets' bound on groups per partition
            return INVALID_REQUEST
        except OSError as e:
            return KAFKA_STORAGE_ERROR if e.errno == errno.ENOSPC else UNKNOWN_SERVER_ERROR
        return NONE

    def _peer_error(self, reply) -> int:
        if reply is None:
            return REQUEST_TIMED_OUT
        if isinstance(reply, wire.ErrorReply):
            return FROM_INGEST.get(reply.error_code, UNKNOWN_SERVER_ERROR)
        return UNKNOWN_SERVER_ERROR

    def refusal(self, group: str) -> int | None:
        if not _group_ok(group):
            return INVALID_GROUP_ID
        if not self._coordinates(group):
            return NOT_COORDINATOR
        return None

    # ---- fetch ---------------------------------------------------------------------------

    def offset_fetch(self, version: int, body: dict):
        group = body["group_id"]
        topics = body["topics"]
        every = topics is None
        if every:  # v2+: null asks for every partition the group committed
            topics = [{"name": name, "partition_indexes": list(range(t["partitions"]))}
                      for name, t in sorted(self.w.topics.items())]
        refusal = self.refusal(group)
        if refusal is not None:
            return {"throttle_time_ms": 0, "topics": [], "error_code": refusal}
        found: dict[tuple[str, int], tuple[int, int]] = {}
        waiting: dict[int, tuple[str, list[int]]] = {}
        for t in topics:
            remote: dict[int, list[int]] = {}
            for p in t["partition_indexes"]:
                if self.w.owns(p):
                    found[(t["name"], p)] = self._fetch_here(group, t["name"], p)
                else:
                    remote.setdefault(owner_of(p, self.w.workers), []).append(p)
            for owner, parts in remote.items():
                cid = self.peers.send(owner, lambda c, name=t["name"], ps=tuple(parts):
                                      wire.OffsetFetchRequest(group=group, topic=name, partitions=ps, correlation_id=c))
                waiting[cid] = (t["name"], parts)

        def response():
            rows = []
            for t in topics:
                parts = [{"partition_index": p, "committed_offset": found[(t["name"], p)][0],
                          "committed_leader_epoch": -1, "metadata": "", "error_code": found[(t["name"], p)][1]}
                         for p in t["partition_indexes"]]
                if every:
                    parts = [row for row in parts if row["committed_offset"] >= 0]
                if parts or not every:
                    rows.append({"name": t["name"], "partitions": parts})
            return {"throttle_time_ms": 0, "topics": rows, "error_code": NONE}
        if not waiting:
            return response()
        deadline = mono_ms() + PEER_REPLY_TIMEOUT_MS

        def replies(t_ms: int):
            for cid in list(waiting):
                reply = self.peers.take(cid)
                if reply is None and t_ms < deadline:
                    continue
                name, parts = waiting.pop(cid)
                if isinstance(reply, wire.OffsetFetchReply):
                    got = dict(reply.offsets)
                    for p in parts:
                        found[(name, p)] = (got.get(p, -1), NONE)
                else:
                    for p in parts:
                        found[(name, p)] = (-1, self._peer_error(reply))
            return None if waiting else response()
        return Deferred(replies, deadline)

    def _fetch_here(self, group: str, topic: str, index: int) -> tuple[int, int]:
        try:
            committed = self.w.requests.partition(topic, index).groups.get(group)
        except IngestError as e:
            return -1, FROM_INGEST.get(e.code, UNKNOWN_SERVER_ERROR)
        return (-1 if committed is None else committed), NONE
