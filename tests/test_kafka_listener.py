"""The Kafka wire-protocol listener, driven by real Kafka clients (kafka-python,
confluent-kafka) and raw sockets against a real appliance with [kafka] enabled."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from ingest import Producer
from ingest.net.kafka import codec
from ingest.net.kafka.schema import ApiKey
from tests.support import FAST_HEARTBEATS, Appliance, create_topic, eventually, fetch_all, metric_value

TOPIC = "kt"
PARTITIONS = 4
KAFKA_PORT_OFFSET = 30  # inside the appliance's block of free ports, past PULL/ROUTER
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("kafka")
    a = Appliance(base / "data", workers=2)
    a.kafka_port = a.port + KAFKA_PORT_OFFSET
    a.config_text = f"{FAST_HEARTBEATS}\n[kafka]\nenabled = true\nport = {a.kafka_port}\n"
    a.start()
    create_topic(a, TOPIC, PARTITIONS)
    yield a
    a.stop()


def bootstrap(app) -> str:
    return f"127.0.0.1:{app.kafka_port}"


def request(sock: socket.socket, api_key: int, version: int, body: dict, correlation_id: int = 7) -> dict:
    sock.sendall(codec.encode_request(api_key, version, correlation_id, "test", body))
    size = struct.unpack(">i", _recv_exactly(sock, 4))[0]
    got_id, reply = codec.decode_response(api_key, version, _recv_exactly(sock, size))
    assert got_id == correlation_id
    return reply


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def connect(app, worker: int = 0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", app.kafka_port + worker), timeout=10)
    return s


def test_metadata_advertises_each_worker_as_a_broker_owning_its_partitions(app):
    with connect(app, 1) as s:
        meta = request(s, ApiKey.METADATA, 8, {"topics": [{"name": TOPIC}], "allow_auto_topic_creation": False})
    assert [(b["node_id"], b["port"]) for b in meta["brokers"]] == [(0, app.kafka_port), (1, app.kafka_port + 1)]
    (topic,) = meta["topics"]
    assert topic["error_code"] == 0
    assert [(p["partition_index"], p["leader_id"]) for p in topic["partitions"]] == [(p, p % 2) for p in range(PARTITIONS)]


def test_kafka_python_producer_and_consumer_round_trip(app):
    producer = KafkaProducer(bootstrap_servers=bootstrap(app), acks="all", linger_ms=5)
    sent = [producer.send(TOPIC, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=i % PARTITIONS,
                          headers=[("h", b"x")]) for i in range(40)]
    producer.flush(TIMEOUT_S)
    meta = [f.get(TIMEOUT_S) for f in sent]
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap(app), enable_auto_commit=False, group_id=None,
                             consumer_timeout_ms=5000)
    parts = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    for m in meta:
        consumer.seek(TopicPartition(TOPIC, m.partition), min(x.offset for x in meta if x.partition == m.partition))
    got = {}
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < len(sent) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500).items():
            for r in records:
                got[(tp.partition, r.offset)] = (r.key, r.value, r.headers)
    consumer.close()
    for i, m in enumerate(meta):
        assert got[(m.partition, m.offset)] == (f"k{i}".encode(), f"v{i}".encode(), [("h", b"x")])


def test_record_from_zeromq_is_read_over_kafka_at_the_same_offset_and_vice_versa(app):
    sdk = Producer(app.bootstrap, acks="fsync")
    _, zmq_offset = sdk.send(TOPIC, b"from-zmq", partition=1).result(TIMEOUT_S)
    sdk.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap(app), enable_auto_commit=False, consumer_timeout_ms=5000)
    tp = TopicPartition(TOPIC, 1)
    consumer.assign([tp])
    consumer.seek(tp, zmq_offset)
    records = []
    assert eventually(lambda: records.extend(consumer.poll(timeout_ms=200).get(tp, [])) or records, TIMEOUT_S)
    consumer.close()
    assert (records[0].offset, records[0].value) == (zmq_offset, b"from-zmq")

    producer = KafkaProducer(bootstrap_servers=bootstrap(app), acks=1)
    kafka_offset = producer.send(TOPIC, b"from-kafka", partition=2).get(TIMEOUT_S).offset
    producer.close()
    stored = [r for r in fetch_all(app, TOPIC, 2) if r.offset == kafka_offset]
    assert [r.value for r in stored] == [b"from-kafka"]


def test_idempotent_kafka_python_producer_lands_once(app):
    producer = KafkaProducer(bootstrap_servers=bootstrap(app), enable_idempotence=True, acks="all")
    offsets = [producer.send(TOPIC, f"idem{i}".encode(), partition=3).get(TIMEOUT_S).offset for i in range(5)]
    producer.close()
    stored = fetch_all(app, TOPIC, 3, offsets[0])
    values = [r.value for r in stored if r.value.startswith(b"idem")]
    assert values == [f"idem{i}".encode() for i in range(5)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 5


def test_partition_of_another_worker_gets_not_leader_or_follower(app):
    batch = _one_record_batch(b"x")
    with connect(app, 0) as s:
        reply = request(s, ApiKey.PRODUCE, 7, {"acks": 1, "timeout_ms": 1000, "topics": [
            {"name": TOPIC, "partitions": [{"index": 1, "records": batch}, {"index": 0, "records": batch}]}]})
        fetched = request(s, ApiKey.FETCH, 10, {"replica_id": -1, "max_wait_ms": 0, "min_bytes": 1,
                                                 "max_bytes": 1 << 20, "session_epoch": -1, "topics": [
            {"topic": TOPIC, "partitions": [{"partition": 1, "fetch_offset": 0, "partition_max_bytes": 1 << 20}]}]})
    rows = {r["index"]: r["error_code"] for r in reply["responses"][0]["partitions"]}
    assert rows == {1: 6, 0: 0}
    assert fetched["responses"][0]["partitions"][0]["error_code"] == 6


def test_api_versions_newer_than_served_gets_error_35_and_a_v0_body(app):
    with connect(app) as s:
        s.sendall(codec.frame(struct.pack(">hhi", ApiKey.API_VERSIONS, 3, 9) + b"\x00\x01c" + b"\x00"))
        size = struct.unpack(">i", _recv_exactly(s, 4))[0]
        got_id, body = codec.decode_response(ApiKey.API_VERSIONS, 0, _recv_exactly(s, size))
        assert (got_id, body["error_code"]) == (9, 35)
        assert {k["api_key"]: (k["min_version"], k["max_version"]) for k in body["api_keys"]}[ApiKey.API_VERSIONS] == (0, 2)
        # The connection stays usable, as Kafka's does, for the retry at a served version.
        again = request(s, ApiKey.API_VERSIONS, 2, {})
        assert again["error_code"] == 0


MALFORMED = {
    "size": struct.pack(">i", -5),
    "api_key": codec.frame(struct.pack(">hhi", 999, 0, 1) + b"\xff\xff"),
    "version": codec.frame(struct.pack(">hhi", ApiKey.METADATA, 99, 1) + b"\xff\xff"),
    "truncated": codec.frame(struct.pack(">hhi", ApiKey.PRODUCE, 3, 1) + b"\xff\xff" + b"\xff\xff\x00\x01"),
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_malformed_frame_closes_the_connection_is_counted_and_no_worker_dies(app, reason):
    pids = app.worker_pids()
    before = metric_value(app.metrics_text(), "ingest_kafka_frames_invalid_total", reason=reason)
    with connect(app) as s:
        s.sendall(MALFORMED[reason])
        assert s.recv(100) == b""  # closed by the appliance, nothing sent back
    assert eventually(lambda: metric_value(app.metrics_text(), "ingest_kafka_frames_invalid_total",
                                           reason=reason) == before + 1, 10)
    with connect(app) as s:  # the worker still serves
        assert request(s, ApiKey.API_VERSIONS, 0, {})["error_code"] == 0
    assert app.worker_pids() == pids


def _one_record_batch(value: bytes) -> bytes:
    from ingest.shards import batch as batch_codec
    return batch_codec.encode_batch_py([batch_codec.Record(offset=0, timestamp_ms=int(time.time() * 1000),
                                                           key=None, value=value, headers=())])


def test_confluent_kafka_idempotent_producer_and_consumer_round_trip(app):
    from confluent_kafka import Consumer as CkConsumer, Producer as CkProducer, TopicPartition as CkPartition
    producer = CkProducer({"bootstrap.servers": bootstrap(app), "enable.idempotence": True, "linger.ms": 5})
    delivered = []
    for i in range(20):
        producer.produce(TOPIC, key=f"ck{i}".encode(), value=f"cv{i}".encode(), partition=i % PARTITIONS,
                         on_delivery=lambda err, m: delivered.append((err, m.partition(), m.offset(), m.value())))
    assert producer.flush(TIMEOUT_S) == 0
    assert [d[0] for d in delivered] == [None] * 20
    consumer = CkConsumer({"bootstrap.servers": bootstrap(app), "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([CkPartition(TOPIC, p, min(d[2] for d in delivered if d[1] == p)) for p in range(PARTITIONS)])
    got = {}
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < len(delivered) and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and m.error() is None:
            got[(m.partition(), m.offset())] = m.value()
    consumer.close()
    assert got == {(p, o): v for _, p, o, v in delivered}


def kcat(app, *args, stdin: str | None = None) -> str:
    import subprocess
    done = subprocess.run(["kcat", "-b", bootstrap(app), *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kcat_lists_metadata_and_round_trips_records(app):
    import json
    meta = json.loads(kcat(app, "-L", "-J"))
    assert sorted(b["id"] for b in meta["brokers"]) == [0, 1]
    (topic,) = [t for t in meta["topics"] if t["topic"] == TOPIC]
    assert {p["partition"]: p["leader"] for p in topic["partitions"]} == {p: p % 2 for p in range(PARTITIONS)}

    before = fetch_all(app, TOPIC, 0)
    first = before[-1].offset + 1 if before else 0
    kcat(app, "-P", "-t", TOPIC, "-p", "0", stdin="kc-a\nkc-b\n")
    out = kcat(app, "-C", "-t", TOPIC, "-p", "0", "-o", str(first), "-e", "-f", "%o %s\\n")
    assert out.splitlines() == [f"{first} kc-a", f"{first + 1} kc-b"]
    # ... and what kcat wrote is what ZeroMQ readers get, at the same offsets.
    assert [(r.offset, r.value) for r in fetch_all(app, TOPIC, 0, first)] == [(first, b"kc-a"), (first + 1, b"kc-b")]


def test_record_pushed_over_zeromq_is_consumed_with_kcat_at_its_offset(app):
    sdk = Producer(app.bootstrap, acks="fsync")
    _, offset = sdk.send(TOPIC, b"zmq-to-kcat", partition=3).result(TIMEOUT_S)
    sdk.close()
    out = kcat(app, "-C", "-t", TOPIC, "-p", "3", "-o", str(offset), "-e", "-f", "%o %s\\n")
    assert out.splitlines() == [f"{offset} zmq-to-kcat"]


def test_kafka_python_group_commits_resume_a_new_consumer_and_are_the_appliances_offsets(app):
    from ingest.net import wire
    group = "kgroup"
    producer = KafkaProducer(bootstrap_servers=bootstrap(app), acks="all")
    for i in range(8):
        producer.send(TOPIC, f"g{i}".encode(), partition=i % PARTITIONS)
    producer.flush(TIMEOUT_S)
    producer.close()
    parts = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap(app), group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    consumer.assign(parts)
    ends = consumer.end_offsets(parts)
    positions = {tp: 0 for tp in parts}
    deadline = time.monotonic() + TIMEOUT_S
    while any(positions[tp] < ends[tp] for tp in parts) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500).items():
            positions[tp] = records[-1].offset + 1
    # Commit all but the last two records of partition 0: a new member resumes there.
    resume = {tp: ends[tp] - (2 if tp.partition == 0 else 0) for tp in parts}
    from kafka.structs import OffsetAndMetadata
    consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in resume.items()})
    consumer.close()

    again = KafkaConsumer(bootstrap_servers=bootstrap(app), group_id=group, enable_auto_commit=False,
                          auto_offset_reset="latest")
    again.assign(parts)
    assert {tp: again.committed(tp) for tp in parts} == resume
    assert {tp: again.position(tp) for tp in parts} == resume
    again.close()
    # The same offsets over ZeroMQ, from each partition's owner.
    for p in range(PARTITIONS):
        reply = app.request(app.owner_router(p), wire.OffsetFetchRequest(group=group, topic=TOPIC, partitions=(p,)))
        assert dict(reply.offsets)[p] == resume[TopicPartition(TOPIC, p)]


def test_confluent_kafka_commit_and_committed_through_the_coordinator(app):
    from confluent_kafka import Consumer as CkConsumer, TopicPartition as CkPartition
    consumer = CkConsumer({"bootstrap.servers": bootstrap(app), "group.id": "ckgroup", "enable.auto.commit": False})
    offsets = [CkPartition(TOPIC, p, p + 1) for p in range(PARTITIONS)]
    consumer.commit(offsets=offsets, asynchronous=False)
    got = consumer.committed([CkPartition(TOPIC, p) for p in range(PARTITIONS)], timeout=TIMEOUT_S)
    consumer.close()
    assert [(tp.partition, tp.offset) for tp in got] == [(p, p + 1) for p in range(PARTITIONS)]


def test_kafka_metrics_pass_promtool_check_metrics(app):
    import shutil
    import subprocess
    text = app.metrics_text()
    assert eventually(lambda: metric_value(app.metrics_text(), "ingest_kafka_requests_total", api="produce") > 0, 10)
    text = app.metrics_text()
    assert "ingest_kafka_connections_total" in text and "ingest_kafka_frames_invalid_total" in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: sh tests/install-deps.sh"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr


def _subscriber(app, group: str, topic: str):
    return KafkaConsumer(topic, bootstrap_servers=bootstrap(app), group_id=group, enable_auto_commit=False,
                         auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=300,
                         max_poll_interval_ms=10_000)


def test_two_kafka_python_members_split_partitions_and_a_new_one_resumes_from_commits(app):
    import threading
    topic, group = "ksplit", "splitters"
    create_topic(app, topic, PARTITIONS)
    producer = KafkaProducer(bootstrap_servers=bootstrap(app), acks="all")
    for i in range(4 * PARTITIONS):
        producer.send(topic, f"s{i}".encode(), partition=i % PARTITIONS)
    producer.flush(TIMEOUT_S)
    members = [_subscriber(app, group, topic) for _ in range(2)]
    seen: list[dict] = [{}, {}]
    assigned: list[set] = [set(), set()]
    stop = threading.Event()

    def run(i: int) -> None:
        c = members[i]
        while not stop.is_set():
            for tp, records in c.poll(timeout_ms=200).items():
                for r in records:
                    seen[i][(tp.partition, r.offset)] = r.value
            assigned[i] = {tp.partition for tp in c.assignment()}
            if seen[i]:
                c.commit()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for th in threads:
        th.start()
    split = eventually(lambda: len(assigned[0]) == len(assigned[1]) == 2 and not assigned[0] & assigned[1]
                       and len(seen[0]) + len(seen[1]) >= 4 * PARTITIONS, TIMEOUT_S)
    stop.set()
    for th in threads:
        th.join(TIMEOUT_S)
    for c in members:
        c.close()
    assert split, (assigned, seen)
    assert assigned[0] | assigned[1] == set(range(PARTITIONS))  # the range assignor: 2 and 2
    assert {p for p, _ in seen[0]} <= assigned[0] and {p for p, _ in seen[1]} <= assigned[1]

    for p in range(PARTITIONS):
        producer.send(topic, f"late{p}".encode(), partition=p)
    producer.flush(TIMEOUT_S)
    producer.close()
    late = _subscriber(app, group, topic)
    got = []
    assert eventually(lambda: got.extend(r.value for rs in late.poll(timeout_ms=200).values() for r in rs)
                      or len(got) >= PARTITIONS, TIMEOUT_S)
    late.close()
    assert sorted(got) == sorted(f"late{p}".encode() for p in range(PARTITIONS))


def test_confluent_kafka_subscriber_gets_every_partition_and_commits(app):
    from confluent_kafka import Consumer as CkConsumer
    topic = "cksub"
    create_topic(app, topic, PARTITIONS)
    producer = KafkaProducer(bootstrap_servers=bootstrap(app), acks="all")
    for p in range(PARTITIONS):
        producer.send(topic, f"c{p}".encode(), partition=p)
    producer.flush(TIMEOUT_S)
    producer.close()
    consumer = CkConsumer({"bootstrap.servers": bootstrap(app), "group.id": "cksubs", "auto.offset.reset": "earliest",
                           "enable.auto.commit": False, "partition.assignment.strategy": "range"})
    consumer.subscribe([topic])
    got = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < PARTITIONS and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and m.error() is None:
            got.append((m.partition(), m.value()))
    consumer.commit(asynchronous=False)
    assignment = sorted(tp.partition for tp in consumer.assignment())
    consumer.close()
    assert assignment == list(range(PARTITIONS))
    assert sorted(got) == [(p, f"c{p}".encode()) for p in range(PARTITIONS)]
