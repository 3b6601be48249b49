"""A stalled worker (SIGSTOP: a hung disk, a debugger, swap storms) under acked load.

Its producers time out and resend the same bytes; the supervisor stops calling it ready
(and stops petting systemd's watchdog: tests/test_appliance.py covers NOTIFY_SOCKET);
the other worker goes on serving; after SIGCONT the stalled worker answers everything
that queued up, and idempotence turns the resends into the original offsets: nothing
acked is lost, nothing stored twice, and the worker was never restarted.
"""

from __future__ import annotations

import os
import signal
import time

from tests.faults.harness import (
    CONFIG,
    PARTITIONS,
    RoundChecker,
    by_mode,
    rng_for,
    start_producers,
    stop_producers,
    verify,
    wait_for_progress,
)
from tests.support import Appliance, create_topic, eventually, metric_value


def test_sigstop_of_a_worker_under_acked_load_then_sigcont_loses_and_duplicates_nothing(tmp_path, ledger):
    row = ledger("SIGSTOP of one worker for seconds under acked load, then SIGCONT",
                 "others keep serving; resends deduplicated; nothing acked lost or doubled; no restart")
    rng = rng_for("stall")
    rounds = by_mode(2, 20)
    stall_s = by_mode(4.0, 10.0)
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    producers = []
    try:
        create_topic(app, "stall", PARTITIONS)
        producers = start_producers(app, "stall", list(range(PARTITIONS)), first_id=900)
        checker = RoundChecker(app, "stall", producers)
        for r in range(rounds):
            victim = r % 2
            stalled = [p for p in producers if p.partition % 2 == victim]
            others = [p for p in producers if p.partition % 2 != victim]
            wait_for_progress(producers)
            time.sleep(rng.uniform(0, 0.5))
            pid = app.worker_pids()[victim]
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                acked_before = [p.batches_acked for p in others]
                assert eventually(lambda: app.http_status("/readyz") == 503, stall_s)
                assert eventually(lambda: metric_value(app.metrics_text(), "ingest_worker_up",
                                                       worker=str(victim)) == 0, stall_s)
                time.sleep(max(0.0, stall_s - (time.monotonic() - started)))
                snapshot = checker.snapshot()
                progress = [p.batches_acked - before for p, before in zip(others, acked_before)]
                assert all(n >= 3 for n in progress), f"the other worker stalled too: {progress}"
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_for_progress(stalled)
            assert app.worker_pids()[victim] == pid, "a stalled worker was restarted"
            assert eventually(lambda: app.http_status("/readyz") == 200, 10)
            row.rounds = r + 1
            checker.check(r, snapshot)
        stop_producers(producers)
        final = verify(app, "stall", range(PARTITIONS), producers)
        checker.finish(row, final)
        row.notes["resends"] = sum(p.resends for p in producers)
        row.notes["stall_seconds"] = stall_s
        final.assert_clean()
        assert row.notes["resends"] > 0, "no producer timed out: the stall tested nothing"
        assert app.stop() == 0
    finally:
        for p in producers:
            p.request_stop()
        app.kill()
