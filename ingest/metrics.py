"""Prometheus exposition for the supervisor, built from worker snapshots.

Workers keep plain local numbers and send a snapshot about once a second (see
`ingest.shards.probe`); the supervisor is the only process that serves HTTP. Custom
collectors do not work in prometheus-client's multiprocess mode, so we do not use it.

Counters stay monotonic across worker restarts: when a worker comes back with a new
incarnation its counters start at zero again, so the last values of the old incarnation
are carried into a per-series base that is added to everything the new one reports.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ingest.shards.probe import LATENCY_BUCKETS_S

log = logging.getLogger("ingest.metrics")

# A snapshot series: (metric name without prefix, sorted label items) -> value.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]

# Every metric a worker may report: name (without the ingest_ prefix) -> (type, help).
# Base units, `_total` for counters; labels never name a device.
CATALOG = {
    "records_received_total": ("counter", "Records appended to the log, by topic."),
    "bytes_received_total": ("counter", "Record batch bytes appended to the log, by topic."),
    "batches_received_total": ("counter", "Record batches appended to the log, by topic."),
    "frames_invalid_total": ("counter", "Frames or batches refused as malformed or invalid, by reason."),
    "records_dropped_total": ("counter", "Fire-and-forget records not stored, by reason."),
    "produce_requests_total": ("counter", "Acked produce requests answered, by error."),
    "duplicate_batches_total": ("counter", "Retried idempotent batches answered without storing them again."),
    "fetch_requests_total": ("counter", "Fetch requests answered."),
    "replies_dropped_total": ("counter", "Replies not sent because the client's queue was full."),
    "forwarded_records_total": ("counter", "Records forwarded to the worker that owns their partition."),
    "kafka_requests_total": ("counter", "Kafka protocol requests handled, by api."),
    "kafka_produce_requests_total": ("counter", "Kafka Produce requests handled, by acks."),
    "kafka_frames_invalid_total": ("counter", "Kafka protocol frames refused (connection closed), by reason."),
    "kafka_connections_total": ("counter", "Kafka protocol connections accepted."),
    "kafka_connections_refused_total": ("counter", "Kafka protocol connections closed at accept: [kafka] connections_max reached."),
    "fsync_duration_seconds": ("histogram", "Duration of one group commit's fdatasync."),
    "produce_latency_seconds": ("histogram", "Time from an acked produce request's arrival to its reply, by acks."),
    "log_start_offset": ("gauge", "First offset still stored in the partition."),
    "log_end_offset": ("gauge", "Offset the next record appended to the partition will get."),
    "log_high_watermark": ("gauge", "Consumers read below this offset."),
    "log_flushed_offset": ("gauge", "Every offset below this is fsynced."),
    "log_size_bytes": ("gauge", "Bytes of the partition's segments on disk."),
    "log_corrupt_batches": ("gauge", "Corrupt batches found in sealed segments (never served; see `ingest check`)."),
    "segments_rolled_total": ("counter", "Segments sealed because they reached segment_bytes or segment_ms."),
    "segments_deleted_total": ("counter", "Segments deleted by retention."),
    "recovery_truncated_bytes_total": ("counter", "Bytes of torn or corrupt tails cut by recovery scans."),
    "consumer_group_lag_records": ("gauge", "High watermark minus the group's committed offset."),
    "consumer_group_lag_seconds": ("gauge", "Age of the oldest record the group has not committed past."),
    "disk_full": ("gauge", "1 while appends fail with ENOSPC."),
    "inflight_bytes": ("gauge", "Bytes accepted for acked produce, awaiting fsync."),
    "active_producers": ("gauge", "Idempotent producer ids seen in the last 5 minutes, per worker."),
    # [[uplink]] (ingest/uplink): forwarding to a Kafka cluster.
    "uplink_lag_records": ("gauge", "Records of the partition not yet delivered to the uplink's Kafka cluster."),
    "uplink_lag_seconds": ("gauge", "Age of the oldest record of the partition not yet delivered by the uplink."),
    "uplink_last_success_timestamp_seconds": ("gauge", "Wall time of the uplink's last delivery report without error, per worker."),
    "uplink_records_sent_total": ("counter", "Records handed to the uplink's Kafka producer, resends included."),
    "uplink_records_delivered_total": ("counter", "Records the uplink's Kafka cluster acknowledged (acks=all)."),
    "uplink_records_resent_total": ("counter", "Records sent again after a failed delivery: each may arrive twice."),
    "uplink_records_already_delivered_total": ("counter", "Records the uplink found already in its Kafka cluster when it read back the tail after a restart, and did not send again."),
    "uplink_records_dropped_total": ("counter", "Records retention deleted before the uplink shipped them (disk short of space) or never served as corrupt."),
    "uplink_errors_total": ("counter", "Uplink producer and delivery errors, by reason (unreachable, timed_out, fenced, authentication, refused, internal)."),
    # Stream processors (ingest/streams), per processor and source partition.
    "processor_position": ("gauge", "Next source offset the processor will read."),
    "processor_lag_records": ("gauge", "Source records appended but not processed yet."),
    "processor_lag_seconds": ("gauge", "Age of the oldest source record not processed yet (0 when caught up)."),
    "processor_open_windows": ("gauge", "Aggregation windows open (not yet closed by stream time)."),
    "processor_failed": ("gauge", "1 while the processor is stopped by an error in its function or output."),
    "processor_records_total": ("counter", "Source records processed."),
    "processor_output_records_total": ("counter", "Records the processor appended to its sink."),
    "processor_late_records_total": ("counter", "Records that arrived after a window they belong to had closed (not aggregated there)."),
    "processor_invalid_records_total": ("counter", "Source records whose fields could not be read (left out)."),
    # [replication] (ingest/replication): a leader's in-sync replicas, a follower's lag.
    "partition_in_sync_replicas": ("gauge", "Replicas in the partition's in-sync set, the leader included (leader only)."),
    "under_replicated_partitions": ("gauge", "Led partitions with fewer in-sync replicas than appliances, per worker."),
    "replica_lag_records": ("gauge", "Records a follower replica is behind the leader's log end, by replica."),
    "replica_lag_seconds": ("gauge", "Time since a follower replica was last caught up with the leader (0 when it is)."),
    "leader_epoch": ("gauge", "Leader epoch this appliance leads or follows, per worker."),
    "replication_is_leader": ("gauge", "1 if this appliance is the replication leader, 0 if a follower, per worker."),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


class SnapshotStore:
    """Latest snapshot per worker plus carried counter bases; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._incarnation: dict[int, int] = {}
        self._counters: dict[int, dict[SeriesKey, float]] = {}
        self._gauges: dict[int, dict[SeriesKey, float]] = {}
        self._carried: dict[SeriesKey, float] = defaultdict(float)

    def update(self, worker_id: int, incarnation: int, snapshot: dict) -> None:
        counters = _series(snapshot.get("counters", ()))
        gauges = _series(snapshot.get("gauges", ()))
        with self._lock:
            if self._incarnation.get(worker_id) != incarnation:
                for key, value in self._counters.pop(worker_id, {}).items():
                    self._carried[key] += value
                self._incarnation[worker_id] = incarnation
            self._counters[worker_id] = counters
            self._gauges[worker_id] = gauges

    def forget_gauges(self, worker_id: int) -> None:
        """A dead worker's gauges (offsets, sizes) are stale: stop exposing them."""
        with self._lock:
            self._gauges.pop(worker_id, None)

    def totals(self) -> tuple[dict[SeriesKey, float], dict[SeriesKey, float]]:
        with self._lock:
            counters = defaultdict(float, self._carried)
            for per_worker in self._counters.values():
                for key, value in per_worker.items():
                    counters[key] += value
            gauges: dict[SeriesKey, float] = {}
            for per_worker in self._gauges.values():
                gauges.update(per_worker)
            return dict(counters), gauges


