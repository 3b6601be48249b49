"""Crashes under acked load: kill -9 of the whole appliance, of one worker, a power loss
simulated by dropping every unsynced write, and SIGTERM drains. The promise each test
checks: every acked record is readable exactly once at its acked offset, and no record is
ever stored twice.

Producers run in threads throughout a test and resend the same batch bytes until acked,
across restarts: the appliance's idempotence must turn those resends into the original
offsets, also when the original was written just before the crash.
"""

from __future__ import annotations

import os
import signal
import time

from ingest.net import wire
from tests.faults.harness import (
    CONFIG,
    PARTITIONS,
    RESTART_TIMEOUT_S,
    RoundChecker,
    assert_data_dir_checks_clean,
    by_mode,
    rng_for,
    start_producers,
    stop_producers,
    verify,
    wait_for_progress,
)
from tests.support import Appliance, create_topic, eventually, metric_value

# Two producers on partitions 0 and 1: their batches interleave in one log.
PRODUCER_PARTITIONS = [0, 1, 2, 3, 0, 1]


def run_appliance_kills(app: Appliance, topic: str, producers, rounds: int, rng, row) -> RoundChecker:
    """`rounds` times: let every producer get acks, wait a random moment, kill -9 the
    process group; sometimes kill it again while it recovers; restart and verify."""
    checker = RoundChecker(app, topic, producers)
    for r in range(rounds):
        wait_for_progress(producers)
        time.sleep(rng.uniform(0, 0.8))
        app.kill()
        snapshot = checker.snapshot()  # nothing more can be acked: nobody is serving
        if rng.random() < 0.2:
            app.start(wait=False)  # killed again mid-recovery (or mid-warm-up)
            time.sleep(rng.uniform(0.05, 1.0))
            app.kill()
        app.start()
        row.rounds = r + 1
        checker.check(r, snapshot)
    return checker


def test_kill_9_of_the_appliance_at_random_moments_keeps_every_fsynced_ack_exactly_once(tmp_path, ledger):
    row = ledger("kill -9 of the whole appliance under load",
                 "acks=fsync: every acked record readable exactly once at its offset")
    rng = rng_for("kill-appliance")
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    producers = []
    try:
        create_topic(app, "crash", PARTITIONS)
        producers = start_producers(app, "crash", PRODUCER_PARTITIONS, first_id=100)
        checker = run_appliance_kills(app, "crash", producers, by_mode(10, 200), rng, row)
        stop_producers(producers)
        final = verify(app, "crash", range(PARTITIONS), producers)
        checker.finish(row, final)
        final.assert_clean()
        row.notes["resends"] = sum(p.resends for p in producers)
        assert "recovered by scanning its tail" in app.log()
        assert app.stop() == 0
    finally:
        for p in producers:
            p.request_stop()
        app.kill()
    assert_data_dir_checks_clean(tmp_path / "data")


def test_acks_1_records_survive_kill_9_of_the_appliance(tmp_path, ledger):
    """acks=1 promises: survives a process crash (the page cache outlives the process),
    not a power loss."""
    row = ledger("kill -9 of the whole appliance, acks=1",
                 "acks=1: every acked record survives a process crash")
    rng = rng_for("kill-appliance-acks-1")
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    producers = []
    try:
        create_topic(app, "written", PARTITIONS)
        producers = start_producers(app, "written", list(range(PARTITIONS)), first_id=300,
                                    acks=wire.Durability.WRITTEN)
        checker = run_appliance_kills(app, "written", producers, by_mode(2, 50), rng, row)
        stop_producers(producers)
        final = verify(app, "written", range(PARTITIONS), producers)
        checker.finish(row, final)
        final.assert_clean()
    finally:
        for p in producers:
            p.request_stop()
        app.kill()


def test_kill_9_of_either_worker_under_load_loses_and_duplicates_no_acked_record(tmp_path, ledger):
    row = ledger("kill -9 of one worker under load (both workers in turn)",
                 "the supervisor restarts it; producers carry on; nothing acked lost or doubled")
    rng = rng_for("kill-worker")
    rounds = by_mode(4, 40)
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    producers = []
    try:
        create_topic(app, "workers", PARTITIONS)
        producers = start_producers(app, "workers", list(range(PARTITIONS)), first_id=500)
        checker = RoundChecker(app, "workers", producers)
        for r in range(rounds):
            victim = r % 2
            wait_for_progress(producers)
            time.sleep(rng.uniform(0, 1.0))
            pid = app.worker_pids()[victim]
            snapshot = checker.snapshot()  # acked before the kill
            os.kill(pid, signal.SIGKILL)
            assert eventually(lambda: _worker_back(app, victim, pid), RESTART_TIMEOUT_S), \
                f"worker {victim} was not restarted:\n{app.log()[-3000:]}"
            row.rounds = r + 1
            checker.check(r, snapshot)
        stop_producers(producers)
        final = verify(app, "workers", range(PARTITIONS), producers)
        checker.finish(row, final)
        final.assert_clean()
        for w in (0, 1):
            kills = len(range(w, rounds, 2))
            assert eventually(lambda: metric_value(app.metrics_text(), "ingest_worker_restarts_total",
                                                   worker=str(w)) == kills, 5)
        row.notes["resends"] = sum(p.resends for p in producers)
        assert app.stop() == 0
    finally:
        for p in producers:
            p.request_stop()
        app.kill()


def _worker_back(app: Appliance, worker_id: int, old_pid: int) -> bool:
    try:
        row = next(w for w in app.metadata(timeout_ms=1000)["workers"] if w["id"] == worker_id)
    except TimeoutError:
        return False
    return row["pid"] not in (None, old_pid) and row["up"]


def test_sigterm_under_load_drains_in_time_and_restart_skips_the_scan(tmp_path, ledger):
    row = ledger("SIGTERM under load, then restart",
                 "drains within TimeoutStopSec (20 s), clean markers, restart skips the scan, nothing acked lost")
    rng = rng_for("sigterm")
    rounds = by_mode(2, 30)
    app = Appliance(tmp_path / "data", workers=2, config_text=CONFIG).start()
    producers = []
    drain_s_max = 0.0
    try:
        create_topic(app, "drain", PARTITIONS)
        producers = start_producers(app, "drain", list(range(PARTITIONS)), first_id=700)
        checker = RoundChecker(app, "drain", producers)
        for r in range(rounds):
            wait_for_progress(producers)
            time.sleep(rng.uniform(0, 1.0))
            started = time.monotonic()
            code = app.stop(signal.SIGTERM, timeout_s=30)
            drain_s = time.monotonic() - started
            drain_s_max = max(drain_s_max, drain_s)
            snapshot = checker.snapshot()
            assert code == 0, app.log()[-3000:]
            assert drain_s < 20, f"drain took {drain_s:.1f} s"
            for p in range(PARTITIONS):
                assert (tmp_path / "data" / f"drain-{p}" / "clean-shutdown").exists(), p
            log_before = len(app.log())
            app.start()
            restart_log = app.log()[log_before:]
            for p in range(PARTITIONS):
                assert f"drain-{p}: clean shutdown, scan skipped" in restart_log, restart_log
            row.rounds = r + 1
            checker.check(r, snapshot)
        stop_producers(producers)
        final = verify(app, "drain", range(PARTITIONS), producers)
        checker.finish(row, final)
        row.notes["drain_seconds_max"] = round(drain_s_max, 2)
        final.assert_clean()
        assert app.stop() == 0
    finally:
        for p in producers:
            p.request_stop()
        app.kill()
    assert_data_dir_checks_clean(tmp_path / "data")
