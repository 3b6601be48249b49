"""Overload: more PUSH records and more acked produce than the appliance can take.

The promises: memory stays bounded (every queue has a named limit); fire-and-forget
accounting is exact (every record a device managed to send is either stored or counted as
dropped or invalid, never silently gone); an acked producer only ever gets an ack for a
record that is stored at the acked offset (overload answers THROTTLED, never a false ack).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil

from tests.faults.flood import value
from tests.faults.harness import Verdict, by_mode, fetch_partition, settled
from tests.support import Appliance, create_topic, eventually, metric_value

ROOT = Path(__file__).resolve().parents[2]
# A worker's queues are bounded by [limits] and the worker's own constants; this is the
# issue's budget for a worker's resident memory under any load.
WORKER_RSS_BYTES_MAX = 300 << 20
CONFIG = """
[server]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 5000

[limits]
inflight_bytes_max = 65536
forward_sndhwm = 4
pull_rcvhwm = 256
"""
# The limits are lowered so that overload shows in a few seconds on 2 cores: acked
# produce meets THROTTLED, and records forwarded to the other worker overflow its queue
# (counted drops), so the accounting below is tested with drops, not only without.
PUSH_PROCESSES = 3
PUSH_PARTITIONS = 4
ACKED_VALUE_BYTES = 48
ACKED_RECORDS_PER_BATCH = 20


def flood(out: Path, mode: str, *args: str) -> subprocess.Popen:
    """A flood process writing its result to `out` (a pipe would fill and block it)."""
    return subprocess.Popen([sys.executable, "-m", "tests.faults.flood", mode, *args, "--out", str(out)],
                            cwd=ROOT, stderr=open(out.with_suffix(".err"), "wb"))


def test_overload_keeps_worker_memory_bounded_and_accounts_for_every_record(tmp_path, ledger):
    row = ledger("overload: PUSH floods (NOBLOCK) and pipelined acked produce beyond capacity",
                 f"worker RSS < {WORKER_RSS_BYTES_MAX >> 20} MB; PUSH sent = stored + counted drops; "
                 "every ack names a stored record")
    seconds = by_mode(8, 20)
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    procs = []
    try:
        create_topic(app, "flood", PUSH_PARTITIONS)
        create_topic(app, "acked", 2)
        pids = app.worker_pids()
        for i in range(PUSH_PROCESSES):
            procs.append(flood(tmp_path / f"push-{i}.json", "push", "--endpoint", app.worker_endpoints(i % 2)[0], "--topic", "flood",
                               "--id", str(i), "--seconds", str(seconds), "--partitions", str(PUSH_PARTITIONS)))
        for w in (0, 1):
            procs.append(flood(tmp_path / f"acked-{w}.json", "acked", "--endpoint", app.worker_endpoints(w)[1], "--topic", "acked",
                               "--id", str(100 + w), "--seconds", str(seconds), "--partition-list", str(w),
                               "--records-per-batch", str(ACKED_RECORDS_PER_BATCH), "--window", "64",
                               "--value-bytes", str(ACKED_VALUE_BYTES)))
        rss_max = 0
        while any(p.poll() is None for p in procs):
            for pid in pids.values():
                rss_max = max(rss_max, psutil.Process(pid).memory_info().rss)
            time.sleep(0.25)
        outputs = []
        for p in procs:
            out = Path(p.args[p.args.index("--out") + 1])
            assert p.wait() == 0, out.with_suffix(".err").read_text()
            outputs.append(orjson.loads(out.read_bytes()))
        pushed, acked = outputs[:PUSH_PROCESSES], outputs[PUSH_PROCESSES:]

        stored = settled(app, "flood", PUSH_PARTITIONS)
        assert eventually(lambda: metric_value(app.metrics_text(), "ingest_records_received_total",
                                               topic="flood") == stored, 10)
        text = app.metrics_text()
        reply_drops = metric_value(text, "ingest_records_dropped_total", reason="reply_queue_full")
        dropped = metric_value(text, "ingest_records_dropped_total") - reply_drops
        invalid = metric_value(text, "ingest_frames_invalid_total")
        sent = sum(o["sent"] for o in pushed)

        verdict = judge_acked(app, acked)
        row.rounds = 1
        row.acked_checked, row.lost, row.duplicated = verdict.acked, len(verdict.lost), len(verdict.duplicated)
        row.notes.update({
            "seconds": seconds, "worker_rss_max_mb": round(rss_max / 2**20, 1),
            "push_sent": sent, "push_would_block": sum(o["would_block"] for o in pushed),
            "push_stored": stored, "push_dropped": int(dropped), "push_invalid": int(invalid),
            "reply_queue_full": int(reply_drops),
            "acked_batches": sum(len(o["acks"]) for o in acked),
            "acked_errors": {k: sum(o["errors"].get(k, 0) for o in acked) for o in acked for k in o["errors"]},
            "acked_unanswered": sum(len(o["unanswered"]) for o in acked),
        })
        assert app.worker_pids() == pids, "a worker died under overload"
        assert rss_max < WORKER_RSS_BYTES_MAX, f"worker RSS reached {rss_max / 2**20:.0f} MB"
        assert sent == stored + dropped + invalid, row.notes
        assert dropped > 0 and row.notes["acked_errors"].get("THROTTLED"), "not overloaded: nothing tested"
        verdict.assert_clean()
        assert app.stop() == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        app.kill()


def judge_acked(app: Appliance, acked: list[dict]) -> Verdict:
    """Every acked batch's records at their acked offsets; anything else stored must come
    from a batch whose reply never arrived; nothing stored twice."""
    stored: dict[int, dict[int, bytes]] = {}
    for p in (0, 1):
        stored[p] = {r.offset: r.value for r in fetch_partition(app, "acked", p).records}
    verdict = Verdict()
    expected_values: set[bytes] = set()
    for source, result in enumerate(acked):
        for n in result["unanswered"]:
            expected_values |= {value(100 + source, n, r, ACKED_VALUE_BYTES) for r in range(ACKED_RECORDS_PER_BATCH)}
        for n, partition, base, last in result["acks"]:
            for r, offset in enumerate(range(base, last + 1)):
                v = value(100 + source, n, r, ACKED_VALUE_BYTES)
                expected_values.add(v)
                verdict.acked += 1
                if stored[partition].get(offset) != v:
                    verdict.lost.append((v, offset, stored[partition].get(offset)))
    seen: dict[bytes, int] = {}
    for p, records in stored.items():
        for offset, v in records.items():
            seen[v] = seen.get(v, 0) + 1
            if v not in expected_values:
                verdict.foreign.append((offset, v))  # stored although refused (THROTTLED...)
    verdict.duplicated = [(v, n) for v, n in seen.items() if n > 1]
    return verdict
