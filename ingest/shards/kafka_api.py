"""The Kafka APIs a worker serves, mapped onto its partitions (sockets: kafka_listener.py).

Each worker is one Kafka broker: node id = worker id, leader of the partitions it owns
(p % workers == id). A request for a partition another worker owns gets
NOT_LEADER_OR_FOLLOWER, so a client refreshes Metadata and goes to the owner.

A handler returns the response body (a dict for the codec), NO_RESPONSE (Produce with
acks=0), or a Deferred that the listener polls on every loop turn until it yields the
body (acks=-1 waiting for the group commit; a Fetch long poll).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from ingest.clock import mono_ms, now_ms
from ingest.errors import CorruptDataError, OffsetOutOfRangeError
from ingest.net.errors import ErrorCode, IngestError
from ingest.net.kafka.schema import ApiKey
from ingest.replication.leader import READY
from ingest.shards import layout
from ingest.shards.requests import _below
from ingest.topics import owner_of

log = logging.getLogger("ingest.kafka")

# The APIs and versions served, advertised exactly by ApiVersions. Produce starts at v3
# and Fetch at v4: the first versions that carry RecordBatch v2 (our storage format) and
# the last stable offset. All are non-flexible versions (see schema.py).
SERVED = {
    ApiKey.PRODUCE: (3, 8),
    ApiKey.FETCH: (4, 11),
    ApiKey.LIST_OFFSETS: (1, 5),
    ApiKey.METADATA: (0, 8),
    ApiKey.API_VERSIONS: (0, 2),
    ApiKey.INIT_PRODUCER_ID: (0, 1),
    ApiKey.FIND_COORDINATOR: (0, 2),  # handlers: kafka_groups.py
    ApiKey.OFFSET_COMMIT: (2, 7),
    ApiKey.OFFSET_FETCH: (1, 5),
    ApiKey.JOIN_GROUP: (0, 5),  # handlers: kafka_membership.py
    ApiKey.SYNC_GROUP: (0, 3),
    ApiKey.HEARTBEAT: (0, 3),
    ApiKey.LEAVE_GROUP: (0, 3),
}
CLUSTER_ID = "ingest"
# Kafka's error codes (org.apache.kafka.common.protocol.Errors) used here.
NONE = 0
OFFSET_OUT_OF_RANGE = 1
CORRUPT_MESSAGE = 2
UNKNOWN_TOPIC_OR_PARTITION = 3
LEADER_NOT_AVAILABLE = 5
NOT_LEADER_OR_FOLLOWER = 6
REQUEST_TIMED_OUT = 7
MESSAGE_TOO_LARGE = 10
INVALID_REQUIRED_ACKS = 21
UNSUPPORTED_VERSION = 35
INVALID_REQUEST = 42
OUT_OF_ORDER_SEQUENCE_NUMBER = 45
INVALID_PRODUCER_EPOCH = 47
KAFKA_STORAGE_ERROR = 56
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
UNKNOWN_SERVER_ERROR = -1
# Our refusals, as the Kafka error a Kafka client handles the same way (retriable or not).
FROM_INGEST = {
    ErrorCode.CORRUPT_MESSAGE: CORRUPT_MESSAGE,
    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION: UNKNOWN_TOPIC_OR_PARTITION,
    ErrorCode.NOT_OWNER: NOT_LEADER_OR_FOLLOWER,
    ErrorCode.MESSAGE_TOO_LARGE: MESSAGE_TOO_LARGE,
    ErrorCode.THROTTLED: REQUEST_TIMED_OUT,
    ErrorCode.DISK_FULL: KAFKA_STORAGE_ERROR,
    ErrorCode.OFFSET_OUT_OF_RANGE: OFFSET_OUT_OF_RANGE,
    ErrorCode.OUT_OF_ORDER_SEQUENCE: OUT_OF_ORDER_SEQUENCE_NUMBER,
    ErrorCode.INVALID_PRODUCER_EPOCH: INVALID_PRODUCER_EPOCH,
    ErrorCode.STORAGE_ERROR: KAFKA_STORAGE_ERROR,
    ErrorCode.SHUTTING_DOWN: NOT_LEADER_OR_FOLLOWER,
    ErrorCode.NOT_LEADER: NOT_LEADER_OR_FOLLOWER,  # a follower replica appliance
    ErrorCode.NOT_ENOUGH_REPLICAS: 19,
}
# Kafka's acks and the level our group commit reaches for each (a lone appliance's
# in-sync replica set is itself, so acks=-1 is fsync, as the issue and README say).
ACKS_NONE, ACKS_LEADER, ACKS_ALL = 0, 1, -1
EARLIEST_TIMESTAMP, LATEST_TIMESTAMP = -2, -1
# A Fetch long poll never waits longer than this, whatever max_wait_ms says.
FETCH_WAIT_MS_MAX = 30_000
FETCH_BYTES_MAX = 8 << 20
# Producer ids: time-based so they do not repeat across restarts, and spaced by this
# (WORKERS_MAX) so that two workers never hand out the same id.
PRODUCER_ID_STRIDE = 256

_BATCH_LENGTH = struct.Struct(">i")


class NoResponse:
    """Produce with acks=0: Kafka sends nothing back."""


NO_RESPONSE = NoResponse()


@dataclass(slots=True)
class Deferred:
    """A response not ready yet: `poll(t_ms)` returns the body once it is."""

    poll: Callable[[int], dict | None]
    deadline_ms: int | None = None  # when poll() will answer anyway (Fetch's max_wait_ms)


def _check_framing(batch: bytes) -> None:
    """One whole RecordBatch v2 (the log checks CRC and records; this checks the frame)."""
    if len(batch) < layout.RECORD_BATCH_OVERHEAD or batch[layout.MAGIC_OFFSET] != layout.MAGIC_V2:
        raise IngestError(ErrorCode.CORRUPT_MESSAGE, "records are not one RecordBatch v2")
    if _BATCH_LENGTH.unpack_from(batch, layout.LENGTH_OFFSET)[0] + layout.LOG_OVERHEAD != len(batch):
        raise IngestError(ErrorCode.CORRUPT_MESSAGE, "records must be exactly one RecordBatch")


class KafkaApi:
    def __init__(self, worker) -> None:
        self.w = worker
        self.kafka = worker.config.kafka
        self._last_producer_id = 0
        self.handlers = {
            ApiKey.API_VERSIONS: self.api_versions,
            ApiKey.METADATA: self.metadata,
            ApiKey.PRODUCE: self.produce,
            ApiKey.FETCH: self.fetch,
            ApiKey.LIST_OFFSETS: self.list_offsets,
            ApiKey.INIT_PRODUCER_ID: self.init_producer_id,
        }

    def served(self, api_key: int, version: int) -> bool:
        span = SERVED.get(api_key)
        return span is not None and span[0] <= version <= span[1]

    def api_versions_body(self, error_code: int = NONE) -> dict:
        keys = [{"api_key": int(k), "min_version": lo, "max_version": hi} for k, (lo, hi) in sorted(SERVED.items())]
        return {"error_code": error_code, "api_keys": keys, "throttle_time_ms": 0}

    def api_versions(self, version: int, body: dict):
        return self.api_versions_body()

    # ---- metadata ----------------------------------------------------------------------

    def metadata(self, version: int, body: dict):
        topics = self.w.topics
        wanted = body["topics"]
        if wanted is None or (version == 0 and not wanted):
            names = sorted(topics)
        else:
            names = [t["name"] for t in wanted]
        may_create = self.w.config.server.auto_create_topics and body.get("allow_auto_topic_creation", True)
        host = self.w.config.advertised_host()
        brokers = [{"node_id": i, "host": host, "port": self.kafka.worker_port(i), "rack": None}
                   for i in range(self.w.workers)]
        rows = []
        for name in names:
            t = topics.get(name)
            if t is None:
                if may_create:
                    self.w.request_topic(name)  # the supervisor creates it; the client asks again
                rows.append({"error_code": LEADER_NOT_AVAILABLE if may_create else UNKNOWN_TOPIC_OR_PARTITION,
                             "name": name, "partitions": [], "topic_authorized_operations": -2147483648})
                continue
            parts = []
            for p in range(t["partitions"]):
                leader = owner_of(p, self.w.workers)
                # leader_epoch -1 (unknown): no epoch fencing, so clients never ask for
                # OffsetForLeaderEpoch, which is not served.
                parts.append({"error_code": NONE, "partition_index": p, "leader_id": leader, "leader_epoch": -1,
                              "replica_nodes": [leader], "isr_nodes": [leader], "offline_replicas": []})
            rows.append({"error_code": NONE, "name": name, "is_internal": False, "partitions": parts,
                         "topic_authorized_operations": -2147483648})
        return {"throttle_time_ms": 0, "brokers": brokers, "cluster_id": CLUSTER_ID, "controller_id": 0,
                "topics": rows, "cluster_authorized_operations": -2147483648}

    # ---- produce -----------------------------------------------------------------------

    def produce(self, version: int, body: dict):
        acks = body["acks"]
        if body.get("transactional_id") is not None:
            return self._produce_refused(body, TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
        if acks not in (ACKS_NONE, ACKS_LEADER, ACKS_ALL):
            return self._produce_refused(body, INVALID_REQUIRED_ACKS)
        responses, waits = [], []
        t = now_ms()
        for topic in body["topics"]:
            rows = []
            for p in topic["partitions"]:
                row, wait = self._produce_partition(topic["name"], p["index"], p["records"], t, acks)
                rows.append(row)
                if wait is not None:
                    waits.append(wait)
            responses.append({"name": topic["name"], "partitions": rows})
        self.w.probe.count("kafka_produce_requests_total", acks=str(acks))
        reply = {"responses": responses, "throttle_time_ms": 0}
        if acks == ACKS_NONE:
            return NO_RESPONSE
        if acks == ACKS_LEADER or self._durable(waits, reply):
            return reply
        return Deferred(lambda _t_ms: reply if self._durable(waits, reply) else None)

    def _durable(self, waits, reply) -> bool:
        """acks=-1: fsynced here and, with [replication], held by every in-sync replica (a
        partition whose in-sync set shrank is answered with its error)."""
        done = True
        for part, last in waits:
            if part.log.flushed_offset <= last:
                return False
            try:
                done = done and self.w.replication.ack_status(part, last) == READY
            except IngestError as e:
                for row in (r for t in reply["responses"] for r in t["partitions"] if r["index"] == part.index):
                    row |= {"error_code": FROM_INGEST.get(e.code, UNKNOWN_SERVER_ERROR), "error_message": e.message}
        return done

    def _produce_partition(self, topic: str, index: int, records, t_ms: int, acks: int):
        row = {"index": index, "error_code": NONE, "base_offset": -1, "log_append_time_ms": -1,
               "log_start_offset": -1, "record_errors": [], "error_message": None}
        try:
            if records is None:
                raise IngestError(ErrorCode.CORRUPT_MESSAGE, "records are null")
            _check_framing(records)
            self.w.replication.check_leader(index)
            if acks == ACKS_ALL:
                self.w.replication.check_acks_all(self.w.requests.partition(topic, index))
            part, _header, base, last, duplicate = self.w.requests.accept_batch(topic, index, records, t_ms)
        except IngestError as e:
            if e.code == ErrorCode.CORRUPT_MESSAGE:
                self.w.probe.invalid("kafka_corrupt_batch")
            row |= {"error_code": FROM_INGEST.get(e.code, UNKNOWN_SERVER_ERROR), "error_message": e.message}
            return row, None
        if duplicate:
            self.w.probe.count("duplicate_batches_total")
        row |= {"base_offset": base, "log_start_offset": part.log.log_start_offset}
        return row, (part, last)

    def _produce_refused(self, body: dict, code: int):
        return {"responses": [{"name": t["name"], "partitions": [
            {"index": p["index"], "error_code": code, "base_offset": -1, "log_append_time_ms": -1,
             "log_start_offset": -1} for p in t["partitions"]]} for t in body["topics"]], "throttle_time_ms": 0}

    # ---- fetch -------------------------------------------------------------------------

    def fetch(self, version: int, body: dict):
        wait_ms = min(max(body["max_wait_ms"], 0), FETCH_WAIT_MS_MAX)
        reply, found_bytes = self._fetch_once(body)
        if found_bytes >= max(body["min_bytes"], 1) or wait_ms == 0:
            return reply
        wanted = [(self._owned(t["topic"], p["partition"]), p["fetch_offset"])
                  for t in body["topics"] for p in t["partitions"]]
        wanted = [(part, offset) for part, offset in wanted if part is not None]
        deadline = mono_ms() + wait_ms

        def arrived(t_ms: int):
            if t_ms >= deadline or self.w.stopping or any(
                    self.w.replication.high_watermark(part) > offset for part, offset in wanted):
                return self._fetch_once(body)[0]
            return None
        return Deferred(arrived, deadline)

    def _owned(self, topic: str, index: int):
        try:
            return self.w.requests.partition(topic, index)
        except IngestError:
            return None

    def _fetch_once(self, body: dict) -> tuple[dict, int]:
        budget = max(body.get("max_bytes", FETCH_BYTES_MAX), 1)
        total = 0
        responses = []
        for t in body["topics"]:
            rows = []
            for p in t["partitions"]:
                max_bytes = min(p["partition_max_bytes"], budget - total, FETCH_BYTES_MAX)
                row = self._fetch_partition(t["topic"], p["partition"], p["fetch_offset"], max_bytes, total == 0)
                total += len(row["records"] or b"")
                rows.append(row)
            responses.append({"topic": t["topic"], "partitions": rows})
        self.w.probe.count("fetch_requests_total")
        return {"throttle_time_ms": 0, "error_code": NONE, "session_id": 0, "responses": responses}, total

    def _fetch_partition(self, topic: str, index: int, offset: int, max_bytes: int, first: bool) -> dict:
        row = {"partition_index": index, "error_code": NONE, "high_watermark": -1, "last_stable_offset": -1,
               "log_start_offset": -1, "aborted_transactions": None, "preferred_read_replica": -1,
               "records": b""}
        try:
            part = self.w.requests.partition(topic, index)
            self.w.replication.check_leader(index)
            lg = part.log
            # Past the budget a later partition gets nothing this time (but the first one
            # always gets its first batch, however large, so that a consumer progresses).
            data = lg.read(offset, max(max_bytes, 1)) if (max_bytes > 0 or first) else b""
        except IngestError as e:
            return row | {"error_code": FROM_INGEST.get(e.code, UNKNOWN_SERVER_ERROR)}
        except OffsetOutOfRangeError:
            return row | {"error_code": OFFSET_OUT_OF_RANGE, "high_watermark": lg.log_end_offset,
                          "last_stable_offset": lg.log_end_offset, "log_start_offset": lg.log_start_offset}
        except (CorruptDataError, OSError) as e:
            log.error("kafka fetch of %s-%d at %d: %s", topic, index, offset, e)
            return row | {"error_code": KAFKA_STORAGE_ERROR}
        high_watermark = self.w.replication.high_watermark(part)  # the log end without [replication]
        if high_watermark < lg.log_end_offset:
            data = _below(data, high_watermark)
        return row | {"high_watermark": high_watermark, "last_stable_offset": high_watermark,
                      "log_start_offset": lg.log_start_offset, "records": data}

    # ---- offsets and producer ids ------------------------------------------------------

    def list_offsets(self, version: int, body: dict):
        topics = []
        for t in body["topics"]:
            rows = []
            for p in t["partitions"]:
                rows.append(self._list_offset(t["name"], p["partition_index"], p["timestamp"]))
            topics.append({"name": t["name"], "partitions": rows})
        return {"throttle_time_ms": 0, "topics": topics}

    def _list_offset(self, topic: str, index: int, timestamp_ms: int) -> dict:
        row = {"partition_index": index, "error_code": NONE, "timestamp": -1, "offset": -1, "leader_epoch": -1}
        try:
            part = self.w.requests.partition(topic, index)
            lg = part.log
            if timestamp_ms == EARLIEST_TIMESTAMP:
                return row | {"offset": lg.log_start_offset}
            if timestamp_ms == LATEST_TIMESTAMP:  # what a consumer may read: the high watermark
                return row | {"offset": self.w.replication.high_watermark(part)}
            found = lg.offset_for_timestamp(timestamp_ms)
        except IngestError as e:
            return row | {"error_code": FROM_INGEST.get(e.code, UNKNOWN_SERVER_ERROR)}
        except OSError as e:
            log.error("kafka list offsets of %s-%d: %s", topic, index, e)
            return row | {"error_code": KAFKA_STORAGE_ERROR}
        return row if found is None else row | {"offset": found, "timestamp": timestamp_ms}

    def init_producer_id(self, version: int, body: dict):
        if body["transactional_id"] is not None:
            return {"throttle_time_ms": 0, "error_code": TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                    "producer_id": -1, "producer_epoch": -1}
        pid = max(self._last_producer_id + PRODUCER_ID_STRIDE, now_ms() * PRODUCER_ID_STRIDE + self.w.worker_id)
        self._last_producer_id = pid
        return {"throttle_time_ms": 0, "error_code": NONE, "producer_id": pid, "producer_epoch": 0}
