"""The client SDK against a real appliance: Producer and Consumer as an application uses them.

Every test talks to `ingest serve` (the `appliance` fixture) over loopback; the oracle for
key partitioning is kafka-python's murmur2.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import numpy as np
import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2
from kafka.record.default_records import DefaultRecordBatch

from ingest import Consumer, Producer
from ingest.net import batching
from ingest.net.client import BootstrapClient, UnreachableError
from ingest.net.consumer import Record
from ingest.net.errors import ErrorCode, IngestError
from ingest.net.producer import DeliveryTimeoutError

RESULT_TIMEOUT_S = 20


def create_topic(app, topic: str, partitions: int) -> None:
    with BootstrapClient(app.bootstrap) as bootstrap:
        bootstrap.create_topic(topic, partitions)


def kafka_partition(key: bytes, partitions: int) -> int:
    return (kafka_murmur2(key) & 0x7FFFFFFF) % partitions


def read_exactly(app, topic: str, count: int, **options) -> list[Record]:
    """``count`` records from the start of ``topic``, after checking that the topic holds
    no more than that."""
    with Consumer(app.bootstrap, topic, from_beginning=True, **options) as consumer:
        records = list(itertools.islice(consumer.records(idle_timeout_ms=10_000), count))
        assert sum(consumer.end_offsets().values()) == count
    assert len(records) == count
    return records


def by_position(records) -> dict[tuple[int, int], tuple]:
    return {(r.partition, r.offset): (r.key, r.value, r.timestamp_ms) for r in records}


# ---- the producer's encoding, without an appliance ----------------------------------------

def test_producer_batches_are_kafka_batches_with_the_producer_id_and_sequence():
    values = [b"v%d" % i for i in range(500)]
    keys = [None if i % 3 == 0 else b"k%d" % i for i in range(500)]
    timestamps = [None if i % 2 else 1_700_000_000_000 + i for i in range(500)]
    packed = batching.pack_records(values, keys, timestamps, None, now_ms=1_800_000_000_000)
    partitions = batching.choose_partitions(packed, 5, sticky=3)
    for partition, rows in batching.split_batches(partitions, packed.sizes(), None, batch_bytes=1 << 20):
        payload = batching.encode_batch_rows(packed, rows, producer_id=77, base_sequence=1000)
        batch = DefaultRecordBatch(payload.tobytes())
        assert batch.validate_crc() and (batch.producer_id, batch.base_sequence) == (77, 1000)
        records = list(batch)
        assert [(r.key, r.value) for r in records] == [(keys[i], values[i]) for i in rows]
        assert [r.timestamp for r in records] == [timestamps[i] or 1_800_000_000_000 for i in rows]
        expected = {3 if keys[i] is None else kafka_partition(keys[i], 5) for i in rows}
        assert expected == {partition}


def test_a_restamped_batch_has_the_new_producer_id_and_sequence_and_a_valid_crc():
    packed = batching.pack_records([b"a", b"b"], [None, None], [None, None], None, now_ms=1)
    payload = batching.encode_batch_rows(packed, np.arange(2), producer_id=5, base_sequence=42)
    batching.restamp(payload, 2**62 + 9, 0)
    batch = DefaultRecordBatch(payload.tobytes())
    assert batch.validate_crc()
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (2**62 + 9, 0, 0)
    assert [r.value for r in batch] == [b"a", b"b"]


def test_a_drain_is_cut_into_batches_of_about_batch_bytes_in_send_order_per_partition():
    partitions = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    sizes = np.array([400, 10, 400, 400, 10, 5000, 10, 10])
    runs = batching.split_batches(partitions, sizes, None, batch_bytes=1000)
    assert [(p, rows.tolist()) for p, rows in runs] == [(0, [0, 2]), (0, [3]), (0, [5]), (0, [6, 7]),
                                                        (1, [1, 4])]


# ---- against an appliance ---------------------------------------------------------------

def test_records_round_trip_across_topics_and_partitions_at_every_ack_level(appliance):
    for acks in ("0", 1, "fsync"):
        topics = [f"round-trip-{acks}-a", f"round-trip-{acks}-b"]
        for topic in topics:
            create_topic(appliance, topic, 3)
        sent = {}
        with Producer(appliance.bootstrap, acks=acks) as producer:
            for i in range(3000):
                topic = topics[i % 2]
                key, value, timestamp_ms = b"dev-%d" % (i % 37), b"reading-%d" % i, 1_700_000_000_000 + i
                sent.setdefault(topic, []).append(
                    (key, value, timestamp_ms, producer.send(topic, value, key=key, timestamp_ms=timestamp_ms)))
            producer.flush()
            assert sent[topics[0]][0][3].durability(RESULT_TIMEOUT_S) >= {"0": 0, 1: 1, "fsync": 2}[acks]
            for topic in topics:
                outcomes = [(k, v, t, f.result(RESULT_TIMEOUT_S)) for k, v, t, f in sent[topic]]
                got = read_exactly(appliance, topic, len(outcomes))
                if acks == "0":  # no offsets known: each partition holds its records in send order
                    for p in range(3):
                        expected = [(k, v, t) for k, v, t, (part, _) in outcomes if part == p]
                        assert [(r.key, r.value, r.timestamp_ms) for r in got if r.partition == p] == expected
                    assert all(offset == -1 for *_, (_, offset) in outcomes)
                else:
                    assert by_position(got) == {po: (k, v, t) for k, v, t, po in outcomes}


def test_keys_land_on_kafkas_murmur2_partitions(appliance):
    create_topic(appliance, "keyed", 7)
    keys = [b"device-%d" % i for i in range(1000)] + [b"", "caf\u00e9".encode()]
    with Producer(appliance.bootstrap, acks=1) as producer:
        futures = [producer.send("keyed", b"v", key=key) for key in keys]
        partitions = [f.result(RESULT_TIMEOUT_S)[0] for f in futures]
    assert partitions == [kafka_partition(key, 7) for key in keys]
    stored = {r.key: r.partition for r in read_exactly(appliance, "keyed", len(keys))}
    assert stored == {key: kafka_partition(key, 7) for key in keys}


def test_null_key_records_fill_one_partition_per_batch_and_rotate(appliance):
    create_topic(appliance, "unkeyed", 4)
    used = []
    with Producer(appliance.bootstrap, acks=1, linger_ms=60_000) as producer:  # flush() drains
        for _ in range(8):
            futures = [producer.send("unkeyed", b"x") for _ in range(20)]
            producer.flush()
            partitions = {f.result(RESULT_TIMEOUT_S)[0] for f in futures}
            assert len(partitions) == 1  # one batch, one partition
            used.append(partitions.pop())
    assert len(set(used)) == 4  # consecutive batches rotate over every partition


def test_headers_tombstones_explicit_partitions_and_str_fields_round_trip(appliance):
    create_topic(appliance, "shapes", 3)
    with Producer(appliance.bootstrap, acks="fsync") as producer:
        futures = [
            producer.send("shapes", b"with-headers", key=b"k", headers=[("ct", b"json"), ("null", None)]),
            producer.send("shapes", None, key=b"tombstone"),
            producer.send("shapes", b"pinned", partition=2),
            producer.send("shapes", "text value", key="text key"),
            producer.send("shapes", b"", key=b""),
        ]
        outcomes = [f.result(RESULT_TIMEOUT_S) for f in futures]
    assert outcomes[2][0] == 2
    got = {(r.partition, r.offset): r for r in read_exactly(appliance, "shapes", 5)}
    records = [got[po] for po in outcomes]
    assert [(r.key, r.value, r.headers) for r in records] == [
        (b"k", b"with-headers", (("ct", b"json"), ("null", None))),
        (b"tombstone", None, ()),
        (None, b"pinned", ()),
        (b"text key", b"text value", ()),
        (b"", b"", ()),
    ]
    now_ms = time.time() * 1000
    assert all(now_ms - 60_000 < r.timestamp_ms <= now_ms for r in records)


def test_a_bad_record_fails_alone_and_the_rest_of_its_batch_is_stored(appliance):
    create_topic(appliance, "mixed", 1)
    with Producer(appliance.bootstrap, acks=1, linger_ms=50) as producer:
        good = producer.send("mixed", b"good-1")
        bad_value = producer.send("mixed", 12345)
        bad_time = producer.send("mixed", b"x", timestamp_ms=-5)
        also_good = producer.send("mixed", b"good-2")
        assert good.result(RESULT_TIMEOUT_S) == (0, 0)
        assert also_good.result(RESULT_TIMEOUT_S) == (0, 1)
        for future in (bad_value, bad_time):
            assert isinstance(future.exception(RESULT_TIMEOUT_S), IngestError)
    with pytest.raises(IngestError) as raised:
        with Producer(appliance.bootstrap) as producer:
            producer.send("mixed", b"x", partition=1)
    assert raised.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert [r.value for r in read_exactly(appliance, "mixed", 2)] == [b"good-1", b"good-2"]


def test_sending_to_an_unknown_topic_creates_it(appliance):
    with Producer(appliance.bootstrap, acks=1) as producer:
        partition, offset = producer.send("born-on-send", b"first").result(RESULT_TIMEOUT_S)
    with BootstrapClient(appliance.bootstrap) as bootstrap:
        topics = bootstrap.metadata()["topics"]
    assert topics["born-on-send"]["partitions"] == 2  # the appliance's default: one per worker
    assert offset == 0 and 0 <= partition < 2


def test_send_batch_stores_numpy_readings_with_one_future_and_keeps_call_order(appliance):
    create_topic(appliance, "readings", 4)
    reading = np.dtype([("device", "<u4"), ("temperature", "<f4"), ("taken_ms", "<i8")])
    readings = np.zeros(5000, reading)
    readings["device"] = np.arange(5000) % 50
    readings["temperature"] = np.linspace(-20, 40, 5000)
    readings["taken_ms"] = 1_700_000_000_000 + np.arange(5000)
    keys = readings["device"].astype("<u4").view(np.uint8).reshape(-1, 4)
    with Producer(appliance.bootstrap, acks="fsync") as producer:
        before = producer.send("readings", b"before", key=keys[0].tobytes())
        future = producer.send_batch("readings", readings, keys=keys, timestamps_ms=readings["taken_ms"])
        partitions, offsets = future.result(RESULT_TIMEOUT_S)
        after = producer.send("readings", b"after", key=keys[0].tobytes())
        before_at, after_at = before.result(RESULT_TIMEOUT_S), after.result(RESULT_TIMEOUT_S)
    expected = [kafka_partition(k.tobytes(), 4) for k in keys]
    assert partitions.tolist() == expected
    assert before_at[0] == partitions[0] == after_at[0]
    assert before_at[1] < offsets[0] and offsets[np.flatnonzero(partitions == partitions[0])].max() < after_at[1]
    got = by_position(read_exactly(appliance, "readings", 5002))
    for i in range(5000):
        assert got[(int(partitions[i]), int(offsets[i]))] == (keys[i].tobytes(), readings[i].tobytes(),
                                                              int(readings["taken_ms"][i]))


def test_send_batch_takes_one_buffer_and_lengths_and_the_producer_counts_every_outcome(appliance):
    create_topic(appliance, "buffered", 3)
    values = [b"reading-%d" % i * (i % 4) for i in range(3000)]  # some empty
    keys = [None if i % 7 == 0 else b"dev-%d" % (i % 40) for i in range(3000)]
    value_lengths = [len(v) for v in values]
    value_lengths[5] = -1  # a null value (a tombstone)
    values[5] = None
    key_lengths = [-1 if k is None else len(k) for k in keys]
    value_buffer = bytearray(b"".join(v or b"" for v in values))
    key_buffer = b"".join(k or b"" for k in keys)
    with Producer(appliance.bootstrap, acks="fsync") as producer:
        with pytest.raises(ValueError, match="add up"):
            producer.send_batch("buffered", value_buffer[:-1], value_lengths=value_lengths)
        with pytest.raises(ValueError, match="3 keys for 3000 values"):
            producer.send_batch("buffered", value_buffer, keys=b"abc", value_lengths=value_lengths,
                                key_lengths=[1, 1, 1])
        future = producer.send_batch("buffered", value_buffer, keys=key_buffer, timestamps_ms=1_700_000_000_000,
                                     value_lengths=np.array(value_lengths), key_lengths=key_lengths)
        value_buffer[:] = b"x" * len(value_buffer)  # the call copied what it needed
        partitions, offsets = future.result(RESULT_TIMEOUT_S)
        for i in range(50):  # futures not kept: the counters tell
            producer.send("buffered-too", 12345 if i % 10 == 0 else b"%d" % i)
        producer.flush()
        assert (producer.delivered_records, producer.failed_records) == (3045, 5)
        assert producer.last_error.code == ErrorCode.INVALID_REQUEST
    for i in range(3000):
        if keys[i] is not None:
            assert partitions[i] == kafka_partition(keys[i], 3)
    got = by_position(read_exactly(appliance, "buffered", 3000))
    assert [got[(int(partitions[i]), int(offsets[i]))] for i in range(3000)] == [
        (keys[i], values[i], 1_700_000_000_000) for i in range(3000)]


def test_a_group_resumes_from_its_committed_offsets_after_close_and_reopen(appliance):
    create_topic(appliance, "resume", 2)
    with Producer(appliance.bootstrap, acks=1) as producer:
        for i in range(100):
            producer.send("resume", b"%d" % i, key=b"%d" % (i % 10))
    with Consumer(appliance.bootstrap, "resume", group="dashboard", from_beginning=True) as consumer:
        first = list(itertools.islice(consumer.records(idle_timeout_ms=10_000), 60))
        consumer.commit()
    with Consumer(appliance.bootstrap, "resume", group="dashboard") as consumer:
        assert consumer.committed() == {p: consumer.position(p) for p in (0, 1)}
        rest = list(itertools.islice(consumer.records(idle_timeout_ms=10_000), 40))
        assert list(consumer.records(idle_timeout_ms=700)) == []
    assert sorted(r.value for r in first + rest) == sorted(b"%d" % i for i in range(100))
    with Consumer(appliance.bootstrap, "resume", group="latecomer") as consumer:  # no commit: log end
        assert list(consumer.records(idle_timeout_ms=700)) == []
        with Producer(appliance.bootstrap, acks=1) as producer:
            producer.send("resume", b"new")
        assert next(consumer.records(idle_timeout_ms=10_000)).value == b"new"


def test_seek_replays_a_partition_from_any_offset_and_past_the_end_restarts_at_the_log_start(appliance):
    create_topic(appliance, "replay", 2)
    with Producer(appliance.bootstrap, acks=1) as producer:
        for i in range(50):
            producer.send("replay", b"%d" % i, partition=1)
    with Consumer(appliance.bootstrap, "replay", partitions=[1], from_beginning=True) as consumer:
        records = consumer.records(idle_timeout_ms=10_000)
        assert [next(records).offset for _ in range(5)] == [0, 1, 2, 3, 4]
        consumer.seek(1, 30)
        assert [next(records).value for _ in range(3)] == [b"30", b"31", b"32"]
        assert consumer.position(1) == 33
        consumer.seek(1, 10_000)  # OFFSET_OUT_OF_RANGE: continue from the earliest record
        assert next(records).offset == 0


def test_records_handed_out_are_consumed_one_by_one_for_position_commit_and_poll_batch(appliance):
    create_topic(appliance, "handed-out", 1)
    with Producer(appliance.bootstrap, acks=1) as producer:
        producer.send_batch("handed-out", [b"%d" % i for i in range(1000)]).result(RESULT_TIMEOUT_S)
    with Consumer(appliance.bootstrap, "handed-out", group="g", from_beginning=True) as consumer:
        records = consumer.records(idle_timeout_ms=10_000)
        assert [next(records).offset for _ in range(10)] == list(range(10))
        assert consumer.position(0) == 10  # mid-chunk: the ten handed out, not the chunk
        consumer.commit()
        assert consumer.committed() == {0: 10}
        assert next(records).value == b"10"
        records.close()  # a loop left early: the next records() goes on where it stopped
        assert next(consumer.records(idle_timeout_ms=10_000)).offset == 11
        rest = []
        while (chunk := consumer.poll_batch(timeout_ms=1000)) is not None:
            rest += chunk.offsets.tolist()
        assert rest == list(range(12, 1000))  # the chunk's rest, nothing twice
        assert consumer.position(0) == 1000
    with Consumer(appliance.bootstrap, "handed-out", group="g") as consumer:
        assert next(consumer.records(idle_timeout_ms=10_000)).offset == 10


def test_poll_batch_columns_hold_exactly_the_iterated_records(appliance):
    create_topic(appliance, "columns", 3)
    with Producer(appliance.bootstrap, acks=1, batch_bytes=4096) as producer:
        for i in range(2000):
            headers = [("n", b"%d" % i)] if i % 7 == 0 else None
            key = None if i % 5 == 0 else b"k%d" % (i % 13)
            producer.send("columns", None if i % 11 == 0 else os.urandom(i % 200), key=key, headers=headers)
    iterated = read_exactly(appliance, "columns", 2000)
    from_columns = []
    with Consumer(appliance.bootstrap, "columns", from_beginning=True) as consumer:
        while (chunk := consumer.poll_batch(timeout_ms=2000)) is not None:
            assert np.all(np.diff(chunk.offsets) == 1)
            for i in range(len(chunk)):
                from_columns.append(Record("columns", chunk.partition, int(chunk.offsets[i]),
                                           int(chunk.timestamps_ms[i]), chunk.key(i), chunk.value(i),
                                           chunk.headers(i)))
            assert list(chunk.records()) == from_columns[-len(chunk):]
            assert consumer.position(chunk.partition) == int(chunk.offsets[-1]) + 1
    assert sorted(from_columns) == sorted(iterated)


def test_many_threads_share_one_producer_without_losing_or_mixing_records(appliance):
    create_topic(appliance, "threads", 4)
    results: dict[bytes, tuple[int, int]] = {}

    with Producer(appliance.bootstrap, acks="fsync") as producer:
        def run(thread: int) -> None:
            futures = [(b"t%d-%d" % (thread, i), producer.send("threads", b"t%d-%d" % (thread, i), key=b"%d" % i))
                       for i in range(3000)]
            for value, future in futures:
                results[value] = future.result(RESULT_TIMEOUT_S)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(results.values())) == 12_000  # no two records share an offset
    got = by_position(read_exactly(appliance, "threads", 12_000))
    assert {value: po for po, (_, value, _) in got.items()} == results


def test_a_producer_rides_out_kill_9_of_a_worker_without_losing_or_duplicating_acked_records(appliance):
    create_topic(appliance, "survivor", 4)
    sent: list = []
    stop = threading.Event()

    def keep_sending(producer: Producer) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            sent.append((b"r%d" % i, producer.send("survivor", b"r%d" % i, key=b"d%d" % (i % 40))))
            if i % 200 == 0:
                time.sleep(0.005)  # a steady stream, not a burst

    # A short delivery timeout only so that a regression fails in seconds, not minutes.
    with Producer(appliance.bootstrap, acks="fsync", linger_ms=2, delivery_timeout_ms=15_000) as producer:
        sender = threading.Thread(target=keep_sending, args=(producer,))
        sender.start()
        time.sleep(0.5)
        pid = appliance.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while appliance.worker_pids()[0] in (pid, None) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # records keep flowing to the restarted worker
        stop.set()
        sender.join()
        acked = {value: future.result(RESULT_TIMEOUT_S) for value, future in sent}
    assert appliance.worker_pids()[0] != pid
    assert len(set(acked.values())) == len(sent)
    got = read_exactly(appliance, "survivor", len(sent))
    assert {r.value: (r.partition, r.offset) for r in got} == acked


def test_a_sequence_the_worker_does_not_expect_is_survived_under_a_new_producer_id(appliance):
    create_topic(appliance, "gap", 1)
    with Producer(appliance.bootstrap, acks=1) as first:
        first.send_batch("gap", [b"a%d" % i for i in range(10)]).result(RESULT_TIMEOUT_S)
        with Producer(appliance.bootstrap, acks=1) as second:
            # Same id, sequence 0 again: to the worker a gap (it expects 10), as after a
            # lost batch or a crash that truncated unsynced batches.
            second.producer_id = first.producer_id
            partitions, offsets = second.send_batch("gap", [b"b%d" % i for i in range(5)]).result(RESULT_TIMEOUT_S)
    assert offsets.tolist() == [10, 11, 12, 13, 14]
    expected = [b"a%d" % i for i in range(10)] + [b"b%d" % i for i in range(5)]
    assert [r.value for r in read_exactly(appliance, "gap", 15)] == expected


def test_a_consumer_keeps_reading_across_kill_9_of_a_worker(appliance):
    create_topic(appliance, "steady", 2)
    got: list[Record] = []

    def consume() -> None:
        with Consumer(appliance.bootstrap, "steady", from_beginning=True) as consumer:
            got.extend(itertools.islice(consumer.records(idle_timeout_ms=15_000), 300))

    reader = threading.Thread(target=consume)
    reader.start()
    with Producer(appliance.bootstrap, acks="fsync", linger_ms=1) as producer:
        for i in range(300):
            producer.send("steady", b"%d" % i, key=b"%d" % i)
            time.sleep(0.003)
            if i == 100:
                os.kill(appliance.worker_pids()[1], signal.SIGKILL)
    reader.join()
    assert sorted(r.value for r in got) == sorted(b"%d" % i for i in range(300))


def test_records_that_cannot_be_delivered_fail_after_delivery_timeout(appliance):
    with Producer(appliance.bootstrap, acks="fsync", delivery_timeout_ms=1500) as producer:
        producer.send("doomed", b"stored").result(RESULT_TIMEOUT_S)
        assert appliance.stop() == 0
        started = time.monotonic()
        future = producer.send("doomed", b"lost")
        with pytest.raises(DeliveryTimeoutError):
            future.result(RESULT_TIMEOUT_S)
        assert time.monotonic() - started < 10


def test_an_unreachable_bootstrap_fails_fast_with_a_clear_message():
    started = time.monotonic()
    with pytest.raises(UnreachableError) as raised:
        Producer("tcp://127.0.0.1:9", bootstrap_timeout_ms=300)
    assert time.monotonic() - started < 5
    assert "is `ingest serve` running there?" in str(raised.value)
    with pytest.raises(UnreachableError):
        Consumer("tcp://127.0.0.1:9", "t", bootstrap_timeout_ms=300)
