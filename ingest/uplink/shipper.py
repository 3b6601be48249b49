"""One uplink in one worker: reads the worker's partitions by offset, produces to Kafka.

Runs on the worker's loop (`pump()` once per turn), so it reads the logs the worker owns
without locks; librdkafka's own threads do the network I/O. Delivery reports arrive in
`producer.poll(0)` on the same loop and advance `PartitionProgress`; delivered progress is
committed as the consumer group `uplink.<name>` of each partition every
`commit_interval_ms`.

Guarantee (docs/UPLINK.md): at-least-once. The idempotent producer (acks=all) keeps
retries inside one producer session free of duplicates; a rewind after a failed delivery
and a restart after a crash resend what lies after the committed offset, so those records
may arrive twice (the rewind's are counted in `uplink_records_resent_total`).
"""

from __future__ import annotations

import logging
import threading
import time

from ingest.clock import mono_ms
from ingest.clock import now_ms as wall_ms
from ingest.errors import CorruptDataError, OffsetOutOfRangeError
from ingest.net.consumer import decode_chunk
from ingest.shards import batch as batch_codec
from ingest.uplink.config import UplinkConfig
from ingest.uplink.errors import PRODUCER_STATE_ERRORS, REASONS, reason_of
from ingest.uplink.progress import PartitionProgress
from ingest.uplink.readback import HEADER, ReadbackError, TailReader, consumer_settings, header_value, source_of

log = logging.getLogger("ingest.uplink")
# librdkafka's own log lines (connection failures and the like), through Python's logging.
librdkafka_log = logging.getLogger("ingest.uplink.librdkafka")

# Records handed to the producer in one loop turn, over every partition: bounds how long the
# uplink holds the loop (about 2 us per record) so intake and acks are not delayed by more
# than a few milliseconds.
RECORDS_PER_TURN = 4096
# While records are in flight the loop wakes at least this often to serve delivery reports
# (librdkafka's reports wait in its queue until poll(); 5 ms adds little to acks=all latency).
UPLINK_POLL_MS = 5
# A recurring producer error (broker unreachable) is logged at most this often per reason.
ERROR_LOG_INTERVAL_MS = 60_000
# A read-back of the cluster's tail gives up after this long (and is tried again after
# retry_backoff_ms): a cluster that cannot be reached holds up nothing but the shipping.
READBACK_TIMEOUT_S = 10.0
# Read-back errors that retrying will not cure: the uplink's principal may not read the topic.
READ_DENIED = frozenset(("TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"))


