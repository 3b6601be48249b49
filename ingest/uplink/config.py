"""`[[uplink]]` configuration: where to forward which topics, and librdkafka's settings.

    [[uplink]]
    name = "datacentre"            # progress is the consumer group "uplink.datacentre"
    bootstrap_servers = "kafka-1:9092,kafka-2:9092"
    partitioning = "same"          # local partition p -> remote partition p (per-key order kept)
                                   # "key": Kafka's murmur2 of the key picks the remote partition
    commit_interval_ms = 1000      # how often delivered progress is committed (bounds resends)
    readback_records_max = 10000   # tail of each remote partition read at start (0: none)
    disk_free_bytes_min = 1073741824   # retention keeps unshipped data while this much is free

    [uplink.kafka]                 # passed to librdkafka as is: security, batching, compression
    "compression.type" = "lz4"
    "linger.ms" = 20
    "security.protocol" = "SASL_SSL"

    [[uplink.topic]]
    name = "telemetry"
    remote = "plant7.telemetry"    # default: the local name
    enabled = true
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

UPLINK_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
PARTITIONING = ("same", "key")
# librdkafka settings the uplink's guarantees rest on: set by the uplink, refused in [uplink.kafka].
MANAGED_KAFKA_KEYS = {
    "bootstrap.servers": "use bootstrap_servers",
    "enable.idempotence": "the uplink always produces idempotently",
    "acks": "the uplink always produces with acks=all",
    "request.required.acks": "the uplink always produces with acks=all",
    "transactional.id": "the uplink does not use transactions",
    "partitioner": "use partitioning",
}


class UplinkConfigError(ValueError):
    """An [[uplink]] table is invalid; the message says which key and what is allowed."""


@dataclass(frozen=True, slots=True)
class UplinkTopic:
    name: str
    remote: str = ""  # "" = same name as the local topic
    enabled: bool = True

    @property
    def remote_name(self) -> str:
        return self.remote or self.name


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    name: str
    bootstrap_servers: str
    topics: tuple[UplinkTopic, ...] = ()
    partitioning: str = "same"
    enabled: bool = True
    # Delivered progress is committed (one small fsynced file per partition) this often; a
    # crash resends at most what was delivered since the last commit.
    commit_interval_ms: int = 1000
    # Bytes read from one local partition per step: one read, one decode, then produce().
    read_bytes_max: int = 1 << 20
    # Records handed to librdkafka and not yet reported delivered, per worker: bounds the
    # memory held while the remote cluster is slow (librdkafka's own default queue is 100,000).
    inflight_records_max: int = 100_000
    # Retention keeps records not yet shipped while the data disk has at least this much
    # free; below it retention deletes as configured and the uplink counts what it lost.
    disk_free_bytes_min: int = 1 << 30
    # After a failed delivery, a partition waits this long before it resends.
    retry_backoff_ms: int = 1000
    # At start and after a new producer took over, the uplink reads back at most this many
    # records from the end of each remote partition to find what the cluster already holds
    # (readback.py; partitioning "same" only). 0: no read-back, resume at the committed offset.
    readback_records_max: int = 10_000
    kafka: dict | None = None

    def __post_init__(self) -> None:
        checks = [
            (UPLINK_NAME_RE.match(self.name), "name", "1-64 characters of [a-zA-Z0-9_-]"),
            (isinstance(self.bootstrap_servers, str) and self.bootstrap_servers.strip(), "bootstrap_servers",
             "host:port[,host:port...]"),
            (self.partitioning in PARTITIONING, "partitioning", " or ".join(map(repr, PARTITIONING))),
            (self.commit_interval_ms >= 10, "commit_interval_ms", ">= 10"),
            (self.read_bytes_max >= 1024, "read_bytes_max", ">= 1024"),
            (self.inflight_records_max >= 1, "inflight_records_max", ">= 1"),
            (self.disk_free_bytes_min >= 0, "disk_free_bytes_min", ">= 0"),
            (self.retry_backoff_ms >= 0, "retry_backoff_ms", ">= 0"),
            (self.readback_records_max >= 0, "readback_records_max", ">= 0"),
        ]
        for ok, key, allowed in checks:
            if not ok:
                raise UplinkConfigError(f"[[uplink]] {self.name!r}: {key} must be {allowed}")
        for key in self.kafka or {}:
            if key in MANAGED_KAFKA_KEYS:
                raise UplinkConfigError(f"[[uplink]] {self.name!r}: [uplink.kafka] {key!r} is not allowed: "
                                        f"{MANAGED_KAFKA_KEYS[key]}")
        names = [t.name for t in self.topics]
        if len(set(names)) != len(names):
            raise UplinkConfigError(f"[[uplink]] {self.name!r}: a topic is listed twice")

    @property
    def group(self) -> str:
        """The consumer group whose committed offsets are this uplink's progress."""
        return f"uplink.{self.name}"

    def remote_topic(self, local: str) -> str | None:
        """The remote name of an enabled local topic, None if this uplink does not ship it."""
        if not self.enabled:
            return None
        for t in self.topics:
            if t.name == local:
                return t.remote_name if t.enabled else None
        return None

    def producer_settings(self) -> dict:
        """librdkafka settings: the user's [uplink.kafka], then what the guarantees need."""
        settings = {"linger.ms": 20, "compression.type": "lz4",
                    "queue.buffering.max.messages": max(100_000, self.inflight_records_max)}
        settings |= dict(self.kafka or {})
        settings |= {"bootstrap.servers": self.bootstrap_servers, "enable.idempotence": True, "acks": "all",
                     # Kafka's Java partitioner (murmur2), so "key" agrees with Kafka's own clients.
                     "partitioner": "murmur2_random"}
        return settings


def parse(tables: list[dict]) -> tuple[UplinkConfig, ...]:
    """[[uplink]] tables (from TOML, or Config.to_dict's form) as UplinkConfig objects."""
    uplinks = []
    for table in tables:
        table = dict(table)
        topics = table.pop("topic", table.pop("topics", []))
        try:
            topic_objs = tuple(UplinkTopic(**dict(t)) for t in topics)
            uplinks.append(UplinkConfig(topics=topic_objs, **table))
        except TypeError as e:
            raise UplinkConfigError(f"[[uplink]] {table.get('name', '?')!r}: {e}") from None
    names = [u.name for u in uplinks]
    if len(set(names)) != len(names):
        raise UplinkConfigError("two [[uplink]] tables have the same name")
    if uplinks and importlib.util.find_spec("confluent_kafka") is None:
        raise UplinkConfigError("[[uplink]] needs confluent-kafka: pip install 'ingest[uplink]'")
    return tuple(uplinks)
