"""ingest side by side with what users would otherwise pick, in one run on this machine.

    python -m bench.compare [--full] [--records N] [--systems zmq,ingest,nats,redis,tansu,mqtt]

Every system is started here on loopback on free ports with its data in a temporary
directory, and stopped afterwards (bench/peers.py). Each is given the same payloads
(bench/payloads.py), the same record count and the same number of producer processes
(1 and 2), with Python clients (bench/loads.py). Every row names what its ack means.
Results go to bench/results/<date>.json; `python -m bench.report` turns that into the
tables of bench/RESULTS.md and the PNG plots (run by this command at the end).

Quick (the default, `make bench`): 50,000 records per row, 2 producers for the JSON
telemetry payload only. Full (`make bench-full`): 1,000,000 records per row, every payload
with 1 and 2 producers, longer latency runs. The peers are installed by
bench/install-peers.sh.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from bench import measure, peers
from bench.payloads import PAYLOADS

RESULTS_DIR = Path(__file__).parent / "results"
SYSTEMS = ("zmq", "ingest", "nats", "redis", "tansu", "mqtt")
# The latency runs offer records at this rate, below every system's one-producer capacity
# measured here (mosquitto QoS 1 from paho is the lowest, ~8,000/s), so they measure
# latency, not a queue that grows.
LATENCY_RATE_PER_S = 2000
LATENCY_PAYLOAD = "300 B JSON"


@dataclass
class Plan:
    records: int
    latency_records: int
    payloads: list[str] = field(default_factory=lambda: list(PAYLOADS))
    producers: list[int] = field(default_factory=lambda: [1, 2])
    # Quick: more than one producer only for the telemetry payload, the fleet's case.
    all_producers_for: set[str] | None = None
    rows: list[dict] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pool: measure.ClientPool | None = None

    def cases(self):
        for payload in self.payloads:
            for producers in self.producers:
                if producers == self.producers[0] or self.all_producers_for is None or \
                        payload in self.all_producers_for:
                    yield payload, producers

    def produce(self, pids: list[int], target: dict, payload: str, producers: int, done_at=None):
        """The run of a produce row, for row()."""
        return lambda: measure.run_produce(self.pool, pids, target, PAYLOADS[payload], self.records, producers,
                                           done_at)

    def read(self, pids: list[int], target: dict, payload: str):
        """The run of a read row (one reader), for row()."""
        return lambda: measure.run_read(self.pool, pids, target, self.records, len(PAYLOADS[payload]))

    def row(self, system: str, mode: str, ack: str, kind: str, payload: str, producers: int, run) -> None:
        """Runs one row; a failed row is recorded with its error and the run goes on."""
        label = f"{system} {mode}"
        print(f"  {kind:7} {label:42} {payload:13} x{producers} ...", end=" ", flush=True)
        entry = {"kind": kind, "system": system, "mode": mode, "ack": ack, "payload": payload,
                 "value_bytes": len(PAYLOADS[payload]), "producers": producers}
        try:
            entry.update(run())
            print(f"{entry['records_per_s']:>12,.0f} rec/s {entry['cpu_s_per_million']:7.2f} cpu-s/M", flush=True)
        except Exception as e:  # noqa: BLE001 - a benchmark row, reported, not hidden
            entry["error"] = f"{type(e).__name__}: {e}"
            self.errors.append(f"{label} {payload} x{producers}: {entry['error']}")
            print(f"FAILED: {entry['error']}", flush=True)
        self.rows.append(entry)

    def latency_row(self, system: str, mode: str, ack: str, target: dict) -> None:
        label = f"{system} {mode}"
        print(f"  latency {label:42} {LATENCY_RATE_PER_S}/s ...", end=" ", flush=True)
        entry = {"system": system, "mode": mode, "ack": ack, "payload": LATENCY_PAYLOAD}
        try:
            entry.update(measure.run_latency(self.pool, target, PAYLOADS[LATENCY_PAYLOAD], LATENCY_RATE_PER_S,
                                             self.latency_records))
            print(f"p50 {entry['p50_ms']} ms p99 {entry['p99_ms']} ms p99.9 {entry['p999_ms']} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"
            self.errors.append(f"latency {label}: {entry['error']}")
            print(f"FAILED: {entry['error']}", flush=True)
        self.latency.append(entry)


def _case_name(prefix: str, payload: str, producers: int) -> str:
    return f"{prefix}-{len(PAYLOADS[payload])}b-{producers}p"


# ---- raw pyzmq ------------------------------------------------------------------------------

def _count_frames(endpoint: str, count: int, ready, finished, stop) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    ready.set()
    recv = sock.recv
    for _ in range(count):
        recv()
    finished.value = time.monotonic()
    stop.wait(measure.ROW_TIMEOUT_S)  # alive until its CPU time has been read
    sock.close()
    context.term()


def bench_zmq(plan: Plan, root: Path) -> None:
    """The ceiling of our transport: PUSH -> PULL, a receiver process that only counts."""
    for payload, producers in plan.cases():
        def run() -> dict:
            endpoint = f"tcp://127.0.0.1:{peers.free_port_block(1)}"
            spawn = measure.SPAWN
            ready, stop, finished = spawn.Event(), spawn.Event(), spawn.Value("d", 0.0)
            receiver = spawn.Process(target=_count_frames, args=(endpoint, plan.records, ready, finished, stop))
            receiver.start()
            try:
                ready.wait(30)
                target = {"driver": "zmq_raw", "endpoint": endpoint}
                return plan.produce([receiver.pid], target, payload, producers, done_at=lambda: measure.poll_until(
                    lambda: finished.value > 0) and finished.value)()
            finally:
                stop.set()
                receiver.join(10)
                if receiver.is_alive():
                    receiver.kill()
        plan.row("pyzmq", "PUSH->PULL (ceiling)", peers.ACK_NONE, "produce", payload, producers, run)


# ---- ingest -----------------------------------------------------------------------------------

def _log_end_total(system: peers.Ingest, topic: str) -> int:
    from ingest.net import wire

    total = 0
    for partition in range(system.workers):
        reply = system.app.request(system.app.owner_router(partition), wire.ListOffsetsRequest(
            topic=topic, partition=partition, timestamp_ms=wire.LATEST_TIMESTAMP))
        total += reply.offset
    return total


def bench_ingest(plan: Plan, root: Path) -> None:
    from ingest.net.client import BootstrapClient

    with peers.Ingest(root) as system:
        pids = system.pids()
        with BootstrapClient(system.bootstrap) as bootstrap:
            for payload, producers in plan.cases():
                for prefix in ("push", "acks1", "fsync"):
                    bootstrap.create_topic(_case_name(prefix, payload, producers), system.workers)
            bootstrap.create_topic("latency", system.workers)
        for payload, producers in plan.cases():
            for mode, target_topic, raw in (("PUSH RECORD frames", _case_name("push", payload, producers), False),
                                            ("raw listener", system.RAW_TOPIC, True)):
                def run(topic=target_topic, raw=raw) -> dict:
                    before = _log_end_total(system, topic)
                    endpoints = [system.raw_endpoint] if raw else [system.push_endpoint(i) for i in range(producers)]
                    target = {"driver": "ingest_push", "endpoints": endpoints, "topic": topic, "raw": raw}
                    return plan.produce(pids, target, payload, producers, done_at=lambda: measure.poll_until(
                        lambda: _log_end_total(system, topic) - before >= plan.records))()
                plan.row("ingest", mode, peers.ACK_NONE, "produce", payload, producers, run)
            for mode, acks, ack in (("SDK send() acks=1", 1, peers.ACK_WRITTEN),
                                    ("SDK send() acks=fsync", "fsync", peers.ACK_FSYNCED)):
                target = {"driver": "ingest_sdk", "bootstrap": system.bootstrap, "acks": acks,
                          "topic": _case_name("fsync" if acks == "fsync" else "acks1", payload, producers)}
                plan.row("ingest", mode, ack, "produce", payload, producers,
                         plan.produce(pids, target, payload, producers))
            if producers == plan.producers[0]:
                target = {"driver": "ingest_sdk", "bootstrap": system.bootstrap,
                          "topic": _case_name("fsync", payload, producers)}
                plan.row("ingest", "Consumer records()", peers.ACK_FSYNCED, "read", payload, 1,
                         plan.read(pids, target, payload))
        for mode, acks, ack in (("SDK acks=1", 1, peers.ACK_WRITTEN), ("SDK acks=fsync", "fsync", peers.ACK_FSYNCED)):
            plan.latency_row("ingest", mode, ack, {"driver": "ingest_sdk", "bootstrap": system.bootstrap,
                                                   "acks": acks, "topic": "latency"})


# ---- NATS ---------------------------------------------------------------------------------------

def _nats_stream(url: str, name: str, delete: bool = False) -> int:
    """Creates (or deletes) a file-storage stream on subject ``name``; returns its messages."""
    import asyncio

    import nats
    from nats.js.api import StorageType, StreamConfig

    async def go() -> int:
        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            if delete:
                info = await js.stream_info(name)
                await js.delete_stream(name)
                return info.state.messages
            await js.add_stream(StreamConfig(name=name, subjects=[name], storage=StorageType.FILE))
            return 0
        finally:
            await nc.close()

    return asyncio.run(go())


def bench_nats(plan: Plan, root: Path) -> None:
    with peers.NatsServer(root) as server:
        pids = server.pids()
        for payload, producers in plan.cases():
            core = {"driver": "nats", "url": server.url, "jetstream": False, "subject": "core"}
            plan.row("NATS", "core publish", peers.ACK_NONE, "produce", payload, producers,
                     plan.produce(pids, core, payload, producers))
            stream = _case_name("js", payload, producers)
            _nats_stream(server.url, stream)
            js = {"driver": "nats", "url": server.url, "jetstream": True, "subject": stream}
            plan.row("NATS", "JetStream publish_async (file)", server.ACK_JETSTREAM, "produce", payload, producers,
                     plan.produce(pids, js, payload, producers))
            if producers == plan.producers[0]:
                plan.row("NATS", "JetStream pull fetch", server.ACK_JETSTREAM, "read", payload, 1,
                         plan.read(pids, js, payload))
            stored = _nats_stream(server.url, stream, delete=True)
            if stored != plan.records:
                plan.errors.append(f"NATS stream {stream}: {stored} messages stored, {plan.records} sent")
        _nats_stream(server.url, "latency")
        plan.latency_row("NATS", "JetStream publish (file)", server.ACK_JETSTREAM,
                         {"driver": "nats", "url": server.url, "subject": "latency"})


# ---- Redis ----------------------------------------------------------------------------------------

def bench_redis(plan: Plan, root: Path) -> None:
    import redis

    with peers.RedisServer(root) as server:
        pids = server.pids()
        admin = redis.Redis(port=server.port)
        for fsync in ("everysec", "always"):
            admin.config_set("appendfsync", fsync)
            ack = server.ACK_BY_FSYNC[fsync]
            for payload, producers in plan.cases():
                stream = _case_name(f"aof-{fsync}", payload, producers)
                target = {"driver": "redis", "port": server.port, "stream": stream}
                plan.row("Redis", f"XADD pipelined, AOF {fsync}", ack, "produce", payload, producers,
                         plan.produce(pids, target, payload, producers))
                if fsync == "everysec" and producers == plan.producers[0]:
                    plan.row("Redis", "XREAD", ack, "read", payload, 1,
                             plan.read(pids, target, payload))
                stored = admin.xlen(stream)
                if stored != plan.records:
                    plan.errors.append(f"Redis stream {stream}: {stored} entries stored, {plan.records} sent")
                admin.delete(stream)  # Redis keeps every stream in memory
            plan.latency_row("Redis", f"XADD, AOF {fsync}", ack,
                             {"driver": "redis", "port": server.port, "stream": f"latency-{fsync}"})
        admin.close()


# ---- Tansu (Kafka protocol) -------------------------------------------------------------------------

def bench_tansu(plan: Plan, root: Path) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    with peers.Tansu(root) as server:
        pids = server.pids()
        admin = AdminClient({"bootstrap.servers": server.bootstrap})
        partitions = os.cpu_count() or 1  # as many as ingest has workers
        topics = [_case_name("t", p, n) for p, n in plan.cases()] + ["latency"]
        for future in admin.create_topics([NewTopic(t, partitions, 1) for t in topics]).values():
            future.result(30)
        for payload, producers in plan.cases():
            target = {"driver": "kafka", "bootstrap": server.bootstrap, "topic": _case_name("t", payload, producers),
                      "partitions": partitions}
            plan.row("Tansu", "confluent-kafka acks=all (memory storage)", server.ACK, "produce", payload, producers,
                     plan.produce(pids, target, payload, producers))
            if producers == plan.producers[0]:
                plan.row("Tansu", "confluent-kafka consume, assign()", server.ACK, "read", payload, 1,
                         plan.read(pids, target, payload))
        plan.latency_row("Tansu", "confluent-kafka acks=all (memory storage)", server.ACK,
                         {"driver": "kafka", "bootstrap": server.bootstrap, "topic": "latency"})


# ---- MQTT -----------------------------------------------------------------------------------------

def _mqtt_archiver(port: int, reset: bool) -> None:
    """The persistent subscriber session the broker queues every message for, as a fleet's
    archiver that is offline; ``reset`` drops what was queued for it."""
    import paho.mqtt.client as mqtt

    if reset:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-archiver", clean_session=True)
        client.connect("127.0.0.1", port)
        client.disconnect()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-archiver", clean_session=False)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("bench/#", qos=1)
    if not subscribed.wait(10):
        raise TimeoutError("mosquitto: no SUBACK for the archiver session")
    client.loop_stop()
    client.disconnect()


def bench_mqtt(plan: Plan, root: Path) -> None:
    with peers.Mosquitto(root) as server:
        pids = server.pids()
        for payload, producers in plan.cases():
            for qos, ack in ((0, peers.ACK_NONE), (1, server.ACK_QOS1)):
                def run(qos=qos) -> dict:
                    _mqtt_archiver(server.port, reset=True)
                    target = {"driver": "mqtt", "port": server.port, "qos": qos, "topic": "bench/telemetry"}
                    return plan.produce(pids, target, payload, producers)()
                plan.row("mosquitto", f"paho QoS {qos}", ack, "produce", payload, producers, run)
        _mqtt_archiver(server.port, reset=True)
        plan.latency_row("mosquitto", "paho QoS 1", server.ACK_QOS1,
                         {"driver": "mqtt", "port": server.port, "topic": "bench/latency"})


BENCHES = {"zmq": bench_zmq, "ingest": bench_ingest, "nats": bench_nats, "redis": bench_redis,
           "tansu": bench_tansu, "mqtt": bench_mqtt}


# ---- the run ------------------------------------------------------------------------------------------

def machine() -> dict:
    import psutil

    return {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "cpu": _cpu_model(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(plan: Plan, systems: list[str], argv: list[str]) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp, \
            measure.ClientPool(max(plan.producers)) as plan.pool:
        for name in systems:
            print(f"== {name}", flush=True)
            try:
                BENCHES[name](plan, Path(tmp))
            except Exception as e:  # noqa: BLE001 - a system that does not start fails its rows only
                plan.errors.append(f"{name}: {type(e).__name__}: {e}")
                traceback.print_exc()
    return {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "command": " ".join(["python -m bench.compare", *argv]),
        "commit": _commit(), "machine": machine(),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "records": plan.records, "latency_records": plan.latency_records,
        "latency_rate_per_s": LATENCY_RATE_PER_S, "producers": plan.producers, "payloads": plan.payloads,
        "rows": plan.rows, "latency": plan.latency, "errors": plan.errors,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1,000,000 records per row, longer latency runs")
    parser.add_argument("--records", type=int, help="records per row (overrides the mode's)")
    parser.add_argument("--latency-records", type=int, help="records per latency run (overrides the mode's)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--payloads", help="comma-separated subset of: " + ", ".join(PAYLOADS))
    parser.add_argument("--producers", default="1,2", help="comma-separated producer process counts")
    parser.add_argument("--all-cases", action="store_true",
                        help="quick mode too: every payload with every producer count")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/<UTC date and time>.json)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate bench/RESULTS.md and plots")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}: choose from {', '.join(SYSTEMS)}")
    plan = Plan(records=args.records or (1_000_000 if args.full else 50_000),
                latency_records=args.latency_records or (LATENCY_RATE_PER_S * (30 if args.full else 5)))
    plan.producers = [int(n) for n in args.producers.split(",")]
    if not args.full and not args.all_cases:
        plan.all_producers_for = {LATENCY_PAYLOAD}
    if args.payloads:
        plan.payloads = [p.strip() for p in args.payloads.split(",")]
        if set(plan.payloads) - set(PAYLOADS):
            parser.error(f"unknown payloads: choose from {', '.join(PAYLOADS)}")
    result = run(plan, systems, argv)
    out = args.out or RESULTS_DIR / (result["started"][:19].replace(":", "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.no_report:
        from bench import report

        report.main([str(out)])
    for error in plan.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if plan.errors else 0


if __name__ == "__main__":
    sys.exit(main())
