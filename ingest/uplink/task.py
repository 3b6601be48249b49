"""The worker's uplink task: every configured uplink, for the partitions this worker owns.

`WorkerUplinks` is the worker's one handle on every configured uplink: the worker calls
`attach` for each partition it opens, `pump` once per loop turn, `keep_from` in retention,
`gauges` with each heartbeat and `close` when it drains. Without [[uplink]] tables each of
these returns at once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ingest.uplink.shipper import Uplink

# Free space on the data disk is looked up at most this often (one statfs).
DISK_CHECK_INTERVAL_S = 1.0
# A draining worker waits this long for records in flight to be delivered before it
# commits what was and exits (well inside the supervisor's shutdown_timeout_ms).
DRAIN_DELIVERY_TIMEOUT_S = 5.0


class WorkerUplinks:
    def __init__(self, configs, worker_id: int, probe, data_dir) -> None:
        appliance_id = read_appliance_id(data_dir) if configs else ""
        self.uplinks = [Uplink(c, worker_id, probe, appliance_id) for c in configs if c.enabled]
        self.data_dir = data_dir
        self.disk_free_bytes_min = max((c.disk_free_bytes_min for c in configs), default=0)
        self._disk_short = False
        self._disk_checked_s = 0.0

    def attach(self, part) -> None:
        for uplink in self.uplinks:
            uplink.attach(part)

    def pump(self, now_ms: int) -> None:
        for uplink in self.uplinks:
            try:
                uplink.pump(now_ms)
            except Exception:  # noqa: BLE001 - forwarding must never take the worker's intake down
                uplink.on_internal_error()

    def wait_ms(self, now_ms: int, idle_ms: int) -> int:
        return min((u.wait_ms(now_ms, idle_ms) for u in self.uplinks), default=idle_ms)

    def keep_from(self, part, disk_full: bool) -> int | None:
        """The first offset retention must keep in this partition (not yet shipped by every
        uplink), or None: no uplink ships it, or the disk is short of space and retention
        goes on as configured (the uplinks count what they lose)."""
        offsets = [o for o in (u.delivered_offset(part) for u in self.uplinks) if o is not None]
        if not offsets or disk_full or self._disk_is_short():
            return None
        return min(offsets)

    def _disk_is_short(self) -> bool:
        t = time.monotonic()
        if t - self._disk_checked_s >= DISK_CHECK_INTERVAL_S:
            self._disk_checked_s = t
            try:
                self._disk_short = shutil.disk_usage(self.data_dir).free < self.disk_free_bytes_min
            except OSError:
                self._disk_short = False
        return self._disk_short

    def gauges(self, now_ms: int) -> list:
        return [row for u in self.uplinks for row in u.gauges(now_ms)]

    def close(self) -> None:
        for uplink in self.uplinks:
            uplink.close(DRAIN_DELIVERY_TIMEOUT_S)


def read_appliance_id(data_dir) -> str:
    """The appliance's id (meta.json, written by the supervisor before it starts workers):
    part of the `ingest.offset` header that tells this appliance's records from others'."""
    try:
        return json.loads((Path(data_dir) / "meta.json").read_text())["appliance_id"]
    except (OSError, ValueError, KeyError):
        return "unknown"