def _series(rows: Iterable) -> dict[SeriesKey, float]:
    out: dict[SeriesKey, float] = {}
    for name, labels, value in rows:
        out[(name, tuple(sorted(labels.items())))] = float(value)
    return out


class ApplianceCollector:
    """prometheus-client custom collector over the SnapshotStore and supervisor state."""

    def __init__(self, store: SnapshotStore, workers: Callable[[], list[dict]], data_dir=None) -> None:
        self._store = store
        self._workers = workers
        self._data_dir = data_dir

    def collect(self):
        counters, gauges = self._store.totals()
        yield from _families(counters)
        yield from _families(gauges)
        yield from self._worker_families()
        yield from self._disk_families()

    def _worker_families(self):
        label = ["worker"]
        up = GaugeMetricFamily("ingest_worker_up", "1 while the worker is running and heartbeating.", labels=label)
        restarts = CounterMetricFamily("ingest_worker_restarts", "Times the supervisor restarted the worker.",
                                       labels=label)
        cpu = CounterMetricFamily("ingest_worker_cpu_seconds", "CPU time of the worker's current process.",
                                  labels=label)
        rss = GaugeMetricFamily("ingest_worker_resident_memory_bytes", "Resident memory of the worker.",
                                labels=label)
        for w in self._workers():
            worker = [str(w["id"])]
            up.add_metric(worker, 1.0 if w["up"] else 0.0)
            restarts.add_metric(worker, w["restarts"])
            if w.get("cpu_seconds") is not None:
                cpu.add_metric(worker, w["cpu_seconds"])
                rss.add_metric(worker, w["rss_bytes"])
        yield from (up, restarts, cpu, rss)

    def _disk_families(self):
        if self._data_dir is None:
            return
        usage = shutil.disk_usage(self._data_dir)
        yield GaugeMetricFamily("ingest_disk_free_bytes", "Free bytes on the data directory's filesystem.",
                                value=usage.free)
        yield GaugeMetricFamily("ingest_disk_size_bytes", "Size of the data directory's filesystem.",
                                value=usage.total)


