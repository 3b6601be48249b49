"""Group commit off the event loop: a thread that only runs fdatasync.

fdatasync takes a fraction of a millisecond to several milliseconds and releases the GIL,
so the worker's loop keeps taking in records while a flush is in the kernel. The thread
touches no log state: it gets (partition, fd, target offset), syncs the fd, and hands the
result back through a deque plus a wake-up frame on an inproc PAIR socket that the
worker's poller watches. The loop then marks the offsets durable and sends the acks.

Contract: at most one flush in flight per partition (the worker tracks `in_flight`), and
the worker neither closes a log nor applies retention to it while its flush is in flight.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq


@dataclass(slots=True)
class FlushResult:
    part: object
    target_offset: int
    seconds: float
    error: OSError | None


class Flusher:
    def __init__(self, ctx: zmq.Context, name: str) -> None:
        endpoint = f"inproc://flusher-{name}-{id(self)}"
        self.wake = ctx.socket(zmq.PAIR)  # read by the worker loop
        self.wake.bind(endpoint)
        self._signal = ctx.socket(zmq.PAIR)  # written by the flusher thread only
        self._signal.connect(endpoint)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: deque[FlushResult] = deque()
        self.in_flight: set = set()
        self._thread = threading.Thread(target=self._run, name=f"flusher-{name}", daemon=True)
        self._thread.start()

    def submit(self, part, fd: int, target_offset: int) -> None:
        assert part not in self.in_flight
        self.in_flight.add(part)
        self._jobs.put((part, fd, target_offset))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._signal.close(linger=0)
                return
            part, fd, target = job
            started = time.perf_counter()
            try:
                os.fdatasync(fd)
                error = None
            except OSError as e:
                error = e
            self.results.append(FlushResult(part, target, time.perf_counter() - started, error))
            try:
                self._signal.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # wake-ups already queued: the loop takes every result at once

    def take_results(self) -> list[FlushResult]:
        """Finished flushes, for the worker's thread; clears their in-flight marks."""
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        done = []
        while self.results:
            result = self.results.popleft()
            self.in_flight.discard(result.part)
            done.append(result)
        return done

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)
        self.wake.close(linger=0)
