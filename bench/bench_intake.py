"""Fire-and-forget intake next to its ceiling, in one run on this machine.

    python -m bench.bench_intake [--records N] [--value-bytes B] [--repeats R]

1. raw pyzmq PUSH -> PULL: a Python sender process, a Python receiver process that only
   counts frames (copy=True recv loop). This is the ceiling of the transport.
2. ingest PUSH single records: the same sender loop sending RECORD frames (pre-encoded,
   100 B values, null key) to one worker of `ingest serve --workers 1`; the clock stops
   when the log end offset (LIST_OFFSETS) reaches N, i.e. every record is in the log.
3. the same with the raw listener (frames are bare values).

Prints records/s and the ratio to the ceiling. Results go to bench/RESULTS.md by hand,
with this command line.
"""

from __future__ import annotations

import argparse
import statistics
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import zmq

from ingest.net import wire
from tests.support import Appliance

SNDHWM = 1_000_000
CEILING = "raw pyzmq PUSH->PULL (ceiling)"


def _sender(endpoint: str, frame: bytes, count: int, ready, go) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, SNDHWM)
    s.connect(endpoint)
    ready.set()
    go.wait()
    send = s.send
    for _ in range(count):
        send(frame)
    s.close(linger=-1)
    ctx.term()


def _counting_receiver(endpoint: str, count: int, result) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, SNDHWM)
    s.bind(endpoint)
    recv = s.recv
    recv()
    started = time.perf_counter()
    for _ in range(count - 1):
        recv()
    result.value = time.perf_counter() - started
    s.close()
    ctx.term()


def raw_ceiling(frame: bytes, count: int, port: int) -> float:
    endpoint = f"tcp://127.0.0.1:{port}"
    elapsed = mp.Value("d", 0.0)
    receiver = mp.Process(target=_counting_receiver, args=(endpoint, count, elapsed))
    receiver.start()
    time.sleep(0.3)
    ready, go = mp.Event(), mp.Event()
    sender = mp.Process(target=_sender, args=(endpoint, frame, count, ready, go))
    sender.start()
    ready.wait()
    go.set()
    sender.join()
    receiver.join()
    return count / elapsed.value


def log_end(app: Appliance, topic: str, partition: int) -> int:
    reply = app.request(app.owner_router(partition),
                        wire.ListOffsetsRequest(topic=topic, partition=partition, timestamp_ms=wire.LATEST_TIMESTAMP))
    return reply.offset


def ingest_rate(app: Appliance, endpoint: str, frame: bytes, count: int, topic: str) -> float:
    before = log_end(app, topic, 0)
    ready, go = mp.Event(), mp.Event()
    sender = mp.Process(target=_sender, args=(endpoint, frame, count, ready, go))
    sender.start()
    ready.wait()
    started = time.perf_counter()
    go.set()
    while log_end(app, topic, 0) - before < count:
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    sender.join()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    value = b"x" * args.value_bytes
    record_frame = wire.RecordMessage(topic="bench", value=value).encode()
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance(Path(tmp) / "data", workers=1)
        app.config_text = f'[[topic]]\nname = "bench"\npartitions = 1\nraw_port = {app.port + 30}\n'
        app.start()
        try:
            push_endpoint = app.worker_endpoints(0)[0]
            raw_endpoint = f"tcp://127.0.0.1:{app.port + 30}"
            runs: dict[str, list[float]] = {}
            for _ in range(args.repeats):  # interleaved, so the machine's noise hits every row alike
                runs.setdefault(CEILING, []).append(raw_ceiling(value, args.records, app.port + 35))
                runs.setdefault("ingest PUSH single RECORD frames", []).append(
                    ingest_rate(app, push_endpoint, record_frame, args.records, "bench"))
                runs.setdefault("ingest raw listener (bare values)", []).append(
                    ingest_rate(app, raw_endpoint, value, args.records, "bench"))
        finally:
            app.stop()
    rows = [(name, statistics.median(rates)) for name, rates in runs.items()]
    ceiling = rows[0][1]
    print(f"{args.records} records of {args.value_bytes} B, one sender process, ingest --workers 1, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'path':40} {'records/s':>12} {'vs ceiling':>10}")
    for name, rate in rows:
        print(f"{name:40} {rate:12,.0f} {rate / ceiling:10.2f}")


if __name__ == "__main__":
    main()
