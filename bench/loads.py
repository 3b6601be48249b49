"""Client-side loads, one Python process each: produce N records, read them back, or offer
records at a fixed rate and time each acknowledgement.

Every driver is a generator: it connects and warms up, yields (ready), sends or reads
everything and yields again (done: the clock stops; a reader yields its count), then
closes. Every driver takes a ``target`` (a plain dict, so it crosses a spawn boundary) naming the
system's address and the stream/topic/subject of this run, and does what a user of that
system's usual Python client would do, with that client's defaults unless a comment says
otherwise. Client libraries are imported inside the drivers: a machine without, say,
paho-mqtt can still run the other systems.

Clocks: ``time.monotonic()`` is CLOCK_MONOTONIC, one clock for every process on the
machine, so a start stamped in one process and an end stamped in another subtract.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import psutil

# Redis commands per pipeline round trip: large enough to amortise the round trip (a
# 1,000-entry pipeline is the usual redis-py advice), small enough to bound client memory.
REDIS_PIPELINE_RECORDS = 1000
# Records per XREAD / consume() call on the read side.
READ_CHUNK_RECORDS = 10_000
# MQTT: unacknowledged QoS 1 messages in flight (paho's default, 20, serialises on the
# round trip; a fleet gateway raises it). Same order as JetStream's async-publish window.
MQTT_INFLIGHT_MAX = 1000
# Redis connections the latency run may hold open: requests in flight at once (JetStream's
# async publishes are bounded by its client's pending window likewise).
LATENCY_CONNECTIONS_MAX = 64
# How long a read may wait for the next record before it reports what it got.
READ_IDLE_TIMEOUT_S = 30


def cpu_seconds() -> float:
    """User + system CPU of this process, every thread included."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


# ---- producing N records ------------------------------------------------------------------

