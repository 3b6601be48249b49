"""`ingest status` and `ingest top`: the appliance as a table an operator reads at a glance.

Pure rendering: the inputs are the METADATA document and two /metrics scrapes taken
`interval_s` apart (for rates); no socket is opened here.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _by(samples: Samples, name: str, *keys: str) -> dict[tuple, float]:
    """Values of `name` summed by the given label keys."""
    out: dict[tuple, float] = defaultdict(float)
    for (n, labels), value in samples.items():
        if n == name:
            d = dict(labels)
            out[tuple(d.get(k, "") for k in keys)] += value
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    return [line] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


def render(meta: dict, now: Samples, before: Samples | None, interval_s: float, bootstrap: str) -> str:
    """The status screen: appliance, disk, workers, partitions with rates, consumer lag."""
    rate = _rates(now, before, interval_s)
    free = _by(now, "ingest_disk_free_bytes").get((), 0.0)
    size = _by(now, "ingest_disk_size_bytes").get((), 0.0)
    full = any(v for v in _by(now, "ingest_disk_full", "worker").values())
    lines = [f"appliance {meta['appliance_id']}  bootstrap {bootstrap}  metrics {meta.get('metrics')}",
             f"disk: {_bytes(free)} free of {_bytes(size)}" + ("  DISK FULL" if full else "")]
    lines += _replication_line(meta, now)
    lines.append("")
    cpu = _by(now, "ingest_worker_cpu_seconds_total", "worker")
    cpu_before = _by(before, "ingest_worker_cpu_seconds_total", "worker") if before else {}
    rss = _by(now, "ingest_worker_resident_memory_bytes", "worker")
    workers = []
    for w in meta["workers"]:
        key = (str(w["id"]),)
        cpu_pct = (cpu.get(key, 0) - cpu_before.get(key, 0)) / interval_s * 100 if before and interval_s else 0.0
        workers.append([str(w["id"]), "up" if w["up"] else "DOWN", str(w.get("pid")), f"{cpu_pct:.0f}%",
                        _bytes(rss.get(key, 0)), str(w["restarts"]), w["pull"], w["router"]])
    lines += _table(["WORKER", "STATE", "PID", "CPU", "RSS", "RESTARTS", "PUSH", "REQUESTS"], workers)
    lines.append("")
    lines += _table(["TOPIC", "PART", "START", "END", "UNSYNCED", "SIZE", "RECORDS/S"], _partition_rows(now, rate))
    lag_rows = _lag_rows(now)
    if lag_rows:
        lines.append("")
        lines += _table(["GROUP", "TOPIC", "PART", "LAG", "LAG SECONDS"], lag_rows)
    return "\n".join(lines)


def _replication_line(meta: dict, now: Samples) -> list[str]:
    """Role, leader epoch, peers and the worst in-sync count (replicated appliances)."""
    repl = meta.get("replication") or {}
    if not repl.get("peers"):
        return []
    line = f"replication: {repl['role']} at leader epoch {repl['leader_epoch']}, peers {', '.join(repl['peers'])}"
    if repl["role"] == "leader":
        in_sync = _by(now, "ingest_partition_in_sync_replicas", "topic", "partition").values()
        under = sum(_by(now, "ingest_under_replicated_partitions", "worker").values())
        line += f"; in-sync replicas min {int(min(in_sync, default=1))}, {int(under)} under-replicated"
    elif repl.get("leader"):
        line += f"; following {repl['leader']}"
    return [line]


def _rates(now: Samples, before: Samples | None, interval_s: float) -> dict[tuple, float]:
    if not before or interval_s <= 0:
        return {}
    ends_now = _by(now, "ingest_log_end_offset", "topic", "partition")
    ends_before = _by(before, "ingest_log_end_offset", "topic", "partition")
    return {k: max(0.0, v - ends_before.get(k, v)) / interval_s for k, v in ends_now.items()}


def _partition_rows(now: Samples, rate: dict[tuple, float]) -> list[list[str]]:
    keys = ("topic", "partition")
    start, end = _by(now, "ingest_log_start_offset", *keys), _by(now, "ingest_log_end_offset", *keys)
    flushed, size = _by(now, "ingest_log_flushed_offset", *keys), _by(now, "ingest_log_size_bytes", *keys)
    rows = []
    for key in sorted(end, key=lambda k: (k[0], int(k[1] or 0))):
        rows.append([key[0], key[1], f"{start.get(key, 0):.0f}", f"{end[key]:.0f}",
                     f"{end[key] - flushed.get(key, end[key]):.0f}", _bytes(size.get(key, 0)),
                     f"{rate[key]:,.0f}" if key in rate else "-"])
    return rows


def _lag_rows(now: Samples) -> list[list[str]]:
    keys = ("group", "topic", "partition")
    lag, seconds = _by(now, "ingest_consumer_group_lag_records", *keys), _by(now, "ingest_consumer_group_lag_seconds", *keys)
    return [[g, t, p, f"{lag[(g, t, p)]:.0f}", f"{seconds.get((g, t, p), 0):.1f}"]
            for g, t, p in sorted(lag, key=lambda k: (k[0], k[1], int(k[2] or 0)))]
