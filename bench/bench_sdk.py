"""The client SDK next to its ceiling, in one run on this machine.

    python -m bench.bench_sdk [--records N] [--value-bytes B] [--repeats R] [--append FILE]

1. send() alone: ns per call into an accumulator that is not drained during the timing
   (a stand-in bootstrap answers METADATA; no appliance), next to a plain Python call
   that appends to a list, the floor of any Python API.
2. Against `ingest serve --workers 2` (started here, temporary data directory): records/s
   of 100-B values with 10-B keys from one Python thread, counted from the first send()
   to flush() returning with every record acknowledged:
   send() with acks=1 and acks=fsync, send_batch() with acks=fsync, then reading them
   back with Consumer iteration (one Record per record) and poll_batch() (columns).
3. The ceiling: raw pyzmq PUSH -> PULL of the same values, one frame per record, from
   this process to a receiver process that only counts them.
4. Acked latency at 50% load: send() with acks=fsync paced at half the rate measured for
   send() in step 2, for ``--latency-seconds``; every LATENCY_SAMPLE_EVERY-th record's
   future is awaited by a second thread, which notes send-to-ack time (p50/p99/p99.9).
   Once with the defaults, once more against a second appliance whose group commit waits
   EAGER_FLUSH_INTERVAL_MS for more appends instead of 5 ms.

Median of ``--repeats`` runs each. The appliance, this client and the receiver share the
machine's cores, as they would on a gateway.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import zmq

from ingest import Consumer, Producer, __version__
from ingest.net import wire
from ingest.net.client import BootstrapClient
from tests.support import Appliance, free_port_block

KEYS = [b"device-%03d" % i for i in range(1000)]
# One record in this many is timed from send() to its ack: enough samples for p99.9 in a
# few seconds, few enough futures that keeping them costs the sender nothing measurable.
LATENCY_SAMPLE_EVERY = 50
# The paced sender sends a burst every tick: 1 ms is below the latencies being measured.
PACE_TICK_S = 0.001
# flush_interval_ms of the latency run that shows what the group commit's wait costs.
EAGER_FLUSH_INTERVAL_MS = 1
# Calls per send() timing round: below the accumulator's first drain threshold
# (batch_bytes // 128 records), so that the timing holds calls only.
CALLS_PER_ROUND = 50_000


# ---- 1. the call alone -------------------------------------------------------------------

def _stand_in_bootstrap(context: zmq.Context) -> str:
    """A ROUTER that answers METADATA with one topic on an unreachable worker."""
    sock = context.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    document = {"worker_count": 1, "topics": {"t": {"partitions": 8}}, "auto_create_topics": False,
                "workers": [{"id": 0, "pull": "tcp://127.0.0.1:9", "router": "tcp://127.0.0.1:9", "up": True}]}

    def serve() -> None:
        while True:
            try:
                identity, frame = sock.recv_multipart()
            except zmq.ContextTerminated:
                sock.close()
                return
            request = wire.decode_request(frame)
            sock.send_multipart([identity, wire.MetadataReply(document, request.correlation_id).encode()])

    threading.Thread(target=serve, daemon=True).start()
    return f"tcp://127.0.0.1:{port}"


def bench_send_call(value_bytes: int, repeats: int) -> dict:
    values = [os.urandom(value_bytes) for _ in range(1000)]
    sink: list = []

    def plain(topic, value, key=None):  # the floor: a Python call that appends to a list
        sink.append(value)

    def timed(call, keyed: bool) -> float:
        args = [("t", values[i % 1000], KEYS[i % 1000] if keyed else None) for i in range(CALLS_PER_ROUND)]
        gc.disable()
        started = time.perf_counter()
        for topic, value, key in args:
            call(topic, value, key)
        elapsed = time.perf_counter() - started
        gc.enable()
        return elapsed / CALLS_PER_ROUND * 1e9

    context = zmq.Context()
    bootstrap = _stand_in_bootstrap(context)
    rows = {"plain": [], "send": [], "send_keyed": []}
    for _ in range(repeats):
        sink.clear()
        rows["plain"].append(timed(plain, True))
        for name, keyed in (("send", False), ("send_keyed", True)):
            producer = Producer(bootstrap, acks=1, linger_ms=60_000, batch_bytes=8 << 20)
            producer.send("t", b"warm-up")
            rows[name].append(timed(producer.send, keyed))
            producer.close(timeout=0)
    context.term()
    return {name: statistics.median(ns) for name, ns in rows.items()}


# ---- 2. against the appliance ------------------------------------------------------------

def _produce(bootstrap: str, topic: str, acks, values: list, use_batch: bool | str,
             keep_futures: bool = True, curve=None) -> float:
    count = len(values)
    with Producer(bootstrap, acks=acks, curve=curve) as producer:
        producer.send(topic, b"warm-up").result(30)  # metadata, connections, numba loaded
        chunk = 10_000  # a gateway's worth of readings per call
        keys = [KEYS[i % 1000] for i in range(count)]
        if use_batch == "buffer":  # readings as they sit in a gateway's receive buffer
            chunks = [(b"".join(values[i:i + chunk]), [len(v) for v in values[i:i + chunk]],
                       b"".join(keys[i:i + chunk]), [len(k) for k in keys[i:i + chunk]])
                      for i in range(0, count, chunk)]
        started = time.perf_counter()
        if use_batch == "buffer":
            futures = [producer.send_batch(topic, v, keys=k, value_lengths=vn, key_lengths=kn)
                       for v, vn, k, kn in chunks]
        elif use_batch:
            futures = [producer.send_batch(topic, values[i:i + chunk], keys=keys[i:i + chunk])
                       for i in range(0, count, chunk)]
        elif keep_futures:
            send = producer.send
            futures = [send(topic, values[i], KEYS[i % 1000]) for i in range(count)]
        else:
            send = producer.send
            for i in range(count - 1):
                send(topic, values[i], KEYS[i % 1000])
            futures = [send(topic, values[-1], KEYS[(count - 1) % 1000])]
        producer.flush()
        elapsed = time.perf_counter() - started
        futures[-1].result(0)
    return count / elapsed


def _consume(bootstrap: str, topic: str, count: int, columns: bool, curve=None) -> float:
    with Consumer(bootstrap, topic, from_beginning=True, curve=curve) as consumer:
        got = 0
        started = time.perf_counter()
        if columns:
            while got < count:
                chunk = consumer.poll_batch(timeout_ms=10_000)
                if chunk is None:
                    raise RuntimeError(f"poll_batch: only {got} of {count} records")
                got += len(chunk)
        else:
            for _record in consumer.records(idle_timeout_ms=10_000):
                got += 1
                if got == count:
                    break
        elapsed = time.perf_counter() - started
    if got < count:
        raise RuntimeError(f"read {got} of {count} records")
    return got / elapsed


def bench_acked_latency(bootstrap: str, topic: str, values: list, rate: float, seconds: float) -> dict:
    """send() latencies (ms) to acks=fsync at ``rate`` records/s for ``seconds``."""
    samples: list[tuple[float, object]] = []
    latencies_ms: list[float] = []
    arrived = threading.Condition()
    finished = False

    def await_acks() -> None:  # resolves in send order per partition; the clock stops at the ack seen
        taken = 0
        while True:
            with arrived:
                while taken == len(samples) and not finished:
                    arrived.wait()
                if taken == len(samples):
                    return
                sent_s, future = samples[taken]
            taken += 1
            future.result(60)
            latencies_ms.append((time.perf_counter() - sent_s) * 1000)

    with Producer(bootstrap, acks="fsync") as producer:
        producer.send(topic, b"warm-up").result(30)
        waiter = threading.Thread(target=await_acks, daemon=True)
        waiter.start()
        send, count, sent = producer.send, len(values), 0
        started = time.perf_counter()
        while (now := time.perf_counter()) - started < seconds:
            due = int((now - started) * rate)  # records that should have gone by now
            while sent < due:
                i = sent % count
                if sent % LATENCY_SAMPLE_EVERY:
                    send(topic, values[i], KEYS[i % 1000])
                else:
                    future = send(topic, values[i], KEYS[i % 1000])
                    with arrived:
                        samples.append((time.perf_counter(), future))
                        arrived.notify()
                sent += 1
            time.sleep(PACE_TICK_S)
        elapsed = time.perf_counter() - started
        producer.flush()
        with arrived:
            finished = True
            arrived.notify()
        waiter.join()
    ordered = sorted(latencies_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"rate": sent / elapsed, "samples": len(ordered), "p50": pick(0.50), "p99": pick(0.99),
            "p999": pick(0.999), "max": ordered[-1]}


# ---- 3. the ceiling -----------------------------------------------------------------------

def _count_frames(endpoint: str, count: int, done) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    done.put("bound")
    recv = sock.recv
    for _ in range(count):
        recv()
    done.put(time.monotonic())
    sock.close()
    context.term()


def bench_zmq_ceiling(values: list) -> float:
    """records/s of raw PUSH -> PULL, one frame per value, first send to last receive."""
    count = len(values)
    port = free_port_block(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    done = mp.get_context("spawn").Queue()
    receiver = mp.get_context("spawn").Process(target=_count_frames, args=(endpoint, count, done))
    receiver.start()
    done.get(timeout=30)
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    time.sleep(0.2)  # connected before the clock starts
    send = sock.send
    started = time.monotonic()
    for value in values:
        send(value)
    finished = done.get(timeout=120)
    receiver.join()
    sock.close()
    context.term()
    return count / (finished - started)


# ---- report -------------------------------------------------------------------------------

def _median(repeats: int, run) -> float:
    return statistics.median(run() for _ in range(repeats))


def run(args) -> tuple[dict, dict, dict]:
    values = [os.urandom(args.value_bytes) for _ in range(args.records)]
    calls = bench_send_call(args.value_bytes, args.repeats)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance(Path(tmp) / "data", workers=2).start()
        try:
            with BootstrapClient(app.bootstrap) as bootstrap:
                for topic in ("acks1", "fsync", "batch"):
                    bootstrap.create_topic(topic, 4)
            rates["ceiling"] = _median(args.repeats, lambda: bench_zmq_ceiling(values))
            rates["send_acks1"] = _median(args.repeats, lambda: _produce(app.bootstrap, "acks1", 1, values, False))
            rates["send_fsync"] = _median(args.repeats, lambda: _produce(app.bootstrap, "fsync", "fsync", values, False))
            rates["send_fsync_dropped"] = _median(
                args.repeats, lambda: _produce(app.bootstrap, "fsync", "fsync", values, False, keep_futures=False))
            rates["batch_fsync"] = _median(args.repeats, lambda: _produce(app.bootstrap, "batch", "fsync", values, True))
            rates["batch_buffer_fsync"] = _median(
                args.repeats, lambda: _produce(app.bootstrap, "batch", "fsync", values, "buffer"))
            rates["iterate"] = _median(args.repeats, lambda: _consume(app.bootstrap, "fsync", args.records, False))
            rates["poll_batch"] = _median(args.repeats, lambda: _consume(app.bootstrap, "fsync", args.records, True))
            latency = {"default": bench_acked_latency(app.bootstrap, "fsync", values, rates["send_fsync_dropped"] / 2,
                                                      args.latency_seconds)}
        finally:
            app.stop()
        # The same load with the group commit waiting 1 ms instead of 5 for more appends.
        app = Appliance(Path(tmp) / "eager", workers=2,
                        config_text=f"[storage]\nflush_interval_ms = {EAGER_FLUSH_INTERVAL_MS}\n")
        app.start()
        try:
            with BootstrapClient(app.bootstrap) as bootstrap:
                bootstrap.create_topic("fsync", 4)
            latency["eager"] = bench_acked_latency(app.bootstrap, "fsync", values, rates["send_fsync_dropped"] / 2,
                                                   args.latency_seconds)
        finally:
            app.stop()
    return calls, rates, latency


def report(args, calls: dict, rates: dict, latency: dict) -> str:
    ceiling = rates["ceiling"]
    lines = [
        f"`.venv/bin/python -m bench.bench_sdk --records {args.records} --value-bytes {args.value_bytes} "
        f"--repeats {args.repeats} --latency-seconds {args.latency_seconds:g}` — {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, ingest {__version__}; median of {args.repeats} runs; appliance "
        f"`ingest serve --workers 2` on the same cores.",
        "",
        f"send() alone ({CALLS_PER_ROUND:,} calls, {args.value_bytes}-B values, no drain in the timing):",
        "",
        "| call | ns/call | vs plain call |",
        "|---|---:|---:|",
        f"| plain Python call appending to a list (floor) | {calls['plain']:.0f} | 1.0x |",
        f"| Producer.send(topic, value) | {calls['send']:.0f} | {calls['send'] / calls['plain']:.1f}x |",
        f"| Producer.send(topic, value, key) | {calls['send_keyed']:.0f} | {calls['send_keyed'] / calls['plain']:.1f}x |",
        "",
        f"{args.records:,} records of {args.value_bytes} B with 10-B keys, 4 partitions, one client thread "
        f"(produce: first send() to flush() done, every record acknowledged; 'futures kept': a list holds "
        f"every RecordFuture, as `ingest produce` does):",
        "",
        "| path | records/s | MB/s of values | vs PUSH->PULL ceiling |",
        "|---|---:|---:|---:|",
    ]
    names = [("ceiling", "raw pyzmq PUSH->PULL, one frame per record (ceiling)"),
             ("send_acks1", "Producer.send(), acks=1, futures kept"),
             ("send_fsync", "Producer.send(), acks=fsync, futures kept"),
             ("send_fsync_dropped", "Producer.send(), acks=fsync, futures not kept"),
             ("batch_fsync", "Producer.send_batch() of 10,000, acks=fsync"),
             ("batch_buffer_fsync", "Producer.send_batch() of 10,000 from one buffer + lengths, acks=fsync"),
             ("iterate", "Consumer.records() iteration"), ("poll_batch", "Consumer.poll_batch() columns")]
    for key, label in names:
        rate = rates[key]
        lines.append(f"| {label} | {rate:,.0f} | {rate * args.value_bytes / 1e6:.1f} | {rate / ceiling:.2f}x |")
    default = latency["default"]
    lines += [
        "",
        f"Acked latency at 50% load: send() with acks=fsync paced at {default['rate']:,.0f} records/s (half the "
        f"'futures not kept' rate) for {args.latency_seconds:g} s; send() to ack of every "
        f"{LATENCY_SAMPLE_EVERY}th record. Defaults: the producer's linger_ms 5 and the appliance's "
        f"flush_interval_ms 5 (group commit); then a second appliance with flush_interval_ms "
        f"{EAGER_FLUSH_INTERVAL_MS}, same load:",
        "",
        "| settings | samples | p50 ms | p99 ms | p99.9 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("default", "linger_ms 5, flush_interval_ms 5 (defaults)"),
                        ("eager", f"linger_ms 5, flush_interval_ms {EAGER_FLUSH_INTERVAL_MS}")):
        row = latency[name]
        lines.append(f"| {label} | {row['samples']:,} | {row['p50']:.2f} | {row['p99']:.2f} | "
                     f"{row['p999']:.2f} | {row['max']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_sdk", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--append", help="append the section to this Markdown file")
    args = parser.parse_args(argv)
    calls, rates, latency = run(args)
    text = report(args, calls, rates, latency)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(f"\n## Client SDK: Producer and Consumer (bench/bench_sdk.py)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
