"""Where the remote cluster stands: which local offsets it already holds, per partition.

Every record the uplink ships carries the header `ingest.offset` = `<source>/<offset>`, where
`<source>` = `<appliance id>/<local topic>/<local partition>` names one local log of one
appliance. After a restart (and after a new producer took over) the uplink reads the tail of
each remote partition it ships to and collects the local offsets of its own records found
there; the partition resumes at the first offset from its committed one on that the cluster
does not hold (PartitionProgress.resume_after). So a record the cluster acknowledged but
whose progress was never committed is not sent twice, and a record the cluster lacks is never
skipped, even where a failed delivery left a gap that later records jumped.

Only `partitioning = "same"` is read back: there one remote partition holds one local
partition's records. The scan reads at least the last `readback_records_max` records of each
remote partition (on to the end-of-partition event); if what was delivered since the last
commit reaches further back than that (a large backlog in flight, or other producers'
records interleaved), the offsets found do not join up with the committed one and the
partition resumes at its committed offset, at-least-once as before.

`header_value`/`parse_header` are pure; `TailReader` runs in the uplink's read-back thread
(it blocks on the network) and touches nothing of the worker's.
"""

from __future__ import annotations

import time

HEADER = "ingest.offset"
# librdkafka settings that a consumer needs as much as the producer: how to reach and
# authenticate to the cluster. Producer-only settings (linger.ms, compression) are left out.
SHARED_KAFKA_PREFIXES = ("security.", "sasl.", "ssl.", "ssl_", "socket.", "reconnect.", "broker.",
                         "client.dns", "connections.", "metadata.", "api.version", "enable.ssl")
# A fetch that finds no new records answers after this long (the broker's long-poll bound): the
# scan reaches each partition's end in a few round trips instead of waiting 500 ms per fetch.
FETCH_WAIT_MS = 20


def source_of(appliance_id: str, topic: str, partition: int) -> bytes:
    return f"{appliance_id}/{topic}/{partition}".encode()


def header_value(source: bytes, offset: int) -> bytes:
    return b"%s/%d" % (source, offset)


def parse_header(value: bytes) -> tuple[bytes, int] | None:
    """(source, offset) of an `ingest.offset` header, None if it is not one of ours."""
    source, sep, offset = value.rpartition(b"/")
    if not sep or not offset.isdigit():
        return None
    return source, int(offset)


def offset_of(headers, source: bytes) -> int | None:
    """The local offset in a record's headers if the record came from `source`."""
    for key, value in headers or ():
        if key == HEADER and value is not None:
            parsed = parse_header(value)
            if parsed is not None and parsed[0] == source:
                return parsed[1]
    return None


class ReadbackError(Exception):
    """The tail could not be read; `reason` is a librdkafka error name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def consumer_settings(producer_settings: dict, group: str) -> dict:
    settings = {k: v for k, v in producer_settings.items() if k.startswith(SHARED_KAFKA_PREFIXES)}
    settings |= {"bootstrap.servers": producer_settings["bootstrap.servers"],
                 # assign() without commits: the group id is required by the client, never joined.
                 "group.id": group, "enable.auto.commit": False, "enable.partition.eof": True,
                 "fetch.wait.max.ms": FETCH_WAIT_MS}
    return settings


class TailReader:
    """Reads the last records of remote partitions (blocking; run it off the worker's loop)."""

    def __init__(self, settings: dict, window_records: int, timeout_s: float) -> None:
        assert window_records > 0 and timeout_s > 0
        self.settings = settings
        self.window_records = window_records
        self.timeout_s = timeout_s

    def find(self, wanted: dict[tuple[str, int], bytes]) -> dict[tuple[str, int], set[int]]:
        """For each (remote topic, remote partition) -> source: the offsets of that source
        among (at least) the partition's last `window_records` records.
        Raises ReadbackError when the cluster does not answer within timeout_s."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition
        deadline = time.monotonic() + self.timeout_s
        found: dict[tuple[str, int], set[int]] = {key: set() for key in wanted}
        consumer = Consumer(self.settings)
        try:
            starts = []
            for topic, partition in wanted:
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                               timeout=max(0.1, deadline - time.monotonic()))
                except KafkaException as e:
                    raise ReadbackError(e.args[0].name(), f"{topic}-{partition}: {e.args[0].str()}") from None
                if high <= low:
                    continue  # empty: nothing of ours there
                # Some brokers report the last batch's base offset + 1 as the end; reading on to
                # the end-of-partition event below covers the whole tail either way.
                starts.append(TopicPartition(topic, partition, max(low, high - self.window_records)))
            self._scan(consumer, starts, wanted, found, deadline)
        finally:
            consumer.close()
        return found

    def _scan(self, consumer, starts, wanted, found, deadline) -> None:
        open_partitions = {(tp.topic, tp.partition) for tp in starts}
        if not open_partitions:
            return
        consumer.assign(starts)
        while open_partitions:
            if time.monotonic() >= deadline:
                raise ReadbackError("_TIMED_OUT", f"reading back {sorted(open_partitions)} timed out")
            for message in consumer.consume(10_000, 0.1):
                key = (message.topic(), message.partition())
                error = message.error()
                if error is not None:
                    if error.code() == error._PARTITION_EOF:
                        open_partitions.discard(key)
                        continue
                    raise ReadbackError(error.name(), f"{key[0]}-{key[1]}: {error.str()}")
                offset = offset_of(message.headers(), wanted[key])
                if offset is not None:
                    found[key].add(offset)
