"""The window kernel against a brute-force Python model of the same rules (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.streams.aggregate import WindowedAggregate
from ingest.streams.spec import ProcessorConfig


def brute_force(records, window_ms, hop_ms, grace_ms):
    """records: (key, timestamp_ms, value) in offset order. Returns (closed windows as
    {(start, key): (count, min, max, sum, first, last)}, late count, open windows)."""
    stream_time = -1
    windows: dict[tuple, list] = {}
    late = 0
    for offset, (key, t, v) in enumerate(records):
        stream_time = max(stream_time, t)
        was_late = False
        for n in range(max(0, (t - window_ms) // hop_ms + 1), t // hop_ms + 1):
            start = n * hop_ms
            if start + window_ms + grace_ms <= stream_time:
                was_late = True
                continue
            windows.setdefault((start, key), []).append((t, offset, v))
        late += was_late
    closed, still_open = {}, {}
    for (start, key), rows in windows.items():
        values = [v for _, _, v in rows]
        first = min(rows, key=lambda r: (r[0], r[1]))[2]
        last = max(rows, key=lambda r: (r[0], r[1]))[2]
        summary = (len(rows), min(values), max(values), sum(values), first, last)
        target = closed if start + window_ms + grace_ms <= stream_time else still_open
        target[(start, key)] = summary
    return closed, late, still_open


def run_kernel(records, window_ms, hop_ms, grace_ms, cuts):
    config = ProcessorConfig("t", "aggregate", "a", "b", fields=("v",), window_ms=window_ms,
                             advance_ms=hop_ms, grace_ms=grace_ms)
    agg = WindowedAggregate(config)
    keys = [k for k, _, _ in records]
    buffer = np.frombuffer(b"".join(keys), np.uint8) if any(keys) else np.zeros(1, np.uint8)
    lengths = np.array([len(k) for k in keys], np.int64)
    offsets = np.cumsum(lengths) - lengths
    timestamps = np.array([t for _, t, _ in records], np.int64)
    values = np.array([[v for _, _, v in records]], np.float64)
    emitted = []
    bounds = sorted({0, len(records), *(c % (len(records) + 1) for c in cuts)})
    for lo, hi in zip(bounds, bounds[1:]):
        ids = agg.key_ids(buffer, offsets[lo:hi], lengths[lo:hi])
        emitted += agg.add(ids, timestamps[lo:hi], np.arange(lo, hi, dtype=np.int64), values[:, lo:hi], live=True)
    return agg, emitted


records_strategy = st.lists(
    st.tuples(st.sampled_from([b"a", b"b", b"c", b""]), st.integers(0, 400), st.integers(-50, 50)),
    max_size=120)


@settings(max_examples=150, deadline=None)
@given(records=records_strategy, window_ms=st.integers(1, 60), hop_divisor=st.integers(1, 4),
       grace_ms=st.integers(0, 40), cuts=st.lists(st.integers(0, 200), max_size=5))
def test_windows_match_a_brute_force_model_whatever_the_chunking(records, window_ms, hop_divisor, grace_ms, cuts):
    hop_ms = max(1, window_ms // hop_divisor)
    agg, emitted = run_kernel(records, window_ms, hop_ms, grace_ms, cuts)
    closed, late, still_open = brute_force(records, window_ms, hop_ms, grace_ms)
    got = {(start, key): (count, *stats[0]) for start, key, count, stats in emitted}
    assert len(got) == len(emitted)  # each window emitted once
    assert got == {k: tuple(float(x) if i else x for i, x in enumerate(v)) for k, v in closed.items()}
    assert agg.late_records == late
    assert agg.open_windows() == len(still_open)
    # Emission order is (window start, key): independent of where the chunks were cut.
    assert [(s, k) for s, k, _, _ in emitted] == sorted((s, k) for s, k, _, _ in emitted)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy, window_ms=st.integers(1, 60), hop_divisor=st.integers(1, 4),
       grace_ms=st.integers(0, 40), split=st.integers(0, 120))
def test_replay_from_the_oldest_open_window_rebuilds_the_same_state(records, window_ms, hop_divisor, grace_ms, split):
    """What a restart does: at a position P, keep (replay offset, stream time); a fresh
    aggregate replays [replay offset, P) and then continues live: same windows out."""
    hop_ms = max(1, window_ms // hop_divisor)
    split = min(split, len(records))
    full, emitted_full = run_kernel(records, window_ms, hop_ms, grace_ms, [])
    head, emitted_head = run_kernel(records[:split], window_ms, hop_ms, grace_ms, [])
    replay_from = head.replay_offset(split)
    config = ProcessorConfig("t", "aggregate", "a", "b", fields=("v",), window_ms=window_ms,
                             advance_ms=hop_ms, grace_ms=grace_ms)
    fresh = WindowedAggregate(config)
    fresh.restore(head.stream_time_ms)
    emitted_tail = []
    for lo, hi, live in ((replay_from, split, False), (split, len(records), True)):
        part = records[lo:hi]
        if not part:
            continue
        keys = [k for k, _, _ in part]
        buffer = np.frombuffer(b"".join(keys) or b"\0", np.uint8)
        lengths = np.array([len(k) for k in keys], np.int64)
        ids = fresh.key_ids(buffer, np.cumsum(lengths) - lengths, lengths)
        out = fresh.add(ids, np.array([t for _, t, _ in part], np.int64), np.arange(lo, hi, dtype=np.int64),
                        np.array([[v for _, _, v in part]], np.float64), live=live)
        assert live or not out
        emitted_tail += out
    as_rows = lambda rows: [(s, k, c, st) for s, k, c, st in rows]  # noqa: E731
    assert as_rows(emitted_head) + as_rows(emitted_tail) == as_rows(emitted_full)


def test_binary_window_records_carry_the_same_numbers_as_json_ones():
    import orjson

    from ingest.shards.batch import Record
    from ingest.streams.processors import Aggregate
    from ingest.streams.runtime import _batch_from_records

    rows = [Record(i, 1000 + 37 * i - (i % 7) * 90, b"k%d" % (i % 5) if i % 11 else None,
                   orjson.dumps({"t": (i * 7919) % 101 - 50.5, "h": i % 13})) for i in range(800)]
    batch = _batch_from_records(rows)
    outputs = {}
    for fmt in ("json", "binary"):
        config = ProcessorConfig("t", "aggregate", "a", "b", fields=("t", "h"), window_ms=500, advance_ms=250,
                                 grace_ms=100, output_format=fmt,
                                 aggregations=("count", "min", "max", "sum", "mean", "first", "last"))
        emitted = Aggregate(config).process(batch, live=True)
        buf = emitted.values_buf if isinstance(emitted.values_buf, bytes) else emitted.values_buf.tobytes()
        keys_buf = bytes(emitted.keys_buf)
        out = []
        for i in range(len(emitted)):
            at, n = int(emitted.value_offsets[i]), int(emitted.value_lengths[i])
            ko, kn = int(emitted.key_offsets[i]), int(emitted.key_lengths[i])
            out.append((None if kn < 0 else keys_buf[ko:ko + kn], int(emitted.timestamps_ms[i]), buf[at:at + n]))
        outputs[fmt] = out
    assert len(outputs["json"]) == len(outputs["binary"]) > 10
    for (jk, jt, jv), (bk, bt, bv) in zip(outputs["json"], outputs["binary"]):
        doc = orjson.loads(jv)
        numbers = np.frombuffer(bv[16:], "<f8").tolist()
        start, count = np.frombuffer(bv[:16], "<i8").tolist()
        assert (jk, jt, start, count) == (bk, bt, doc["window_start_ms"], doc["count"])
        want = [doc[f][a] for f in ("t", "h") for a in ("min", "max", "sum", "mean", "first", "last")]
        assert numbers == want
