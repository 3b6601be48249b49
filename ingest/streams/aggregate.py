"""Windowed aggregation per key: keys to dense ids, the kernel's state, closed windows out.

The kernel (window_kernel.aggregate) does the per-record work; this class maps keys to
ids, grows the state arrays, and turns closed windows into output rows sorted by
(window start, key bytes). That order does not depend on where chunks begin and end:
every window closed in a chunk closes at a stream time past those of earlier chunks, and
windows with the same start close together. A replay after a crash therefore writes the
very same sequence of records.

Keys are told apart by their 64-bit FNV-1a hash: two keys with the same hash (odds about
n^2 / 2^65 for n keys: 3e-8 at a million) would share windows, under the first one's key.
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
        # Keys by dense id, their hashes, and the kernel's hash table from hash to id.
        self._keys: list[bytes | None] = []
        self._key_hashes: list[int] = []
        self._table_hashes = np.zeros(2 * INITIAL_KEYS, np.int64)
        self._table_ids = np.full(2 * INITIAL_KEYS, -1, np.int64)
        self.state = wk.new_state(INITIAL_KEYS, self.slots, self.fields)
        self._ranks = np.zeros(0, np.int64)
        self._key_columns: tuple | None = None

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
        """Dense ids of the rows' keys (64-bit FNV-1a hashes through a kernel's hash table);
        Python sees only keys new to this partition."""
        if len(self._keys) > KEYS_COMPACT_AT:  # here, before ids are handed out: ids stay valid
            self._compact()                      # until the next call
        hashes = np.empty(key_offsets.size, np.int64)
        wk.fnv1a64(buffer, key_offsets, key_lengths, hashes)
        self._reserve(len(self._keys) + hashes.size)
        ids = np.empty(hashes.size, np.int64)
        new_rows = np.empty(hashes.size, np.int64)
        n_new = wk.assign_key_ids(hashes, self._table_hashes, self._table_ids, len(self._keys), ids, new_rows)
        for row in new_rows[:n_new].tolist():
            length = int(key_lengths[row])
            at = int(key_offsets[row])
            self._keys.append(None if length < 0 else bytes(buffer[at:at + length]))
            self._key_hashes.append(int(hashes[row]))
        self._grow(len(self._keys))
        return ids

    def _reserve(self, keys: int) -> None:
        """Keep the hash table at most half full for `keys` keys."""
        if 2 * keys <= self._table_ids.size:
            return
        capacity = self._table_ids.size
        while 2 * keys > capacity:
            capacity *= 2
        self._rebuild_table(capacity)

    def _rebuild_table(self, capacity: int) -> None:
        self._table_hashes = np.zeros(capacity, np.int64)
        self._table_ids = np.full(capacity, -1, np.int64)
        hashes = np.array(self._key_hashes, np.int64)
        scratch = np.empty(hashes.size, np.int64)
        n = wk.assign_key_ids(hashes, self._table_hashes, self._table_ids, 0, scratch, np.empty(hashes.size, np.int64))
        assert n == hashes.size, (n, hashes.size)

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
        (window_start_ms, key, count, stats: per field a list of 5 floats) sorted by (start, key)."""
        starts, ids, counts, stats = self.add_arrays(key_ids, timestamps_ms, offsets, values, live)
        keys = self._keys
        return [(start, keys[k], count, st) for start, k, count, st in
                zip(starts.tolist(), ids.tolist(), counts.tolist(), stats.tolist())]

    def add_arrays(self, key_ids: np.ndarray, timestamps_ms: np.ndarray, offsets: np.ndarray,
                   values: np.ndarray, live: bool) -> tuple[np.ndarray, ...]:
        """As add(), as arrays: (window starts, key ids, counts, stats (windows, fields, 5)),
        sorted by (start, key bytes) without a Python loop over the windows."""
        capacity = key_ids.size * self.windows_per_record + self.state[0].size + 1
        out = wk.new_output(capacity, self.fields)
        n = wk.aggregate(key_ids, timestamps_ms, offsets, np.ascontiguousarray(values), self.window_ms,
                         self.hop_ms, self.grace_ms, live, *self.state, *out)
        if n < 0:
            raise AssertionError(f"window kernel failed with code {n}")
        out_key, out_win, out_cnt, out_stats = (a[:n] for a in out)
        order = np.lexsort((self.key_ranks()[out_key], out_win))
        return out_win[order] * self.hop_ms, out_key[order], out_cnt[order], out_stats[order]

    def key_ranks(self) -> np.ndarray:
        """Rank of each key id in key-bytes order (a null key first); recomputed only when
        keys were added or renumbered."""
        if self._ranks.size != len(self._keys):
            order = sorted(range(len(self._keys)), key=lambda i: b"" if self._keys[i] is None else b"\x01" + self._keys[i])
            self._ranks = np.empty(len(self._keys), np.int64)
            self._ranks[order] = np.arange(len(self._keys))
        return self._ranks

    def key_columns(self) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(buffer, offsets, lengths) of every key by id (length -1: null), for outputs."""
        if self._key_columns is None or self._key_columns[1].size != len(self._keys):
            lengths = np.array([-1 if k is None else len(k) for k in self._keys], np.int64)
            sizes = np.maximum(lengths, 0)
            self._key_columns = (b"".join(k for k in self._keys if k), np.cumsum(sizes) - sizes, lengths)
        return self._key_columns

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
        self._keys = [self._keys[i] for i in live.tolist()]
        self._key_hashes = [self._key_hashes[i] for i in live.tolist()]
        self._rebuild_table(self._table_ids.size)
        self._ranks = np.zeros(0, np.int64)
        self._key_columns = None
        self.state = new
