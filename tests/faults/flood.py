"""A load process for the overload test: `python -m tests.faults.flood push|acked ...`.

push:  RECORD frames on a worker's PULL as fast as Python can, with zmq.NOBLOCK, for
       --seconds; every frame either is queued by ZeroMQ (counted in "sent") or would
       block (counted in "would_block", never resent). On exit the socket lingers until
       ZeroMQ has handed every queued frame to the appliance.
acked: acks=fsync BATCH requests, --window of them in flight, for --seconds; then waits
       for the outstanding replies. Prints which batches were acked at which offsets.

Writes one JSON document to --out. Values are b"<id>:<batch or frame>:<record>" padded,
so the test can tell every stored record's origin.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
import zmq

from ingest.net import wire
from ingest.net.errors import ErrorCode
from ingest.shards import batch as batch_codec

# How long a flood process waits, after its time is up, for ZeroMQ to deliver its queued
# frames (push) or for the replies still owed to it (acked).
FINISH_TIMEOUT_S = 60
TORN_FRAME_EVERY = 64


def value(source: int, n: int, r: int, size: int) -> bytes:
    head = b"%d:%d:%d:" % (source, n, r)
    return head + b"." * max(0, size - len(head))


def push(args) -> dict:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, FINISH_TIMEOUT_S * 1000)
    sock.connect(args.endpoint)
    sent = would_block = 0
    deadline = time.monotonic() + args.seconds
    frames = [wire.RecordMessage(topic=args.topic, value=value(args.id, i, 0, args.value_bytes),
                                 partition=i % args.partitions).encode() for i in range(4096)]
    # One frame in TORN_FRAME_EVERY is cut short, as from a device that lost power
    # mid-send: the appliance must count it invalid, not store it, not crash.
    for i in range(0, len(frames), TORN_FRAME_EVERY):
        frames[i] = frames[i][: len(frames[i]) // 2]
    while time.monotonic() < deadline:
        for frame in frames:  # the same 4096 frames over and over: counts are what matter
            try:
                sock.send(frame, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                would_block += 1
    started = time.monotonic()
    sock.close()  # lingers until every queued frame is handed over
    zmq.Context.instance().term()
    return {"sent": sent, "would_block": would_block, "linger_s": round(time.monotonic() - started, 2)}


def acked(args) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.endpoint)
    batches: dict[int, tuple[int, int]] = {}  # correlation id -> (batch number, partition)
    acks, errors, n = [], {}, 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline or (batches and time.monotonic() < deadline + FINISH_TIMEOUT_S):
        while len(batches) < args.window and time.monotonic() < deadline:
            partition = args.partition_list[n % len(args.partition_list)]
            records = [batch_codec.Record(0, int(time.time() * 1000), None, value(args.id, n, r, args.value_bytes))
                       for r in range(args.records_per_batch)]
            sock.send(wire.BatchMessage(topic=args.topic, partition=partition, batch=batch_codec.encode_batch(records),
                                        acks=wire.Durability.FSYNC, correlation_id=n + 1).encode())
            batches[n + 1] = (n, partition)
            n += 1
        if not sock.poll(100):
            continue
        reply = wire.decode_reply(sock.recv())
        batch_number, partition = batches.pop(reply.correlation_id)
        if isinstance(reply, wire.ProduceReply):
            acks.append((batch_number, partition, reply.base_offset, reply.last_offset))
        else:
            name = ErrorCode(reply.error_code).name
            errors[name] = errors.get(name, 0) + 1
    return {"sent": n, "acks": acks, "errors": errors, "unanswered": sorted(b for b, _ in batches.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.flood")
    parser.add_argument("mode", choices=["push", "acked"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--partitions", type=int, default=1, help="push: partitions to spread frames over")
    parser.add_argument("--partition-list", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                        dest="partition_list", help="acked: partitions this endpoint owns")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--records-per-batch", type=int, default=100)
    parser.add_argument("--value-bytes", type=int, default=32)
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    args = parser.parse_args(argv)
    result = push(args) if args.mode == "push" else acked(args)
    with open(args.out, "wb") as f:
        f.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
