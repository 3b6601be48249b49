"""Event-time windows per key: the numba kernel that aggregates whole columns at once.

Semantics (Kafka Streams' windowed aggregation with a grace period, suppressed until the
window closes):
- Window n covers [n * hop_ms, n * hop_ms + window_ms); n >= 0 (no window starts before
  the epoch). Tumbling: hop_ms == window_ms; hopping: hop_ms < window_ms, so a record
  falls into ceil(window_ms / hop_ms) windows.
- Stream time is the largest timestamp seen so far, in offset order, over the whole
  partition. A window is closed once stream time >= its end + grace_ms. A record is
  added to each of its windows that is still open after stream time has taken the
  record's own timestamp into account; a record kept out of at least one window that had
  closed is a late record (counted, never emitted).
- A closed window is emitted once: key id, window number, count and per field min, max,
  sum, first (value of the smallest timestamp, earliest offset on ties), last (value of
  the largest timestamp, latest offset on ties).

Storage: per key a ring of `slots_per_key` windows indexed by n % slots. The windows open
at any moment start within (stream_time - grace_ms - window_ms, stream_time], so
(grace_ms + window_ms) // hop_ms + 2 slots never collide with an open window: a slot
still holding another window holds a closed one, which is emitted before reuse.

Replay (live=False) rebuilds the windows that were open at a stored position: stream time
is fixed to the value stored with that position, records only enter windows open at it,
nothing is emitted or counted late. Every record of such a window was accepted when it
first came (stream time only grows), so the rebuilt state equals the original.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EMPTY = -1
# Statistics kept per field and window, in this order in the state's stats array.
STAT_MIN, STAT_MAX, STAT_SUM, STAT_FIRST, STAT_LAST = range(5)
STATS = 5
# scalars[]: stream time, earliest close time of an open window, late records so far.
SC_STREAM_TIME, SC_NEXT_CLOSE, SC_LATE = range(3)
NO_CLOSE = np.iinfo(np.int64).max
ERR_OUT_FULL = -1
ERR_SLOT_COLLISION = -2


def slots_per_key(window_ms: int, hop_ms: int, grace_ms: int) -> int:
    return (grace_ms + window_ms) // hop_ms + 2


@njit(cache=True)
def _emit(k, s, win, cnt, stats, out_key, out_win, out_cnt, out_stats, n_out):
    if n_out >= out_key.size:
        return ERR_OUT_FULL
    out_key[n_out] = k
    out_win[n_out] = win[k, s]
    out_cnt[n_out] = cnt[k, s]
    for f in range(stats.shape[2]):
        for j in range(STATS):
            out_stats[n_out, f, j] = stats[k, s, f, j]
    win[k, s] = EMPTY
    return n_out + 1


@njit(cache=True)
def _add(k, s, n, t, offset, row, values, win, first_off, cnt, first_ts, last_ts, stats):
    if win[k, s] != n:
        win[k, s] = n
        first_off[k, s] = offset
        cnt[k, s] = 0
        first_ts[k, s] = t
        last_ts[k, s] = t
        for f in range(values.shape[0]):
            v = values[f, row]
            stats[k, s, f, STAT_MIN] = v
            stats[k, s, f, STAT_MAX] = v
            stats[k, s, f, STAT_SUM] = 0.0
            stats[k, s, f, STAT_FIRST] = v
            stats[k, s, f, STAT_LAST] = v
    cnt[k, s] += 1
    take_first = t < first_ts[k, s]
    take_last = t >= last_ts[k, s]
    if take_first:
        first_ts[k, s] = t
    if take_last:
        last_ts[k, s] = t
    for f in range(values.shape[0]):
        v = values[f, row]
        if v < stats[k, s, f, STAT_MIN]:
            stats[k, s, f, STAT_MIN] = v
        if v > stats[k, s, f, STAT_MAX]:
            stats[k, s, f, STAT_MAX] = v
        stats[k, s, f, STAT_SUM] += v
        if take_first:
            stats[k, s, f, STAT_FIRST] = v
        if take_last:
            stats[k, s, f, STAT_LAST] = v


@njit(cache=True)
def aggregate(key_ids, timestamps_ms, offsets, values, window_ms, hop_ms, grace_ms, live,
              win, first_off, cnt, first_ts, last_ts, stats, scalars,
              out_key, out_win, out_cnt, out_stats):
    """Add records (columns, in offset order) to their windows; emit windows that close.

    key_ids: dense ids < win.shape[0]; timestamps_ms >= 0; values: (fields, records)
    float64. Returns the number of windows written to out_* (>= 0) or an ERR_* code.
    """
    slots = win.shape[1]
    n_out = 0
    for row in range(key_ids.size):
        k = key_ids[row]
        t = timestamps_ms[row]
        if live and t > scalars[SC_STREAM_TIME]:
            scalars[SC_STREAM_TIME] = t
        stream_time = scalars[SC_STREAM_TIME]
        n_last = t // hop_ms
        n_first = max(0, (t - window_ms) // hop_ms + 1)
        late = False
        for n in range(n_first, n_last + 1):
            close_ms = n * hop_ms + window_ms + grace_ms
            if close_ms <= stream_time:
                late = True
                continue
            s = n % slots
            if win[k, s] != EMPTY and win[k, s] != n:
                if not live or (win[k, s] * hop_ms + window_ms + grace_ms) > stream_time:
                    return ERR_SLOT_COLLISION
                n_out = _emit(k, s, win, cnt, stats, out_key, out_win, out_cnt, out_stats, n_out)
                if n_out < 0:
                    return n_out
            _add(k, s, n, t, offsets[row], row, values, win, first_off, cnt, first_ts, last_ts, stats)
            if close_ms < scalars[SC_NEXT_CLOSE]:
                scalars[SC_NEXT_CLOSE] = close_ms
        if late and live:
            scalars[SC_LATE] += 1
    if live and scalars[SC_STREAM_TIME] >= scalars[SC_NEXT_CLOSE]:
        n_out = close_windows(window_ms, hop_ms, grace_ms, win, cnt, stats, scalars,
                              out_key, out_win, out_cnt, out_stats, n_out)
    return n_out


@njit(cache=True)
def close_windows(window_ms, hop_ms, grace_ms, win, cnt, stats, scalars,
                  out_key, out_win, out_cnt, out_stats, n_out):
    """Emit every window closed by the current stream time; recompute the next close."""
    stream_time = scalars[SC_STREAM_TIME]
    next_close = NO_CLOSE
    for k in range(win.shape[0]):
        for s in range(win.shape[1]):
            n = win[k, s]
            if n == EMPTY:
                continue
            close_ms = n * hop_ms + window_ms + grace_ms
            if close_ms <= stream_time:
                n_out = _emit(k, s, win, cnt, stats, out_key, out_win, out_cnt, out_stats, n_out)
                if n_out < 0:
                    return n_out
            elif close_ms < next_close:
                next_close = close_ms
    scalars[SC_NEXT_CLOSE] = next_close
    return n_out


@njit(cache=True)
def match_all(values, operators, thresholds, valid):
    """Rows where every condition (field f OP threshold f) holds; a NaN never matches."""
    n = values.shape[1]
    out = valid.copy()
    for c in range(operators.size):
        op = operators[c]
        limit = thresholds[c]
        for row in range(n):
            v = values[c, row]
            if op == 0:
                ok = v > limit
            elif op == 1:
                ok = v >= limit
            elif op == 2:
                ok = v < limit
            elif op == 3:
                ok = v <= limit
            elif op == 4:
                ok = v == limit
            else:
                ok = v != limit and v == v
            if not ok:
                out[row] = False
    return out


@njit(cache=True)
def fnv1a64(buf, offsets, lengths, out):
    """64-bit FNV-1a of each key slice; a null key (length -1) hashes to 0."""
    for row in range(offsets.size):
        if lengths[row] < 0:
            out[row] = 0
            continue
        h = np.uint64(0xCBF29CE484222325)
        for i in range(offsets[row], offsets[row] + lengths[row]):
            h = (h ^ np.uint64(buf[i])) * np.uint64(0x100000001B3)
        out[row] = np.int64(h) if h != 0 else 1


@njit(cache=True)
def assign_key_ids(hashes, table_hashes, table_ids, next_id, out_ids, new_rows):
    """Dense ids of key hashes through an open-addressing table (capacity a power of two,
    at most half full: the caller grows it first). Unseen hashes get next_id, next_id + 1,
    ...; their first rows go to new_rows. Returns how many new ids were assigned."""
    mask = table_ids.size - 1
    n_new = 0
    for row in range(hashes.size):
        h = hashes[row]
        i = (h ^ (h >> 29)) & mask
        while True:
            kid = table_ids[i]
            if kid < 0:
                kid = next_id + n_new
                table_ids[i] = kid
                table_hashes[i] = h
                new_rows[n_new] = row
                n_new += 1
                break
            if table_hashes[i] == h:
                break
            i = (i + 1) & mask
        out_ids[row] = kid
    return n_new


def warm_up() -> None:
    """Compile (or load from cache) every kernel here with the types the runtime uses."""
    n, fields, keys = 4, 1, 2
    slots = slots_per_key(10, 10, 0)
    state = new_state(keys, slots, fields)
    out = new_output(16, fields)
    aggregate(np.zeros(n, np.int64), np.arange(n, dtype=np.int64) * 10, np.arange(n, dtype=np.int64),
              np.ones((fields, n)), 10, 10, 0, True, *state, *out)
    aggregate(np.zeros(n, np.int64), np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64),
              np.ones((fields, n)), 10, 10, 0, False, *state, *out)
    buf = np.zeros(16, np.uint8)
    offs, lens = np.zeros(2, np.int64), np.full(2, 8, np.int64)
    valid = np.ones(2, np.bool_)
    match_all(np.ones((1, 2)), np.zeros(1, np.int64), np.zeros(1), valid)
    fnv1a64(buf, offs, lens, np.empty(2, np.int64))
    assign_key_ids(np.zeros(2, np.int64), np.zeros(4, np.int64), np.full(4, -1, np.int64), 0,
                   np.empty(2, np.int64), np.empty(2, np.int64))


def new_state(keys: int, slots: int, fields: int) -> tuple:
    """(win, first_off, cnt, first_ts, last_ts, stats, scalars) for `keys` keys."""
    scalars = np.array([-1, NO_CLOSE, 0], dtype=np.int64)
    return (np.full((keys, slots), EMPTY, np.int64), np.zeros((keys, slots), np.int64),
            np.zeros((keys, slots), np.int64), np.zeros((keys, slots), np.int64),
            np.zeros((keys, slots), np.int64), np.zeros((keys, slots, fields, STATS)), scalars)


def new_output(capacity: int, fields: int) -> tuple:
    return (np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.int64),
            np.empty((capacity, fields, STATS)))
