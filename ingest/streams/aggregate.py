"""Windowed aggregation per key: keys to dense ids, the kernel's state, closed windows out.

The kernel (window_kernel.aggregate) does the per-record work; this class maps keys to
ids, grows the state arrays, and turns closed windows into output rows sorted by
(window start, key bytes). That order does not depend on where chunks begin and end:
every window closed in a chunk closes at a stream time past those of earlier chunks, and
windows with the same start close together. A replay after a crash therefore writes the
very same sequence of records.
"""

from __future__ import annotations

import logging

import numpy as np

from ingest.streams import window_kernel as wk
from ingest.streams.spec import ProcessorConfig

log = logging.getLogger("ingest.streams")

# Keys tracked per partition before the state is compacted (keys with no open window
# are forgotten): bounds memory for fleets whose devices come and go.
KEYS_COMPACT_AT = 100_000
INITIAL_KEYS = 64


class WindowedAggregate:
    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config
        self.window_ms = config.window_ms
        self.hop_ms = config.hop_ms
        self.grace_ms = config.grace_ms
        self.fields = len(config.fields)
        self.slots = wk.slots_per_key(self.window_ms, self.hop_ms, self.grace_ms)
        self.windows_per_record = -(-self.window_ms // self.hop_ms)
        self._ids: dict[int, int] = {}  # key hash -> dense id
        self._keys: list[bytes | None] = []  # dense id -> key
        self.state = wk.new_state(INITIAL_KEYS, self.slots, self.fields)
        self.key_collisions = 0

    # ---- state -------------------------------------------------------------------------

    @property
    def stream_time_ms(self) -> int:
        return int(self.state[-1][wk.SC_STREAM_TIME])

    @property
    def late_records(self) -> int:
        return int(self.state[-1][wk.SC_LATE])

    def open_windows(self) -> int:
        return int(np.count_nonzero(self.state[0][:len(self._keys)] != wk.EMPTY))

    def replay_offset(self, default: int) -> int:
        """First source offset of the oldest open window (`default` if none is open)."""
        win, first_off = self.state[0], self.state[1]
        occupied = win != wk.EMPTY
        return int(first_off[occupied].min()) if occupied.any() else default

    def restore(self, stream_time_ms: int) -> None:
        """Start a replay at the stream time stored with a position."""
        self.state[-1][wk.SC_STREAM_TIME] = stream_time_ms

    # ---- keys --------------------------------------------------------------------------

    def key_ids(self, buffer: np.ndarray, key_offsets: np.ndarray, key_lengths: np.ndarray) -> np.ndarray:
        hashes = np.empty(key_offsets.size, np.int64)
        wk.fnv1a64(buffer, key_offsets, key_lengths, hashes)
        unique, first_rows, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        local_to_id = np.empty(unique.size, np.int64)
        for j, (h, row) in enumerate(zip(unique.tolist(), first_rows.tolist())):
            kid = self._ids.get(h)
            length = int(key_lengths[row])
            key = None if length < 0 else bytes(buffer[key_offsets[row]:key_offsets[row] + length])
            if kid is None:
                kid = self._ids[h] = len(self._keys)
                self._keys.append(key)
            elif self._keys[kid] != key:
                self.key_collisions += 1  # 64-bit hash collision: the two keys share windows
            local_to_id[j] = kid
        self._grow(len(self._keys))
        return local_to_id[inverse]

    def _grow(self, keys: int) -> None:
        capacity = self.state[0].shape[0]
        if keys <= capacity:
            return
        new = wk.new_state(max(keys, 2 * capacity), self.slots, self.fields)
        for old, fresh in zip(self.state[:-2], new[:-2]):
            fresh[:capacity] = old
        new[-2][:capacity] = self.state[-2]
        new[-1][:] = self.state[-1]
        self.state = new

    # ---- records -----------------------------------------------------------------------

    def add(self, key_ids: np.ndarray, timestamps_ms: np.ndarray, offsets: np.ndarray,
            values: np.ndarray, live: bool) -> list[tuple]:
        """Aggregate rows (offset order); returns closed windows as
        (window_start_ms, key, count, stats (fields, 5)) sorted by (start, key)."""
        capacity = key_ids.size * self.windows_per_record + self.state[0].size + 1
        out = wk.new_output(capacity, self.fields)
        n = wk.aggregate(key_ids, timestamps_ms, offsets, np.ascontiguousarray(values), self.window_ms,
                         self.hop_ms, self.grace_ms, live, *self.state, *out)
        if n < 0:
            raise AssertionError(f"window kernel failed with code {n}")
        out_key, out_win, out_cnt, out_stats = out
        rows = [(int(out_win[i]) * self.hop_ms, self._keys[out_key[i]], int(out_cnt[i]), out_stats[i])
                for i in range(n)]
        rows.sort(key=lambda r: (r[0], b"" if r[1] is None else b"\x01" + r[1]))
        if len(self._keys) > KEYS_COMPACT_AT:
            self._compact()
        return rows

    def _compact(self) -> None:
        """Forget keys without an open window (ids are renumbered; windows kept)."""
        win = self.state[0][:len(self._keys)]
        live = np.flatnonzero((win != wk.EMPTY).any(axis=1))
        if live.size > KEYS_COMPACT_AT // 2:
            return
        new = wk.new_state(max(INITIAL_KEYS, 2 * live.size), self.slots, self.fields)
        for old, fresh in zip(self.state[:-2], new[:-2]):
            fresh[:live.size] = old[live]
        new[-2][:live.size] = self.state[-2][live]
        new[-1][:] = self.state[-1]
        keys = [self._keys[i] for i in live.tolist()]
        self._ids = {h: new_id for new_id, h in enumerate(self._hash(k) for k in keys)}
        self._keys = keys
        self.state = new

    @staticmethod
    def _hash(key: bytes | None) -> int:
        if key is None:
            return 0
        buf = np.frombuffer(key, np.uint8) if key else np.zeros(0, np.uint8)
        out = np.empty(1, np.int64)
        wk.fnv1a64(buf, np.zeros(1, np.int64), np.array([len(key)], np.int64), out)
        return int(out[0])
