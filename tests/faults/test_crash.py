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
import subprocess
import sys
import time

from ingest.net import wire
from tests.faults.harness import (
    SOAK,
    Verdict,
    account,
    by_mode,
    check_producers_healthy,
    rng_for,
    start_producers,
    stop_producers,
    verify,
    verify_partition,
)
from tests.support import Appliance, create_topic, eventually, metric_value

# Small segments so that segments roll under load and recovery meets sealed segments,
# recovery points and rolls cut short by the kill; fast heartbeats so a restarted worker
# shows up (and metrics arrive) quickly.
CONFIG = """
[server]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000

[storage]
segment_bytes = 262144
"""
PARTITIONS = 4
# Two producers on partitions 0 and 1: their batches interleave in one log.
PRODUCER_PARTITIONS = [0, 1, 2, 3, 0, 1]
# Soak runs verify everything every this many rounds, and only what is new in between
# (a full read of a log that grows every round would dominate a 200-round run).
FULL_CHECK_EVERY_ROUNDS = 10
# A restarted worker or appliance must serve again within this (cold numba cache, a
# recovery scan and the supervisor's restart backoff, on a busy 2-core machine).
RESTART_TIMEOUT_S = 60


class RoundChecker:
    """Verifies, after each round, the records acked before its fault; keeps the union
    of every value found lost or stored twice over all rounds."""

    def __init__(self, app: Appliance, topic: str, producers) -> None:
        self.app, self.topic, self.producers = app, topic, producers
        self.verified_end: dict[int, int] = {}
        self.lost: set = set()
        self.duplicated: set = set()
        self.bad_rounds: list[int] = []
        self.checks = 0

    def snapshot(self) -> dict[int, dict[bytes, int]]:
        by_partition: dict[int, dict[bytes, int]] = {}
        for p in self.producers:
            by_partition.setdefault(p.partition, {}).update(p.acked_snapshot())
        return by_partition

    def check(self, round_number: int, snapshot: dict[int, dict[bytes, int]], full: bool) -> None:
        verdict = Verdict()
        for partition, acked in snapshot.items():
            start = 0 if full else self.verified_end.get(partition, 0)
            verdict.add(verify_partition(self.app, self.topic, partition, self.producers, acked, start))
            self.verified_end[partition] = max(acked.values(), default=-1) + 1
        self.checks += verdict.acked
        self.lost |= {v for v, *_ in verdict.lost}
        self.duplicated |= {v for v, _ in verdict.duplicated}
        if verdict.lost or verdict.duplicated or verdict.foreign or verdict.corrupt_served:
            self.bad_rounds.append(round_number)

    def finish(self, row, final: Verdict) -> None:
        self.lost |= {v for v, *_ in final.lost}
        self.duplicated |= {v for v, _ in final.duplicated}
        account(row, final)
        row.lost, row.duplicated = len(self.lost), len(self.duplicated)
        row.notes["per_round_checks"] = self.checks
        assert not self.bad_rounds, f"rounds with lost or duplicated records: {self.bad_rounds}"


def wait_for_progress(producers, batches: int = 2) -> None:
    for p in producers:
        if not p.wait_acked(batches, RESTART_TIMEOUT_S):
            check_producers_healthy(producers)
            raise AssertionError(f"producer {p.producer_id} made no progress")


def ingest_check(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingest.cli", "check", str(data_dir)],
                          capture_output=True, text=True)


def run_appliance_kills(app: Appliance, topic: str, producers, rounds: int, rng, row) -> RoundChecker:
    """`rounds` times: let every producer get acks, wait a random moment, kill -9 the
    process group; sometimes kill it again while it recovers; restart and verify."""
    checker = RoundChecker(app, topic, producers)
    for r in range(rounds):
        wait_for_progress(producers)
        time.sleep(rng.uniform(0, 1.2))
        app.kill()
        snapshot = checker.snapshot()  # nothing more can be acked: nobody is serving
        if rng.random() < 0.2:
            app.start(wait=False)  # killed again mid-recovery (or mid-warm-up)
            time.sleep(rng.uniform(0.05, 1.0))
            app.kill()
        app.start()
        row.rounds = r + 1
        checker.check(r, snapshot, full=(r + 1) % FULL_CHECK_EVERY_ROUNDS == 0 or not SOAK)
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
            p._stop.set()
        app.kill()
    check = ingest_check(tmp_path / "data")
    assert check.returncode == 0, check.stdout + check.stderr


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
        checker = run_appliance_kills(app, "written", producers, by_mode(3, 50), rng, row)
        stop_producers(producers)
        final = verify(app, "written", range(PARTITIONS), producers)
        checker.finish(row, final)
        final.assert_clean()
    finally:
        for p in producers:
            p._stop.set()
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
            checker.check(r, snapshot, full=(r + 1) % FULL_CHECK_EVERY_ROUNDS == 0 or not SOAK)
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
            p._stop.set()
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
    rounds = by_mode(3, 30)
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
            checker.check(r, snapshot, full=(r + 1) % FULL_CHECK_EVERY_ROUNDS == 0 or not SOAK)
        stop_producers(producers)
        final = verify(app, "drain", range(PARTITIONS), producers)
        checker.finish(row, final)
        row.notes["drain_seconds_max"] = round(drain_s_max, 2)
        final.assert_clean()
        assert app.stop() == 0
    finally:
        for p in producers:
            p._stop.set()
        app.kill()
    check = ingest_check(tmp_path / "data")
    assert check.returncode == 0, check.stdout + check.stderr
