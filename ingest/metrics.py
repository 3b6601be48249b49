"""Prometheus exposition for the supervisor, built from worker snapshots.

Workers keep plain local numbers and send a snapshot about once a second (see
`ingest.shards.probe`); the supervisor is the only process that serves HTTP. Custom
collectors do not work in prometheus-client's multiprocess mode, so we do not use it.

Counters stay monotonic across worker restarts: when a worker comes back with a new
incarnation its counters start at zero again, so the last values of the old incarnation
are carried into a per-series base that is added to everything the new one reports.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# A snapshot series: (metric name without prefix, sorted label items) -> value.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]

HELP = {
    "records_received": "Records appended to the log.",
    "bytes_received": "Record batch bytes appended to the log.",
    "batches_received": "Record batches appended to the log.",
    "frames_invalid": "Frames refused as malformed or invalid, by reason.",
    "records_dropped": "Fire-and-forget records dropped, by reason.",
    "produce_requests": "Acked produce requests answered, by error.",
    "fetch_requests": "Fetch requests answered.",
    "fsyncs": "fdatasync calls (group commits).",
    "fsync_seconds": "Time spent in fdatasync.",
    "forwarded_records": "Records forwarded to the worker that owns their partition.",
    "log_start_offset": "First offset still stored in the partition.",
    "log_end_offset": "Offset the next record appended to the partition will get.",
    "log_flushed_offset": "Every offset below this is fsynced.",
    "log_size_bytes": "Bytes of the partition's segments on disk.",
    "disk_full": "1 while appends fail with ENOSPC.",
    "inflight_bytes": "Bytes accepted for acked produce, awaiting fsync.",
}


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

    def __init__(self, store: SnapshotStore, workers: Callable[[], list[dict]]) -> None:
        self._store = store
        self._workers = workers

    def collect(self):
        counters, gauges = self._store.totals()
        yield from _families(counters, CounterMetricFamily, "_total")
        yield from _families(gauges, GaugeMetricFamily, "")
        yield from self._worker_families()

    def _worker_families(self):
        up = GaugeMetricFamily("ingest_worker_up", "1 while the worker is running and heartbeating.", labels=["worker"])
        restarts = CounterMetricFamily("ingest_worker_restarts", "Times the supervisor restarted the worker.", labels=["worker"])
        for w in self._workers():
            up.add_metric([str(w["id"])], 1.0 if w["up"] else 0.0)
            restarts.add_metric([str(w["id"])], w["restarts"])
        yield up
        yield restarts


def _families(series: dict[SeriesKey, float], family_cls, suffix: str):
    by_name: dict[str, list] = defaultdict(list)
    for (name, labels), value in series.items():
        by_name[name].append((labels, value))
    for name in sorted(by_name):
        rows = by_name[name]
        label_names = [k for k, _ in rows[0][0]]
        metric_name = "ingest_" + (name[: -len(suffix)] if suffix and name.endswith(suffix) else name)
        family = family_cls(metric_name, HELP.get(name.removesuffix("_total"), name), labels=label_names)
        for labels, value in rows:
            family.add_metric([v for _, v in labels], value)
        yield family


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
