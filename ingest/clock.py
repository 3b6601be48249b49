"""The two clocks: wall time for record timestamps, monotonic time for deadlines."""

import time


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch: record timestamps, retention by age."""
    return time.time_ns() // 1_000_000


def mono_ms() -> int:
    """Monotonic milliseconds: flush intervals, timeouts, heartbeats (immune to clock steps)."""
    return time.monotonic_ns() // 1_000_000
