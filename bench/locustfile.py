"""A device swarm for locust: thousands of devices pushing telemetry to ingest over ZeroMQ.

    ingest serve --workers 2 --data-dir /tmp/swarm &
    INGEST_SWARM_DEVICES_PER_USER=100 INGEST_SWARM_INTERVAL_MS=1000 \\
        locust -f bench/locustfile.py --headless --host tcp://127.0.0.1:7400 \\
        --users 50 --spawn-rate 50 --run-time 60s --only-summary

Each locust user is a gateway of ``INGEST_SWARM_DEVICES_PER_USER`` devices (so 50 users
are 5,000 devices, each its own record key ``dev-<user>-<n>``), and every
``INGEST_SWARM_INTERVAL_MS`` it sends one ~300-B JSON reading per device as RECORD frames
on a PUSH socket, fire-and-forget, as the firmware does. locust's ``events.request`` fires
once per batch (one per user per interval): response time is the time to hand the batch to
ZeroMQ, length its bytes; a send that fails (a full queue) is a failure. When the test
stops, the swarm asks every partition for its log end and prints how many of the records
sent are in the log: with fire-and-forget, stored / sent is the number that matters.

Sockets are pyzmq's gevent flavour (zmq.green), as locust runs users as greenlets.
"""

from __future__ import annotations

import itertools
import os
import time

import orjson
import zmq.green as zmq
from locust import User, constant_pacing, events, task

from ingest.net import wire

TOPIC = os.environ.get("INGEST_SWARM_TOPIC", "swarm")
DEVICES_PER_USER = int(os.environ.get("INGEST_SWARM_DEVICES_PER_USER", "100"))
INTERVAL_MS = int(os.environ.get("INGEST_SWARM_INTERVAL_MS", "1000"))
# A gateway's queue: readings beyond it are refused (counted as failures), not buffered
# without bound in the locust process.
SNDHWM_FRAMES = 100_000
REQUEST_TIMEOUT_MS = 5000

_context = zmq.Context.instance()
_user_ids = itertools.count()
_sent_records = 0
_metadata: dict = {}


def _request(endpoint: str, message) -> object:
    sock = _context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(message.encode())
        if not sock.poll(REQUEST_TIMEOUT_MS):
            raise TimeoutError(f"no reply from {endpoint} in {REQUEST_TIMEOUT_MS} ms")
        return wire.decode_reply(sock.recv())
    finally:
        sock.close()


def _metadata_of(host: str) -> dict:
    if not _metadata:
        document = _request(host, wire.MetadataRequest(correlation_id=1)).document
        if TOPIC not in document["topics"]:  # the appliance's default partition count
            partitions = document.get("default_partitions") or document["worker_count"]
            _request(host, wire.CreateTopicRequest(topic=TOPIC, partitions=partitions))
            document = _request(host, wire.MetadataRequest(correlation_id=2)).document
        _metadata.update(document)
    return _metadata


def _log_end_total(document: dict) -> int:
    workers = {w["id"]: w for w in document["workers"]}
    total = 0
    for partition in range(document["topics"][TOPIC]["partitions"]):
        owner = workers[partition % document["worker_count"]]
        reply = _request(owner["router"], wire.ListOffsetsRequest(topic=TOPIC, partition=partition,
                                                                  timestamp_ms=wire.LATEST_TIMESTAMP))
        total += reply.offset
    return total


class DeviceGateway(User):
    """``DEVICES_PER_USER`` devices behind one PUSH socket, one reading each per interval."""

    wait_time = constant_pacing(INTERVAL_MS / 1000)

    def on_start(self) -> None:
        document = _metadata_of(self.host)
        user = next(_user_ids)
        worker = document["workers"][user % document["worker_count"]]
        self.sock = _context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, SNDHWM_FRAMES)
        self.sock.connect(worker["pull"])
        self.keys = [b"dev-%05d-%04d" % (user, n) for n in range(DEVICES_PER_USER)]
        self.seq = 0

    def on_stop(self) -> None:
        self.sock.close(linger=2000)

    @task
    def report(self) -> None:
        global _sent_records
        self.seq += 1
        now_ms = int(time.time() * 1000)
        frames = [wire.RecordMessage(topic=TOPIC, key=key, value=orjson.dumps(
            {"device_id": key.decode(), "ts_ms": now_ms, "seq": self.seq, "temperature_c": 21.5,
             "humidity_pct": 45.2, "battery_v": 3.71, "rssi_dbm": -67, "status": "ok"})).encode()
            for key in self.keys]
        started = time.perf_counter()
        error = None
        try:
            for frame in frames:
                self.sock.send(frame, zmq.NOBLOCK)
                _sent_records += 1
        except zmq.Again as e:
            error = e
        events.request.fire(request_type="PUSH", name=f"batch of {DEVICES_PER_USER} readings",
                            response_time=(time.perf_counter() - started) * 1000,
                            response_length=sum(map(len, frames)), exception=error, context={})


@events.test_stop.add_listener
def _report_stored(environment, **_kwargs) -> None:
    if not _metadata:
        return
    time.sleep(2)  # the appliance's intake and group commit settle
    stored = _log_end_total(_metadata)
    print(f"swarm: {_sent_records:,} readings sent, {stored:,} in the log of topic {TOPIC!r} "
          f"({stored / max(1, _sent_records):.4f} of sent; includes earlier runs on the same topic)")