class Uplink:
    def __init__(self, config: UplinkConfig, worker_id: int, probe, appliance_id: str = "") -> None:
        self.config = config
        self.appliance_id = appliance_id
        self.reads_back = config.partitioning == "same" and config.readback_records_max > 0
        self._readback: _Readback | None = None  # the read-back running in its thread
        self._readback_at_ms = 0
        self.worker_id = worker_id
        self.probe = probe
        self.parts: dict[tuple[str, int], tuple[object, PartitionProgress]] = {}
        self.producer = None  # made at the first partition this worker ships
        self.rebuild_producer = False
        self.last_success_ms = 0  # wall clock of the last delivery report without error
        self.next_commit_ms = 0
        self._error_logged_ms: dict[str, int] = {}
        self._rotate = 0

    # ---- partitions --------------------------------------------------------------------

    def attach(self, part) -> None:
        """Ship this partition if the uplink maps its topic; resume at the committed offset."""
        remote = self.config.remote_topic(part.topic)
        if remote is None or (part.topic, part.index) in self.parts:
            return
        committed = part.groups.get(self.config.group)
        start = part.log.log_start_offset if committed is None else min(committed, part.log.log_end_offset)
        progress = PartitionProgress(part.topic, part.index, remote, start)
        progress.source = source_of(self.appliance_id, part.topic, part.index)
        progress.resync_pending = self.reads_back
        self.parts[(part.topic, part.index)] = (part, progress)
        labels = {"uplink": self.config.name, "topic": part.topic}
        for name in ("records_sent_total", "records_delivered_total", "records_resent_total",
                     "records_dropped_total", "records_already_delivered_total"):
            self.probe.count("uplink_" + name, 0, **labels)  # present at 0: alerts see "none", not "no data"
        for reason in REASONS:
            self.probe.count("uplink_errors_total", 0, uplink=self.config.name, reason=reason)
        if self.producer is None:
            self.producer = self._new_producer()
        log.info("uplink %s: %s-%d -> %s from offset %d", self.config.name, part.topic, part.index, remote, start)

    def _new_producer(self):
        from confluent_kafka import Producer  # optional dependency: only a configured uplink needs it
        settings = self.config.producer_settings()
        settings["error_cb"] = self._on_error
        settings["logger"] = librdkafka_log
        settings["client.id"] = f"ingest-uplink-{self.config.name}-{self.worker_id}"
        return Producer(settings)

    def _on_error(self, error) -> None:
        """librdkafka's client-level errors (broker down, authentication): counted, logged
        now and then; the producer retries by itself. A fatal one replaces the producer."""
        self._count_error(error.name())
        if error.fatal():
            self.rebuild_producer = True

    def on_internal_error(self) -> None:
        """A bug in the uplink: counted and logged (with its traceback, now and then); what
        was in flight is resent, so nothing is lost, and intake goes on."""
        self._count_error("internal", exc_info=True)
        for _, progress in self.parts.values():
            progress.resent_records += progress.sent - progress.delivered
            progress.abandon()
            progress.retry_at_ms = mono_ms() + self.config.retry_backoff_ms

    def _count_error(self, name: str, exc_info: bool = False) -> None:
        """One error, by librdkafka's name (or "internal"): counted by reason, logged by name."""
        self.probe.count("uplink_errors_total", 1, uplink=self.config.name, reason=reason_of(name))
        self._log_now_and_then(name, "uplink %s: %s (the uplink retries; local retention keeps what is not "
                               "shipped)", self.config.name, name, exc_info=exc_info)

    def _log_now_and_then(self, key: str, message: str, *args, exc_info: bool = False) -> None:
        """A warning at most every ERROR_LOG_INTERVAL_MS per key: an outage of hours must
        not fill the journal."""
        now = wall_ms()
        if now - self._error_logged_ms.get(key, -ERROR_LOG_INTERVAL_MS) >= ERROR_LOG_INTERVAL_MS:
            self._error_logged_ms[key] = now
            log.warning(message, *args, exc_info=exc_info)

    # ---- the loop's work ---------------------------------------------------------------

    def pump(self, now_ms: int) -> None:
        """Serve delivery reports, hand new durable records to the producer, commit."""
        if self.producer is None:
            return
        self.producer.poll(0)
        for part, progress in self.parts.values():
            self._settle(part, progress, now_ms)
        self._serve_readback(now_ms)
        if self.rebuild_producer:
            self._replace_producer(now_ms)
        budget = RECORDS_PER_TURN
        in_flight = sum(p.in_flight for _, p in self.parts.values())
        items = list(self.parts.values())
        self._rotate = (self._rotate + 1) % max(1, len(items))
        for part, progress in items[self._rotate:] + items[:self._rotate]:
            room = min(budget, self.config.inflight_records_max - in_flight)
            if room <= 0:
                break
            if progress.ready(now_ms) and progress.sent < part.log.flushed_offset:
                sent = self._ship(part, progress, room, now_ms)
                budget -= sent
                in_flight += sent
        if now_ms >= self.next_commit_ms:
            self.commit()
            self.next_commit_ms = now_ms + self.config.commit_interval_ms

    def _settle(self, part, progress: PartitionProgress, now_ms: int) -> None:
        """Collect what delivery reports changed: errors, rewinds, successes, drops."""
        for error in progress.errors:
            self._count_error(error.name())
            if error.fatal() or error.name() in PRODUCER_STATE_ERRORS:
                self.rebuild_producer = True
        progress.errors.clear()
        if progress.rewind_if_settled(now_ms, self.config.retry_backoff_ms):
            self._log_now_and_then(f"rewind {part.topic}-{part.index}",
                                   "uplink %s: delivery of %s-%d failed; resending from offset %d",
                                   self.config.name, part.topic, part.index, progress.sent)
        if progress.last_success:
            progress.last_success = False
            self.last_success_ms = wall_ms()
        dropped = progress.skip_to(part.log.log_start_offset)
        if dropped:
            log.error("uplink %s: retention deleted %d records of %s-%d that were not shipped "
                      "(the disk was short of space); shipping goes on from offset %d",
                      self.config.name, dropped, part.topic, part.index, progress.sent)
        self._flush_counts(progress)

    def _flush_counts(self, progress: PartitionProgress) -> None:
        labels = {"uplink": self.config.name, "topic": progress.topic}
        for attribute, name in (("delivered_records", "uplink_records_delivered_total"),
                                ("resent_records", "uplink_records_resent_total"),
                                ("dropped_records", "uplink_records_dropped_total"),
                                ("already_delivered_records", "uplink_records_already_delivered_total")):
            value = getattr(progress, attribute)
            if value:
                self.probe.count(name, value, **labels)
                setattr(progress, attribute, 0)

    def _ship(self, part, progress: PartitionProgress, room: int, now_ms: int) -> int:
        """Produce up to `room` durable records from progress.sent on; returns how many."""
        try:
            raw = part.log.read(progress.sent, self.config.read_bytes_max)
        except CorruptDataError as e:
            # Never served, so never shipped: counted as dropped, like data retention deleted.
            log.error("uplink %s: %s", self.config.name, e)
            progress.dropped_records += e.next_good_offset - progress.sent
            progress.close_chunk(progress.open_chunk(), e.next_good_offset, 0)
            return 0
        except OffsetOutOfRangeError:
            return 0  # retention moved the start; the next turn's skip_to counts it
        chunk = decode_chunk(part.topic, part.index, part.log.flushed_offset, raw, progress.sent)
        offsets = chunk.offsets.tolist()
        flushed = part.log.flushed_offset
        count = 0
        for offset in offsets[:room]:
            if offset >= flushed:
                break
            count += 1
        if count == 0:
            return 0
        c = progress.open_chunk()
        produced = self._produce(chunk, count, progress, c.on_delivery)
        if produced:
            progress.close_chunk(c, offsets[produced - 1] + 1, produced)
            self.probe.count("uplink_records_sent_total", produced, uplink=self.config.name, topic=part.topic)
        return produced

    def _produce(self, chunk, count: int, progress: PartitionProgress, on_delivery) -> int:
        """produce() the first `count` records of a decoded chunk; returns how many went in
        (fewer when librdkafka's queue is full or refuses a record).

        The per-record cost of the uplink is this loop: it reads the chunk's columns
        directly (no Record objects) and passes one bound method as every record's report."""
        from confluent_kafka import KafkaException
        produce = self.producer.produce
        topic = progress.remote_topic
        partition = progress.partition if self.config.partitioning == "same" else -1
        raw = chunk.raw
        source = progress.source
        columns = zip(chunk.offsets[:count].tolist(), chunk.timestamps_ms[:count].tolist(), chunk.key_offsets[:count].tolist(),
                      chunk.key_lengths[:count].tolist(), chunk.value_offsets[:count].tolist(),
                      chunk.value_lengths[:count].tolist(), chunk.header_lengths[:count].tolist())
        done = 0
        try:
            for offset, timestamp_ms, ko, kn, vo, vn, hn in columns:
                # The local position travels with the record: a restart reads it back (readback.py).
                position = (HEADER, header_value(source, offset))
                produce(topic, None if vn < 0 else raw[vo:vo + vn], None if kn < 0 else raw[ko:ko + kn],
                        partition=partition, on_delivery=on_delivery, timestamp=timestamp_ms,
                        headers=[*chunk.headers(done), position] if hn else [position])
                done += 1
        except BufferError:  # librdkafka's queue is full (its byte bound): the rest comes later
            progress.retry_at_ms = mono_ms() + UPLINK_POLL_MS
        except KafkaException as e:  # e.g. the remote topic has fewer partitions
            self._count_error(e.args[0].name())
            progress.retry_at_ms = mono_ms() + self.config.retry_backoff_ms
        return done

    def _replace_producer(self, now_ms: int) -> None:
        """Start over with a new producer id: everything not yet delivered is sent again."""
        log.warning("uplink %s: the cluster refused the producer's id or sequence; starting a new producer",
                    self.config.name)
        for _, progress in self.parts.values():
            progress.resent_records += progress.sent - progress.delivered
            progress.abandon()
            progress.retry_at_ms = now_ms + self.config.retry_backoff_ms
            # Records the old producer got through are in the cluster: find them, not resend them.
            progress.resync_pending = self.reads_back
        self._readback_at_ms = now_ms + self.config.retry_backoff_ms
        old, self.producer = self.producer, None
        old.purge()
        old.poll(0)  # the purged records' reports belong to the abandoned chunks: ignored
        self.rebuild_producer = False
        self.producer = self._new_producer()

    def _serve_readback(self, now_ms: int) -> None:
        """Start a read-back for the partitions waiting for one, or apply a finished one."""
        if self._readback is not None:
            if self._readback.done.is_set():
                readback, self._readback = self._readback, None
                self._apply_readback(readback, now_ms)
            return
        pending = {(p.remote_topic, p.partition): p.source for _, p in self.parts.values() if p.resync_pending}
        if not pending or now_ms < self._readback_at_ms:
            return
        settings = consumer_settings(self.config.producer_settings(), self.config.group)
        settings["logger"] = librdkafka_log
        settings["client.id"] = f"ingest-uplink-{self.config.name}-{self.worker_id}-readback"
        reader = TailReader(settings, self.config.readback_records_max, READBACK_TIMEOUT_S)
        self._readback = _Readback(reader, pending)

    def _apply_readback(self, readback: "_Readback", now_ms: int) -> None:
        if readback.error is not None:
            reason = readback.error.reason if isinstance(readback.error, ReadbackError) else "internal"
            self._count_error(reason)
            if reason in READ_DENIED:  # may write, may not read: at-least-once from the committed offset
                log.warning("uplink %s: the cluster refuses to let the uplink read its topics (%s); resuming "
                            "at the committed offsets", self.config.name, reason)
                for _, progress in self.parts.values():
                    if progress.resync_pending:
                        progress.resume_after(set())
                return
            self._log_now_and_then("readback", "uplink %s: reading back the cluster's tail failed (%s); "
                                   "trying again", self.config.name, readback.error)
            self._readback_at_ms = now_ms + self.config.retry_backoff_ms
            return
        for part, progress in self.parts.values():
            key = (progress.remote_topic, progress.partition)
            if not progress.resync_pending or key not in readback.found:
                continue
            found = readback.found[key]
            if found and max(found) >= part.log.flushed_offset:
                # The cluster holds offsets this log never made durable: another log under the
                # same name (a restored backup?). Trust only the committed offset.
                log.warning("uplink %s: %s holds offset %d of %s-%d, beyond its durable end %d; resuming at %d",
                            self.config.name, key, max(found), part.topic, part.index, part.log.flushed_offset,
                            progress.delivered)
                found = set()
            spared = progress.resume_after(found)
            log.info("uplink %s: %s-%d resumes at offset %d (%d records found already in the cluster)",
                     self.config.name, part.topic, part.index, progress.sent, spared)
            self._flush_counts(progress)

    def commit(self) -> None:
        """Write delivered progress as the group's committed offset (fsynced, per partition)."""
        for part, progress in self.parts.values():
            offset = progress.committable()
            if offset is None:
                continue
            try:
                part.groups.commit(self.config.group, offset)
            except OSError as e:  # a full disk: the next commit retries; a crash resends more
                log.warning("uplink %s: committing %s-%d failed: %s", self.config.name, part.topic, part.index, e)
                return
            progress.mark_committed(offset)

    # ---- what the worker asks --------------------------------------------------------------

    def wait_ms(self, now_ms: int, idle_ms: int) -> int:
        """How long the loop may block: delivery reports need poll() while records are in flight."""
        wait = idle_ms
        room = sum(p.in_flight for _, p in self.parts.values()) < self.config.inflight_records_max
        for part, progress in self.parts.values():
            if progress.resync_pending:  # a running read-back is looked at every 5 ms; a failed one retried later
                wait = min(wait, UPLINK_POLL_MS if self._readback else max(0, self._readback_at_ms - now_ms))
            if progress.chunks or progress.rewind_pending:
                wait = min(wait, UPLINK_POLL_MS)
            if (not progress.rewind_pending and not progress.resync_pending
                    and progress.sent < part.log.flushed_offset):  # a backlog
                wait = min(wait, max(0, progress.retry_at_ms - now_ms) if room else UPLINK_POLL_MS)
        return wait

    def delivered_offset(self, part) -> int | None:
        entry = self.parts.get((part.topic, part.index))
        return None if entry is None else entry[1].delivered

    def gauges(self, now_ms: int) -> list[tuple[str, dict, float]]:
        rows = []
        for part, progress in self.parts.values():
            labels = {"uplink": self.config.name, "topic": part.topic, "partition": str(part.index)}
            rows.append(("uplink_lag_records", labels, max(0, part.log.log_end_offset - progress.delivered)))
            rows.append(("uplink_lag_seconds", labels, record_age_s(part, progress.delivered, now_ms)))
        if self.last_success_ms:  # absent until the first delivery: "never" is not 1970
            rows.append(("uplink_last_success_timestamp_seconds",
                         {"uplink": self.config.name, "worker": str(self.worker_id)}, self.last_success_ms / 1000))
        return rows

    def close(self, timeout_s: float) -> None:
        """Drain: wait (bounded) for what is in flight to be delivered, then commit."""
        if self.producer is None:
            return
        deadline = time.monotonic() + timeout_s
        while any(p.chunks for _, p in self.parts.values()) and time.monotonic() < deadline:
            self.producer.poll(0.05)
            for part, progress in self.parts.values():
                self._settle(part, progress, mono_ms())
        self.commit()
        self._readback = None  # its daemon thread ends by its own timeout
        self.producer.purge()
        self.producer.poll(0)
        self.producer = None


class _Readback:
    """One TailReader.find() in a daemon thread: the worker's loop never blocks on the network;
    it looks at `done` each turn. A draining worker does not wait for it."""

    def __init__(self, reader: TailReader, wanted: dict) -> None:
        self.found: dict = {}
        self.error: Exception | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(reader, wanted), name="uplink-readback", daemon=True).start()

    def _run(self, reader: TailReader, wanted: dict) -> None:
        try:
            self.found = reader.find(wanted)
        except Exception as e:  # noqa: BLE001 - reported on the loop, counted and retried there
            self.error = e
        finally:
            self.done.set()


def record_age_s(part, offset: int, now_ms: int) -> float:
    """Age of the record at `offset` by its timestamp (0 when there is none yet)."""
    if offset >= part.log.log_end_offset:
        return 0.0
    try:
        chunk = part.log.read(max(offset, part.log.log_start_offset), 1)
    except (CorruptDataError, OffsetOutOfRangeError, OSError):  # OSError: an offline log
        return 0.0
    for _pos, header in batch_codec.iter_batches(chunk):
        return max(0.0, (now_ms - header.base_timestamp_ms) / 1000)
    return 0.0
