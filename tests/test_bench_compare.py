"""The side-by-side benchmark's harness on a tiny count: it starts ingest and the raw
pyzmq ceiling for real, measures them, writes its JSON, and regenerates its section of a
results file without touching the sections written by hand. (The peers, NATS, Redis,
Tansu and mosquitto, are installed by bench/install-peers.sh for `make bench`, not for
the test suite; their drivers run in the real benchmark.)"""

import json

from bench import compare, measure, report

HAND_WRITTEN = "# Benchmark results\n\n## Storage kernels\n\nwritten by hand, kept as it is\n"


def test_harness_measures_ingest_and_the_ceiling_and_regenerates_only_its_own_section(tmp_path):
    out = tmp_path / "run.json"
    code = compare.main(["--systems", "zmq,ingest", "--records", "3000", "--latency-records", "200",
                         "--payloads", "100 B binary", "--producers", "1", "--out", str(out), "--no-report"])
    result = json.loads(out.read_text())
    assert code == 0, result["errors"]
    rows = {(r["system"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {("pyzmq", "PUSH->PULL (ceiling)"), ("ingest", "PUSH RECORD frames"),
                         ("ingest", "raw listener"), ("ingest", "SDK send() acks=1"),
                         ("ingest", "SDK send() acks=fsync"), ("ingest", "Consumer records()")}
    for row in rows.values():
        assert row["records"] == 3000 and row["records_per_s"] > 0 and row["cpu_s_per_million"] >= 0, row
    assert rows[("ingest", "SDK send() acks=fsync")]["ack"] == "fsynced"
    assert rows[("pyzmq", "PUSH->PULL (ceiling)")]["ack"] == "none"
    latency = {r["mode"]: r for r in result["latency"]}
    assert set(latency) == {"SDK acks=1", "SDK acks=fsync"}
    for entry in latency.values():
        assert entry["records"] == 200 and 0 < entry["p50_ms"] <= entry["p99_ms"] <= entry["max_ms"], entry

    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(HAND_WRITTEN)
    for _ in range(2):  # regenerating replaces the section, it does not append a second one
        assert report.main([str(out), "--markdown", str(markdown), "--no-plots"]) == 0
    text = markdown.read_text()
    assert text.startswith(HAND_WRITTEN)
    assert text.count(report.COMPARE_BEGIN) == 1 and text.count(report.COMPARE_END) == 1
    assert "| ingest | SDK send() acks=fsync | fsynced |" in text


def test_latency_percentiles_come_from_the_samples():
    summary = measure.latency_summary([i / 1000 for i in range(1, 1001)], rate_per_s=1000)
    assert (summary["p50_ms"], summary["p99_ms"], summary["p999_ms"], summary["max_ms"]) == (501, 991, 1000, 1000)
    assert summary["cdf"][-1] == [1000.0, 1.0]
