"""`ingest processors list|status`: the processors of a running appliance, as tables.

Pure rendering over the METADATA document (its `processors`) and a /metrics scrape
(parsed by ingest.status.parse_metrics); no socket is opened here.
"""

from __future__ import annotations

from ingest.status import Samples, _table

# Metric (without prefix) -> column of `ingest processors status`.
COLUMNS = {
    "ingest_processor_position": "position",
    "ingest_processor_lag_records": "lag_records",
    "ingest_processor_lag_seconds": "lag_seconds",
    "ingest_processor_open_windows": "open_windows",
    "ingest_processor_late_records_total": "late_records",
    "ingest_processor_records_total": "records",
    "ingest_processor_output_records_total": "output_records",
    "ingest_processor_invalid_records_total": "invalid_records",
    "ingest_processor_failed": "failed",
}


def render_list(meta: dict) -> str:
    rows = []
    for p in meta.get("processors", []):
        if p["kind"] == "aggregate":
            hop = p["advance_ms"] or p["window_ms"]
            what = (f"{','.join(p['aggregations'])} of {','.join(p['fields'])} per {p['window_ms']} ms"
                    + (f" every {hop} ms" if hop != p["window_ms"] else "") + f", grace {p['grace_ms']} ms")
        elif p["kind"] in ("filter", "alert"):
            what = f"where {p['where']}"
        elif p["kind"] == "extract":
            what = f"fields {','.join(p['fields'])} as {p['output_format']}"
        else:
            what = f"{p['function']} ({p['mode']})"
        rows.append([p["name"], p["kind"], f"{p['source']} -> {p['sink']}", p["start"], what])
    if not rows:
        return "no processors configured ([[processor]] in the config file)"
    return "\n".join(_table(["processor", "kind", "topics", "start", "does"], rows))


def status_rows(meta: dict, samples: Samples) -> list[dict]:
    """One row per (processor, partition) with every column of COLUMNS."""
    rows: dict[tuple[str, int], dict] = {}
    for (name, labels), value in samples.items():
        column = COLUMNS.get(name)
        if column is None:
            continue
        d = dict(labels)
        key = (d.get("processor", ""), int(d.get("partition", -1)))
        rows.setdefault(key, {"processor": key[0], "partition": key[1]})[column] = value
    for row in rows.values():
        for column in COLUMNS.values():
            row.setdefault(column, 0)
            if column != "lag_seconds":
                row[column] = int(row[column])
    return [rows[k] for k in sorted(rows)]


def render_status(rows: list[dict]) -> str:
    if not rows:
        return "no processor is running (none configured, or their source topics do not exist yet)"
    table = [[r["processor"], str(r["partition"]), str(r["position"]), str(r["lag_records"]),
              f"{r['lag_seconds']:.1f}", str(r["open_windows"]), str(r["late_records"]), str(r["records"]),
              str(r["output_records"]), str(r["invalid_records"]), "FAILED" if r["failed"] else "ok"]
             for r in rows]
    headers = ["processor", "partition", "position", "lag", "lag_s", "windows", "late", "in", "out", "invalid", "state"]
    return "\n".join(_table(headers, table))