def produce_zmq_raw(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(target["endpoint"])
    yield
    send = sock.send
    for _ in range(count):
        send(payload)
    yield
    sock.close(linger=-1)
    context.term()


def produce_ingest_push(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    """A device's PUSH: one RECORD frame per reading, encoded per reading (null key)."""
    import zmq
    from ingest.net import wire

    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(target["endpoints"][index % len(target["endpoints"])])
    topic, raw = target["topic"], target.get("raw", False)
    yield
    send = sock.send
    if raw:
        for _ in range(count):
            send(payload)
    else:
        for _ in range(count):
            send(wire.RecordMessage(topic=topic, value=payload).encode())
    yield
    sock.close(linger=-1)
    context.term()


def produce_ingest_sdk(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    from ingest import Producer

    with Producer(target["bootstrap"], acks=target["acks"]) as producer:
        producer.send(target["topic"], b"warm-up").result(30)  # metadata and connections
        yield
        send, topic = producer.send, target["topic"]
        for _ in range(count):
            send(topic, payload)
        producer.flush()
        yield


def produce_nats(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    import nats

    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(target["url"]))
    subject = target["subject"]

    async def core() -> None:
        for _ in range(count):
            await nc.publish(subject, payload)
        await nc.flush()  # PING/PONG: the server has processed every message before it

    async def jetstream() -> None:
        js = nc.jetstream()
        for _ in range(count):
            await js.publish_async(subject, payload)
        await js.publish_async_completed()

    yield
    loop.run_until_complete(jetstream() if target["jetstream"] else core())
    yield
    loop.run_until_complete(nc.close())
    loop.close()


def produce_redis(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    import redis

    client = redis.Redis(port=target["port"])
    client.ping()
    stream = target["stream"]
    yield
    for start in range(0, count, REDIS_PIPELINE_RECORDS):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(REDIS_PIPELINE_RECORDS, count - start)):
            pipe.xadd(stream, {"v": payload})
        pipe.execute()
    yield
    client.close()


def produce_kafka(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    from confluent_kafka import Producer as KafkaProducer

    producer = KafkaProducer({"bootstrap.servers": target["bootstrap"], "acks": "all"})
    topic = target["topic"]
    producer.produce(topic, b"warm-up")
    producer.flush(30)
    failed = []

    def on_delivery(error, _message) -> None:
        if error is not None:
            failed.append(error)

    yield
    produce, poll = producer.produce, producer.poll
    for _ in range(count):
        while True:
            try:
                produce(topic, payload, on_delivery=on_delivery)
                break
            except BufferError:  # librdkafka's queue is full: serve callbacks, retry
                poll(0.001)
    if producer.flush(120) != 0 or failed:
        raise RuntimeError(f"Kafka producer: {len(failed)} failed deliveries, first {failed[:1]}")
    yield


def _mqtt_client(target: dict, client_id: str = "", clean: bool = True):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    client.max_inflight_messages_set(MQTT_INFLIGHT_MAX)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", target["port"])
    client.loop_start()
    # Publishing before the CONNACK queues the messages until paho's loop next wakes
    # (up to its 1 s select timeout): a fixed second that is not the broker's.
    if not connected.wait(30):
        raise TimeoutError("MQTT: no CONNACK in 30 s")
    return client


def produce_mqtt(target: dict, payload: bytes, count: int, index: int) -> Iterator[None]:
    qos, topic = target["qos"], target["topic"]
    acked = threading.Semaphore(0)
    client = _mqtt_client(target)
    client.on_publish = lambda *_args: acked.release()
    yield
    publish = client.publish
    for _ in range(count):
        publish(topic, payload, qos=qos)
    if qos == 0:
        # The broker handles one connection's packets in order: when this QoS 1 marker is
        # acknowledged, every QoS 0 message before it has been processed.
        info = client.publish(topic + "/end", b"", qos=1)
        info.wait_for_publish(120)
    else:
        for _ in range(count):
            if not acked.acquire(timeout=120):
                raise TimeoutError("MQTT: a QoS 1 PUBACK did not come in 120 s")
    yield
    client.loop_stop()
    client.disconnect()


PRODUCERS = {"zmq_raw": produce_zmq_raw, "ingest_push": produce_ingest_push, "ingest_sdk": produce_ingest_sdk,
             "nats": produce_nats, "redis": produce_redis, "kafka": produce_kafka, "mqtt": produce_mqtt}


# ---- reading them back ----------------------------------------------------------------------

def read_ingest(target: dict, count: int) -> Iterator[int | None]:
    from ingest import Consumer

    with Consumer(target["bootstrap"], target["topic"], from_beginning=True) as consumer:
        yield
        got = 0
        for _record in consumer.records(idle_timeout_ms=READ_IDLE_TIMEOUT_S * 1000):
            got += 1
            if got == count:
                break
        yield got


def read_redis(target: dict, count: int) -> Iterator[int | None]:
    import redis

    client = redis.Redis(port=target["port"])
    client.ping()
    yield
    got, last = 0, "0"
    while got < count:
        reply = client.xread({target["stream"]: last}, count=READ_CHUNK_RECORDS, block=READ_IDLE_TIMEOUT_S * 1000)
        if not reply:
            break
        entries = reply[0][1]
        got += len(entries)
        last = entries[-1][0]
    yield got
    client.close()


def read_kafka(target: dict, count: int) -> Iterator[int | None]:
    from confluent_kafka import Consumer as KafkaConsumer, TopicPartition, OFFSET_BEGINNING

    consumer = KafkaConsumer({"bootstrap.servers": target["bootstrap"], "group.id": "bench",
                              "enable.auto.commit": False})
    consumer.assign([TopicPartition(target["topic"], p, OFFSET_BEGINNING) for p in range(target["partitions"])])
    yield
    got = 0  # stops at count: the producer's warm-up record is in the topic too
    while got < count:
        # consume() returns when it has num_messages or at the timeout: never ask for more
        # than are left, or the last call waits out the timeout.
        messages = consumer.consume(num_messages=min(READ_CHUNK_RECORDS, count - got), timeout=READ_IDLE_TIMEOUT_S)
        if not messages:
            break
        got += sum(1 for m in messages if m.error() is None)
    yield got
    consumer.close()


def read_nats(target: dict, count: int) -> Iterator[int | None]:
    import nats

    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(target["url"]))
    js = nc.jetstream()
    from nats.js.api import AckPolicy, ConsumerConfig

    # AckAll: acking the last message of each fetch acknowledges the fetch, as a reader
    # that checkpoints per chunk does (explicit acks would cap it at 1,000 pending).
    config = ConsumerConfig(ack_policy=AckPolicy.ALL)
    sub = loop.run_until_complete(js.pull_subscribe(target["subject"], durable="bench-reader", config=config))

    async def fetch_all() -> int:
        got = 0
        while got < count:
            messages = await sub.fetch(batch=1000, timeout=READ_IDLE_TIMEOUT_S)
            got += len(messages)
            await messages[-1].ack()
        return got

    yield
    yield loop.run_until_complete(fetch_all())
    loop.run_until_complete(nc.close())
    loop.close()


READERS = {"ingest_sdk": read_ingest, "redis": read_redis, "kafka": read_kafka, "nats": read_nats}


# ---- latency at a fixed offered rate ----------------------------------------------------------
# One record every 1/rate s on a fixed schedule; a record's latency runs from its scheduled
# time (not the time it was actually sent) to its acknowledgement, so a client that falls
# behind is charged its backlog (no coordinated omission).

def _schedule(rate_per_s: float, count: int):
    """Yields (index, scheduled_time) and sleeps until each scheduled time."""
    started = time.monotonic() + 0.05
    for i in range(count):
        due = started + i / rate_per_s
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i, due


def latency_ingest(target: dict, payload: bytes, rate_per_s: float, count: int) -> list[float]:
    from ingest import Producer

    acked = [0.0] * count
    due_times = [0.0] * count
    with Producer(target["bootstrap"], acks=target["acks"]) as producer:
        producer.send(target["topic"], b"warm-up").result(30)
        futures: list = [None] * count
        sent = threading.Semaphore(0)

        def wait_in_order() -> None:  # acks of one producer come in send order per partition
            for i in range(count):
                sent.acquire()
                futures[i].result(60)
                acked[i] = time.monotonic()

        waiter = threading.Thread(target=wait_in_order)
        waiter.start()
        for i, due in _schedule(rate_per_s, count):
            due_times[i] = due
            futures[i] = producer.send(target["topic"], payload)
            sent.release()
        waiter.join()
    return [a - d for a, d in zip(acked, due_times)]


def latency_nats(target: dict, payload: bytes, rate_per_s: float, count: int) -> list[float]:
    import nats

    async def run() -> list[float]:
        nc = await nats.connect(target["url"])
        js = nc.jetstream()
        await js.publish(target["subject"], b"warm-up")
        latencies = [0.0] * count

        async def one(i: int, due: float) -> None:
            await js.publish(target["subject"], payload)
            latencies[i] = time.monotonic() - due

        tasks = []
        started = time.monotonic() + 0.05
        for i in range(count):
            due = started + i / rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        await nc.close()
        return latencies

    return asyncio.run(run())


def latency_redis(target: dict, payload: bytes, rate_per_s: float, count: int) -> list[float]:
    """XADDs from asyncio tasks, each on a pooled connection, so a slow reply does not hold
    back the records scheduled after it (as JetStream's async publish does not)."""
    import redis.asyncio as aioredis

    async def run() -> list[float]:
        pool = aioredis.BlockingConnectionPool(port=target["port"], max_connections=LATENCY_CONNECTIONS_MAX)
        client = aioredis.Redis(connection_pool=pool)
        await client.xadd(target["stream"], {"v": b"warm-up"})
        latencies = [0.0] * count

        async def one(i: int, due: float) -> None:
            await client.xadd(target["stream"], {"v": payload})
            latencies[i] = time.monotonic() - due

        tasks = []
        started = time.monotonic() + 0.05
        for i in range(count):
            due = started + i / rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        await client.aclose()
        await pool.aclose()
        return latencies

    return asyncio.run(run())


def latency_kafka(target: dict, payload: bytes, rate_per_s: float, count: int) -> list[float]:
    from confluent_kafka import Producer as KafkaProducer

    producer = KafkaProducer({"bootstrap.servers": target["bootstrap"], "acks": "all"})
    producer.produce(target["topic"], b"warm-up")
    producer.flush(30)
    latencies = [0.0] * count

    def stamp(i: int, due: float):
        def on_delivery(error, _message) -> None:
            latencies[i] = time.monotonic() - due if error is None else float("inf")
        return on_delivery

    for i, due in _schedule(rate_per_s, count):
        producer.produce(target["topic"], payload, on_delivery=stamp(i, due))
        producer.poll(0)  # delivery callbacks run in poll(): serve them as they come
    producer.flush(60)
    return latencies


def latency_mqtt(target: dict, payload: bytes, rate_per_s: float, count: int) -> list[float]:
    # Keyed by message id, which paho numbers 1..65535 and then reuses.
    if count >= 65535:
        raise ValueError("latency_mqtt: at most 65,534 records per run")
    acked_at: dict[int, float] = {}
    due_by_mid: dict[int, float] = {}
    all_acked = threading.Event()

    # No lock of ours here: paho calls this holding its own message lock, which publish()
    # takes too. A PUBACK may arrive before publish() has returned its mid: stamp by mid.
    def on_publish(_client, _userdata, mid, *_rest) -> None:
        acked_at[mid] = time.monotonic()
        if len(acked_at) == count:
            all_acked.set()

    client = _mqtt_client(target)
    client.on_publish = on_publish
    for _i, due in _schedule(rate_per_s, count):
        due_by_mid[client.publish(target["topic"], payload, qos=1).mid] = due
    if not all_acked.wait(60):
        raise TimeoutError(f"MQTT: {count - len(acked_at)} PUBACKs missing after 60 s")
    client.loop_stop()
    client.disconnect()
    return [acked_at[mid] - due for mid, due in due_by_mid.items()]


LATENCY = {"ingest_sdk": latency_ingest, "nats": latency_nats, "redis": latency_redis, "kafka": latency_kafka,
           "mqtt": latency_mqtt}


def client_loop(commands, ready, results) -> None:
    """A client process kept for the whole run (starting Python and importing a client
    library costs seconds on a loaded machine, more than many rows take).

    Commands: ("produce", target, payload, count, index), ("read", target, count) or
    ("latency", target, payload, rate_per_s, count); each is set up, answered on ``ready``,
    then run when "go" comes, and reported on ``results`` as (outcome, started, finished,
    cpu_s, error). None ends the loop."""
    while (command := commands.get()) is not None:
        kind, target, *args = command
        answered = False
        try:
            if kind == "latency":
                ready.put(True)
                answered = True
                commands.get()
                results.put((LATENCY[target["driver"]](target, *args), 0.0, 0.0, 0.0, None))
                continue
            if kind == "produce":
                steps = PRODUCERS[target["driver"]](target, *args)
            else:
                steps = READERS[target["driver"]](target, *args)
            next(steps)  # connected and warmed up
            ready.put(True)
            answered = True
            commands.get()  # go
            cpu_before, started = cpu_seconds(), time.monotonic()
            outcome = next(steps)  # the last record acknowledged (or read): the clock stops
            finished, cpu_s = time.monotonic(), cpu_seconds() - cpu_before
            for _ in steps:  # closing connections is not part of the row
                pass
            results.put((outcome, started, finished, cpu_s, None))
        except BaseException as e:  # reported to the harness, which fails the row loudly
            if not answered:
                ready.put(False)
                commands.get()  # the harness sends go (or None) all the same
            results.put((None, 0.0, 0.0, 0.0, f"{type(e).__name__}: {e}"))
