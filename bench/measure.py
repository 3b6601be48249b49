"""Running one row: client processes started together, the clock, and CPU on both sides.

A row's clock starts when the first producer starts sending (every client connected and
warmed up before) and stops when the last record is acknowledged, or, for modes without
acks, when the system shows it has every record (``done_at``). CPU seconds are psutil's
user + system time of every server process over the row, plus what each client process
reports for itself over its timed part.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Callable

import psutil

from bench import loads

# A row whose clients have not finished after this long is failed, not waited for (a full
# run's slowest row, 1,000,000 mosquitto QoS 1 messages from paho, takes ~5-10 minutes here).
ROW_TIMEOUT_S = 3600
CLIENT_READY_TIMEOUT_S = 120
# Points kept of each latency CDF in the JSON (plots need no more).
CDF_POINTS = 200

SPAWN = mp.get_context("spawn")


class RowError(RuntimeError):
    """A client of the row failed, or the system did not take every record."""


class CpuMeter:
    """CPU seconds spent by a fixed set of processes between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.before = 0.0

    def _total(self) -> float:
        total = 0.0
        for process in self.processes:
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def start(self) -> None:
        self.before = self._total()

    def stop(self) -> float:
        return self._total() - self.before


class ClientPool:
    """Client processes kept for the whole run, each with its own command queue."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.clients: list = []

    def __enter__(self) -> "ClientPool":
        self._spawn()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self) -> None:
        self.ready, self.results = SPAWN.Queue(), SPAWN.Queue()
        self.clients = []
        for _ in range(self.size):
            commands = SPAWN.Queue()
            process = SPAWN.Process(target=loads.client_loop, args=(commands, self.ready, self.results),
                                     daemon=True)
            process.start()
            self.clients.append((process, commands))

    def close(self) -> None:
        for process, commands in self.clients:
            commands.put(None)
        for process, _commands in self.clients:
            process.join(10)
            if process.is_alive():
                process.kill()
        self.clients = []

    def run(self, commands: list[tuple], meter: "CpuMeter | None" = None) -> list[tuple]:
        """Sets up one command per client, starts them together, returns their reports.

        A client that hangs past ROW_TIMEOUT_S is killed with the others and the pool is
        spawned anew, so one stuck row does not stall the rest of the run."""
        assert len(commands) <= self.size, (len(commands), self.size)
        used = self.clients[:len(commands)]
        try:
            for (_process, queue), command in zip(used, commands):
                queue.put(command)
            for _ in used:
                self.ready.get(timeout=CLIENT_READY_TIMEOUT_S)
            if meter is not None:
                meter.start()
            for _process, queue in used:
                queue.put("go")
            reports = [self.results.get(timeout=ROW_TIMEOUT_S) for _ in used]
        except Exception as e:
            for process, _queue in self.clients:
                process.kill()
            self._spawn()
            raise RowError(f"clients did not finish: {type(e).__name__}: {e}") from e
        errors = [r[-1] for r in reports if r[-1]]
        if errors:
            raise RowError("; ".join(errors))
        return reports


def _shares(count: int, parts: int) -> list[int]:
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def run_produce(pool: ClientPool, server_pids: list[int], target: dict, payload: bytes, count: int,
                producers: int, done_at: Callable[[], float] | None = None) -> dict:
    """Produce ``count`` records from ``producers`` processes; returns the row's numbers."""
    meter = CpuMeter(server_pids)
    commands = [("produce", target, payload, share, index) for index, share in enumerate(_shares(count, producers))]
    reports = pool.run(commands, meter)
    finished = max(r[2] for r in reports)
    if done_at is not None:
        finished = max(finished, done_at())
    server_cpu_s = meter.stop()
    started = min(r[1] for r in reports)
    return _numbers(count, len(payload), finished - started, server_cpu_s, sum(r[3] for r in reports))


def run_read(pool: ClientPool, server_pids: list[int], target: dict, count: int, value_bytes: int) -> dict:
    """One reader process reads ``count`` records from the beginning."""
    meter = CpuMeter(server_pids)
    (got, started, finished, client_cpu_s, _error), = pool.run([("read", target, count)], meter)
    server_cpu_s = meter.stop()
    if got < count:
        raise RowError(f"read {got} of {count} records")
    return _numbers(count, value_bytes, finished - started, server_cpu_s, client_cpu_s)


def _numbers(count: int, value_bytes: int, seconds: float, server_cpu_s: float, client_cpu_s: float) -> dict:
    assert seconds > 0, seconds
    return {
        "records": count, "seconds": round(seconds, 4),
        "records_per_s": round(count / seconds, 1),
        "mb_per_s": round(count * value_bytes / seconds / 1e6, 2),
        "cpu_server_s": round(server_cpu_s, 3), "cpu_client_s": round(client_cpu_s, 3),
        "cpu_s_per_million": round((server_cpu_s + client_cpu_s) / count * 1e6, 2),
    }


def run_latency(pool: ClientPool, target: dict, payload: bytes, rate_per_s: float, count: int) -> dict:
    """One producer offers ``count`` records at ``rate_per_s``; percentiles of ack latency."""
    (latencies_s, *_rest), = pool.run([("latency", target, payload, rate_per_s, count)])
    return latency_summary(latencies_s, rate_per_s)


def latency_summary(latencies_s: list[float], rate_per_s: float) -> dict:
    ordered = sorted(latencies_s)
    n = len(ordered)
    if n == 0:
        raise RowError("no latency samples")

    def quantile_ms(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] * 1e3, 3)

    cdf_step = max(1, n // CDF_POINTS)
    cdf = [[round(ordered[i] * 1e3, 3), round((i + 1) / n, 5)] for i in range(0, n, cdf_step)]
    cdf.append([round(ordered[-1] * 1e3, 3), 1.0])
    return {"rate_per_s": rate_per_s, "records": n, "p50_ms": quantile_ms(0.50), "p99_ms": quantile_ms(0.99),
            "p999_ms": quantile_ms(0.999), "max_ms": round(ordered[-1] * 1e3, 3),
            "mean_ms": round(statistics.fmean(ordered) * 1e3, 3), "cdf": cdf}


def poll_until(check: Callable[[], bool], timeout_s: float = ROW_TIMEOUT_S, interval_s: float = 0.005) -> float:
    """Polls ``check`` until true; returns the monotonic time it first was."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RowError(f"not done after {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic()
