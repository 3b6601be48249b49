"""The supervisor: spawns and pins one worker per core, restarts dead ones, serves the
bootstrap endpoint and /metrics, speaks sd_notify, and drains on SIGTERM.

It holds no data: every log belongs to a worker. Only small control messages cross
processes (JSON over a ROUTER socket on loopback): hello, ready, heartbeat with a metrics
snapshot, topic creation, topic table updates, shutdown.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import orjson
import psutil
import zmq
from prometheus_client import CollectorRegistry

from ingest import metrics
from ingest.net.client import DEFAULT_BOOTSTRAP
from ingest.clock import mono_ms
from ingest.config import WILDCARD_HOSTS, Config, ConfigError, TopicConfig
from ingest.net import wire
from ingest.net.errors import ErrorCode, IngestError
from ingest.replication.peers import SupervisorReplication
from ingest.sdnotify import Notifier, watchdog_interval_ms
from ingest.security import CurveGuard
from ingest.streams.sinks import sinks_to_create
from ingest.topics import TopicLimitError, TopicRegistry, write_atomically

log = logging.getLogger("ingest.supervisor")

# Restart backoff for a crashing worker: doubles from the first to the max, and resets
# once a worker has stayed up for RESTART_STABLE_MS.
RESTART_BACKOFF_FIRST_MS = 100
RESTART_BACKOFF_MAX_MS = 5_000
RESTART_STABLE_MS = 30_000
# A worker that has not reported ready this long after its start is killed and restarted;
# covers recovery scans of large active segments.
WORKER_START_TIMEOUT_MS = 120_000
POLL_INTERVAL_MS = 50
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass
class WorkerHandle:
    worker_id: int
    cpu: int | None
    process: subprocess.Popen | None = None
    incarnation: int = 0
    started_ms: int = 0
    ready: bool = False
    last_heartbeat_ms: int = 0
    restarts: int = 0
    backoff_ms: int = RESTART_BACKOFF_FIRST_MS
    next_start_ms: int = 0
    identity: bytes = b""
    status: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        # Resolve workers = "auto" here, once: a worker pinned to one core would count one
        # usable core, take itself for the only worker and open every partition.
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=config.worker_count))
        self.config = config
        self.data_dir = config.server.data_dir
        self.notifier = notifier or Notifier()
        self.ctx = zmq.Context()
        self.topics = TopicRegistry(self.data_dir)
        self.store = metrics.SnapshotStore()
        cpus = _usable_cpus()
        self.workers = [
            WorkerHandle(i, cpus[i % len(cpus)] if cpus else None) for i in range(config.worker_count)
        ]
        self._stop_requested = False
        self._first_ready = False
        self._announced_ready = False
        self._watchdog_ms = watchdog_interval_ms()
        self._last_watchdog_ms = 0
        self._http: metrics.HttpServer | None = None

    # ---- set-up ------------------------------------------------------------------------

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        meta = self.data_dir / META_FILE
        if meta.exists():
            doc = orjson.loads(meta.read_bytes())
            if doc.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"{meta}: format_version {doc.get('format_version')} is not {FORMAT_VERSION}")
            if doc.get("workers") not in (None, self.config.worker_count):
                # Ownership is p % workers: a different count would hand partitions to
                # workers that do not have their files. Refuse rather than lose data.
                raise ConfigError(
                    f"{self.data_dir} was written by {doc['workers']} workers; start with "
                    f"--workers {doc['workers']} (changing the worker count is not supported yet)"
                )
        else:
            doc = {"format_version": FORMAT_VERSION, "appliance_id": os.urandom(8).hex(),
                   "workers": self.config.worker_count}
            write_atomically(meta, orjson.dumps(doc))
        self.appliance_id = doc["appliance_id"]
        for topic in self.config.topics:
            self.topics.create(topic)
        self._create_sinks()
        self.replication = SupervisorReplication(self.config.replication, self.data_dir, self.appliance_id)
        self.replication.start()

    def _bind(self) -> None:
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        control_port = self.control.bind_to_random_port("tcp://127.0.0.1")
        self.control_endpoint = f"tcp://127.0.0.1:{control_port}"
        self.guard = CurveGuard(self.ctx, self.config.security)
        self.bootstrap = self.guard.serve(self.ctx.socket(zmq.ROUTER))
        self.bootstrap.setsockopt(zmq.LINGER, 0)
        self.bootstrap.bind(self.config.endpoint(self.config.server.port))
        registry = CollectorRegistry()
        registry.register(metrics.ApplianceCollector(self.store, self.worker_rows, self.data_dir))
        self._http = metrics.HttpServer(self.config.server.metrics_bind, self.config.server.metrics_port,
                                        registry, self.health, self.is_ready)
        self._http.start()

    # ---- workers -----------------------------------------------------------------------

    def _spawn(self, w: WorkerHandle) -> None:
        w.incarnation += 1
        w.ready = False
        w.identity = b""
        w.started_ms = w.last_heartbeat_ms = mono_ms()
        argv = [sys.executable, "-m", "ingest.shards.worker", "--worker-id", str(w.worker_id),
                "--incarnation", str(w.incarnation), "--control", self.control_endpoint]
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        env["INGEST_CONFIG_JSON"] = orjson.dumps(self.config.to_dict()).decode()
        w.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        if w.cpu is not None:
            try:
                psutil.Process(w.process.pid).cpu_affinity([w.cpu])
            except (psutil.Error, OSError) as e:
                log.warning("worker %d: cannot pin to cpu %d: %s", w.worker_id, w.cpu, e)
        log.info("worker %d started (pid %d, cpu %s, incarnation %d)",
                 w.worker_id, w.process.pid, w.cpu, w.incarnation)

    def _check_workers(self, t_ms: int) -> None:
        for w in self.workers:
            if w.process is not None and not w.alive:
                code = w.process.returncode
                log.error("worker %d (pid %d) exited with %s; restarting in %d ms",
                          w.worker_id, w.process.pid, code, w.backoff_ms)
                self.store.forget_gauges(w.worker_id)
                w.process = None
                w.ready = False
                w.next_start_ms = t_ms + w.backoff_ms
                w.backoff_ms = min(w.backoff_ms * 2, RESTART_BACKOFF_MAX_MS)
                w.restarts += 1
            elif w.process is None and t_ms >= w.next_start_ms and self._may_start(w):
                self._spawn(w)
            elif w.alive and not w.ready and t_ms - w.started_ms > WORKER_START_TIMEOUT_MS:
                log.error("worker %d not ready after %d ms; killing it", w.worker_id, WORKER_START_TIMEOUT_MS)
                w.process.kill()
            elif w.ready and t_ms - w.started_ms > RESTART_STABLE_MS:
                w.backoff_ms = RESTART_BACKOFF_FIRST_MS

    def _may_start(self, w: WorkerHandle) -> bool:
        """Worker 0 starts alone the first time: on a cold numba cache every worker would
        compile the same kernels at once (seconds each, on cores they share); once worker 0
        is ready the cache is warm and the others load it in a fraction of a second."""
        if w.worker_id == 0 or self._first_ready:
            return True
        first = self.workers[0]
        self._first_ready = first.ready or first.restarts > 0
        return self._first_ready

    def worker_rows(self) -> list[dict]:
        t = mono_ms()
        return [{"id": w.worker_id, "up": self._fresh(w, t), "restarts": w.restarts,
                 "pid": w.process.pid if w.process else None, "ready": w.ready,
                 "pull": self.config.advertised_endpoint(self.config.worker_pull_port(w.worker_id)),
                 "router": self.config.advertised_endpoint(self.config.worker_router_port(w.worker_id)),
                 "status": w.status, **_process_usage(w.process)} for w in self.workers]

    def _fresh(self, w: WorkerHandle, t_ms: int) -> bool:
        return w.alive and w.ready and t_ms - w.last_heartbeat_ms <= self.config.server.heartbeat_timeout_ms

    def is_ready(self) -> bool:
        t = mono_ms()
        return all(self._fresh(w, t) for w in self.workers)

    def health(self) -> tuple[bool, dict]:
        rows = self.worker_rows()
        disk_full = any(w["status"].get("disk_full") for w in rows)
        ok = all(w["up"] for w in rows) and not disk_full
        return ok, {"ok": ok, "disk_full": disk_full, "workers": rows, "appliance_id": self.appliance_id}

    # ---- control channel ---------------------------------------------------------------

    def _on_control(self) -> None:
        while True:
            try:
                identity, payload = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = orjson.loads(payload)
            w = self.workers[msg["worker"]]
            if msg.get("incarnation") != w.incarnation:
                continue  # a late message from a previous incarnation
            w.identity = identity
            w.last_heartbeat_ms = mono_ms()
            kind = msg["t"]
            if kind == "hello":
                self._send_control(w, {"t": "topics", "topics": self.topics.as_dict(),
                                       "replication": self.replication.worker_doc()})
            elif kind == "ready":
                w.ready = True
                log.info("worker %d ready", w.worker_id)
            elif kind == "heartbeat":
                w.status = msg.get("status", {})
                self.store.update(w.worker_id, w.incarnation, msg.get("metrics", {}))
            elif kind == "create_topic" and self.replication.may_create_topics():
                self._create_topic_for_push(w, msg["topic"])
            elif kind == "fenced" and self.replication.fenced(msg["leader_epoch"]):
                self._broadcast_replication()

    def _send_control(self, w: WorkerHandle, msg: dict) -> None:
        if w.identity:
            self.control.send_multipart([w.identity, orjson.dumps(msg)])

    def _broadcast_topics(self) -> None:
        for w in self.workers:
            self._send_control(w, {"t": "topics", "topics": self.topics.as_dict()})

    def _create_sinks(self) -> bool:
        """Create the sink topics of processors whose source exists (streams/sinks.py)."""
        sinks = sinks_to_create(self.config.processors, self.topics.as_dict())
        for sink in sinks:
            self.topics.create(sink)
            log.info("sink topic %s created with %d partitions", sink.name, sink.partitions)
        return bool(sinks)

    def _broadcast_replication(self) -> None:
        for w in self.workers:
            self._send_control(w, {"t": "replication", "replication": self.replication.worker_doc()})

    def _follow_peers(self) -> None:
        if self.replication.poll():
            self._broadcast_replication()
        for name, partitions in self.replication.topics_to_create(self.topics.as_dict()):
            try:  # the leader's topics are mirrored whatever this appliance's topics_max
                self._create_topic(name, partitions, bounded=False)
            except (ConfigError, ValueError) as e:
                log.error("the leader's topic %r cannot be created here: %s", name, e)

    def _create_topic_for_push(self, w: WorkerHandle, name: str) -> None:
        """Auto-create for PUSH records a worker holds; a refusal lets it drop and count them."""
        try:
            self._create_topic(name, self.config.partitions_default)
        except (TopicLimitError, ConfigError) as e:
            log.warning("auto-create refused: %s", e)
            self._send_control(w, {"t": "topic_refused", "topic": name})

    def _create_topic(self, name: str, partitions: int, raw_port: int | None = None, bounded: bool = True) -> bool:
        topics_max = self.config.limits.topics_max if bounded else None
        created = self.topics.create(TopicConfig(name, partitions, raw_port), topics_max)
        if created:
            log.info("topic %s created with %d partitions", name, partitions)
        try:
            sinks = self._create_sinks()
        except ConfigError as e:  # a sink that exists with another count: the processor stays off
            log.error("%s", e)
            sinks = False
        if created or sinks:
            self._broadcast_topics()
        return created

    # ---- bootstrap endpoint ------------------------------------------------------------

    def metadata(self) -> dict:
        return {"appliance_id": self.appliance_id, "workers": self.worker_rows(),
                "worker_count": len(self.workers), "topics": self.topics.as_dict(),
                "default_partitions": self.config.partitions_default,
                "auto_create_topics": self.config.server.auto_create_topics,
                "curve": self.guard.enabled,
                "processors": [dataclasses.asdict(p) for p in self.config.processors],
                "metrics": self.metrics_url(),
                "replication": self.replication.metadata()}

    def metrics_url(self) -> str:
        host = self.config.server.metrics_bind
        if host in WILDCARD_HOSTS:
            host = self.config.advertised_host()
        return f"http://{host}:{self._http.port if self._http else 0}/metrics"

    def _on_bootstrap(self) -> None:
        while True:
            try:
                identity, payload = self.bootstrap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._handle_bootstrap(wire.decode_request(payload))
            except IngestError as e:  # WireError included
                reply = wire.error_reply_for(payload, e)
            if reply is not None:
                self.bootstrap.send_multipart([identity, reply])

    def _handle_bootstrap(self, request) -> bytes:
        if isinstance(request, wire.MetadataRequest):
            return wire.MetadataReply(self.metadata(), request.correlation_id).encode()
        if isinstance(request, wire.CreateTopicRequest):
            if not self.replication.may_create_topics():
                raise IngestError(ErrorCode.NOT_LEADER, "topics are created on the leader appliance")
            raw_port = request.config.get("raw_port")
            try:
                created = self._create_topic(request.topic, request.partitions or self.config.partitions_default,
                                             int(raw_port) if raw_port else None)
            except TopicLimitError as e:
                raise IngestError(ErrorCode.TOPIC_LIMIT_REACHED, str(e)) from None
            except (ConfigError, ValueError, TypeError) as e:
                raise IngestError(ErrorCode.INVALID_TOPIC, str(e)) from None
            return wire.CreateTopicReply({"created": created, **self.metadata()}, request.correlation_id).encode()
        if isinstance(request, wire.PingRequest):
            return wire.PingReply(request.correlation_id).encode()
        if isinstance(request, wire.PromoteRequest):
            try:
                document = self.replication.promote()
            except ValueError as e:
                raise IngestError(ErrorCode.INVALID_REQUEST, str(e)) from None
            self._broadcast_replication()
            return wire.PromoteReply(document, request.correlation_id).encode()
        raise IngestError(ErrorCode.INVALID_REQUEST,
                          "the bootstrap endpoint answers METADATA, CREATE_TOPIC, PROMOTE and PING only")

    # ---- main loop ---------------------------------------------------------------------

    def _pet_watchdog(self, t_ms: int) -> None:
        if self._watchdog_ms is None or t_ms - self._last_watchdog_ms < self._watchdog_ms:
            return
        # Pet only while every worker is fresh: a stalled worker must lead to a restart.
        if self.is_ready():
            self.notifier.watchdog()
            self._last_watchdog_ms = t_ms

    def _announce_ready_once(self) -> None:
        if self._announced_ready or not self.is_ready():
            return
        self._announced_ready = True
        status = f"serving: bootstrap {self.config.advertised_endpoint(self.config.server.port)}, {len(self.workers)} workers"
        self.notifier.ready(status)
        log.info("ready: %s", status)
        print(self.banner(), flush=True)

    def banner(self) -> str:
        lines = [f"ingest ready (appliance {self.appliance_id}, data {self.data_dir.resolve()})",
                 f"  bootstrap  {self.config.advertised_endpoint(self.config.server.port)}",
                 f"  metrics    {self.metrics_url()}"]
        for row in self.worker_rows():
            lines.append(f"  worker {row['id']}   push {row['pull']}   requests {row['router']}")
        for name, t in self.topics.as_dict().items():
            if t["raw_port"]:
                lines.append(f"  raw        {self.config.advertised_endpoint(t['raw_port'])} -> topic {name}")
        cli = _cli_path()
        endpoint = self.config.advertised_endpoint(self.config.server.port)
        bootstrap = "" if endpoint == DEFAULT_BOOTSTRAP else f" --bootstrap {endpoint}"
        lines.append(f"  send one:  echo hello | {cli} produce{bootstrap} --topic demo")
        lines.append(f"  read back: {cli} consume{bootstrap} --topic demo --from-beginning --idle-timeout-ms 1000")
        return "\n".join(lines)

    def _request_stop(self, signum, _frame) -> None:
        log.info("signal %d: draining", signum)
        self._stop_requested = True

    def run(self) -> int:
        _raise_open_files_limit()
        self._prepare_data_dir()
        self._bind()
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.bootstrap, zmq.POLLIN)
        self.notifier.status("starting workers")
        while not self._stop_requested:
            events = dict(poller.poll(POLL_INTERVAL_MS))
            if self.control in events:
                self._on_control()
            if self.bootstrap in events:
                self._on_bootstrap()
            t = mono_ms()
            self._check_workers(t)
            self._follow_peers()
            self._announce_ready_once()
            self._pet_watchdog(t)
            self.guard.maybe_reload()
        return self._drain()

    def _drain(self) -> int:
        """Stop intake, let every worker flush, fsync, mark clean and exit; then exit 0."""
        self.notifier.stopping()
        for w in self.workers:
            self._send_control(w, {"t": "shutdown"})
            if w.alive and not w.identity:
                w.process.terminate()  # started but never said hello: SIGTERM drains it too
        deadline = mono_ms() + self.config.server.shutdown_timeout_ms
        clean = True
        while any(w.alive for w in self.workers) and mono_ms() < deadline:
            if self.control.poll(POLL_INTERVAL_MS):
                self._on_control()
        for w in self.workers:
            if w.alive:
                log.error("worker %d did not drain in time; killing it", w.worker_id)
                w.process.kill()
                w.process.wait()
                clean = False
            elif w.process is not None and w.process.returncode != 0:
                clean = False
        if self._http:
            self._http.close()
        self.replication.close()
        self.guard.close()
        self.ctx.destroy(linger=0)
        log.info("stopped %s", "cleanly" if clean else "with errors")
        return 0 if clean else 1


def _raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by workers): every device
    connection holds a descriptor, and runtimes often start processes at a soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d: %s", soft, e)


def _cli_path() -> str:
    """How to call the `ingest` command installed beside this Python (a venv's bin/)."""
    path = os.path.join(os.path.dirname(sys.executable), "ingest")
    if not os.path.exists(path):
        return "ingest"
    cwd = os.getcwd()
    # Relative only below a working directory of the user's (make run), absolute elsewhere
    # (systemd runs us in /).
    return os.path.relpath(path) if cwd != "/" and path.startswith(cwd + os.sep) else path


def _process_usage(process: subprocess.Popen | None) -> dict:
    """CPU seconds and resident bytes of a live worker process (None when it is not)."""
    try:
        p = psutil.Process(process.pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return {"cpu_seconds": cpu.user + cpu.system, "rss_bytes": p.memory_info().rss}
    except (AttributeError, psutil.Error):
        return {"cpu_seconds": None, "rss_bytes": None}


def _usable_cpus() -> list[int]:
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, psutil.Error):
        return []