def _families(series: dict[SeriesKey, float]):
    by_name: dict[str, list] = defaultdict(list)
    for (name, labels), value in series.items():
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in CATALOG:
                base = name.removesuffix(suffix)
        by_name[base].append((name, labels, value))
    for base in sorted(by_name):
        if base not in CATALOG:
            log.error("a worker reported unknown metric %s", base)
            continue
        kind, help_text = CATALOG[base]
        rows = by_name[base]
        if kind == "histogram":
            yield from _histograms(base, help_text, rows)
            continue
        family_cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        label_names = [k for k, _ in rows[0][1]]
        family = family_cls("ingest_" + base.removesuffix("_total"), help_text, labels=label_names)
        for _, labels, value in rows:
            family.add_metric([v for _, v in labels], value)
        yield family


def _histograms(base: str, help_text: str, rows: list):
    """Reassemble cumulative bucket/count/sum counters into one histogram family."""
    series: dict[tuple, dict] = defaultdict(lambda: {"buckets": {}, "sum": 0.0})
    for name, labels, value in rows:
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            key = tuple((k, v) for k, v in labels if k != "le")
            series[key]["buckets"][le] = value
        elif name.endswith("_sum"):
            series[labels]["sum"] = value
    if not series:
        return
    label_names = [k for k, _ in next(iter(series))]
    family = HistogramMetricFamily("ingest_" + base, help_text, labels=label_names)
    for key, data in series.items():
        family.add_metric([v for _, v in key], _every_bucket(data["buckets"]), data["sum"])
    yield family


def _every_bucket(counted: dict[str, float]) -> list[tuple[str, float]]:
    """Every bucket of LATENCY_BUCKETS_S, not only those a worker has counted into: the
    probe creates a bucket at its first observation, so a bucket below every observation
    so far is absent and reads as 0 here. A fixed bucket set keeps rate() and
    histogram_quantile() exact from the first scrape (no series born mid-stream)."""
    bounds = {repr(b) for b in LATENCY_BUCKETS_S} | {"+Inf"} | set(counted)
    out, cumulative = [], 0.0
    for le in sorted(bounds, key=float):
        cumulative = counted.get(le, cumulative)
        out.append((le, cumulative))
    return out


class HttpServer:
    """/metrics, /healthz (process alive and serving), /readyz (every worker ready)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, dict]], ready: Callable[[], bool]) -> None:
        handler = _make_handler(registry, health, ready)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(registry, health, ready):
    import orjson

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, detail = health()
                self._send(200 if ok else 503, orjson.dumps(detail), "application/json")
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the journal
            pass

    return Handler
