"""Torn and corrupt files found on start: a tail cut mid-batch, flipped bits in the active
segment and in sealed ones, index files deleted, cut short or garbled.

The promises: a torn or corrupt tail is cut at its first bad batch and everything before
it is served; indexes are rebuilt; a corrupt batch in a sealed segment is reported with
file, byte position and offset (appliance log and `ingest check`); and nothing corrupt is
ever served: every record a fetch returns has a valid CRC and is exactly what was
produced at that offset.

Bit flips avoid the partitionLeaderEpoch field (bytes 12..15 of a batch): Kafka's CRC does
not cover it, so a flip there leaves valid records with another epoch, which no check of
this format can see.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.net import wire
from ingest.shards import batch as batch_codec
from ingest.shards import kernels
from ingest.shards.check import check_data_dir
from ingest.shards.layout import (
    PARTITION_LEADER_EPOCH_LENGTH,
    PARTITION_LEADER_EPOCH_OFFSET,
    RECORD_BATCH_OVERHEAD,
)
from tests.faults.harness import (
    AckedProducer,
    assert_data_dir_checks_clean,
    Stored,
    Verdict,
    account,
    by_mode,
    fetch_once,
    fetch_partition,
    ingest_check,
    rng_for,
)
from tests.support import Appliance, create_topic, eventually, metric_value

# Small segments and a dense index: a few hundred batches make several sealed segments
# per partition, each with several index entries to garble.
CONFIG = """
[server]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000

[storage]
segment_bytes = 16384
index_interval_bytes = 1024
"""
TOPIC = "files"
PARTITIONS = 2
BATCHES_PER_FILL = 120  # per partition: about three 16 KiB segments of ~330-byte batches


@dataclass(frozen=True)
class BatchAt:
    file: Path
    position: int
    size: int
    base: int
    last: int


def layout(data_dir: Path, partition: int) -> list[list[BatchAt]]:
    """The valid batches of each segment of a partition, oldest segment first; a segment's
    list ends at its first invalid batch (damage of an earlier round the appliance kept
    and reported instead of cutting)."""
    segments = []
    for path in sorted((data_dir / f"{TOPIC}-{partition}").glob("*.log")):
        data, batches, pos = path.read_bytes(), [], 0
        while pos < len(data) and kernels.validate_batch(np.frombuffer(data, np.uint8), pos, len(data),
                                                         batch_codec.READ_BATCH_BYTES_MAX) == kernels.OK:
            h = batch_codec.parse_header(data, pos)
            batches.append(BatchAt(path, pos, h.size_bytes, h.base_offset, h.last_offset))
            pos += h.size_bytes
        segments.append(batches)
    return segments


def fill(app: Appliance, first_id: int, expected: dict[int, dict[int, bytes]]) -> None:
    """BATCHES_PER_FILL acked batches per partition; adds them to expected[p][offset]."""
    producers = [AckedProducer(app, TOPIC, p, first_id + p, acks=wire.Durability.WRITTEN,
                               max_batches=BATCHES_PER_FILL).start() for p in range(PARTITIONS)]
    for p in producers:
        p.join(120)
        assert not p.alive and p.error is None, (p.producer_id, p.error)
        expected[p.partition].update({o: v for v, o in p.acked_snapshot().items()})


def flip_bits(batch: BatchAt, rng, count: int, start: int = 0) -> list[int]:
    """Flip `count` random bits of the batch, at or after byte `start` of it, never in
    the partitionLeaderEpoch field; returns the file positions flipped."""
    epoch = range(PARTITION_LEADER_EPOCH_OFFSET, PARTITION_LEADER_EPOCH_OFFSET + PARTITION_LEADER_EPOCH_LENGTH)
    candidates = [i for i in range(start, batch.size) if i not in epoch]
    positions = sorted({batch.position + rng.choice(candidates) for _ in range(count)})
    with open(batch.file, "r+b") as f:
        for pos in positions:
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return positions


def judge(stored: Stored, expected: dict[int, bytes], must_survive: set[int],
          damaged: dict[int, bytes] | None = None) -> Verdict:
    """Every served record must be the expected value at its offset (valid CRC: decoded),
    or the original value of an offset in the damaged region (an intact batch after the
    damage may stay); every offset of must_survive must be served, once."""
    verdict = Verdict(acked=len(must_survive), corrupt_served=stored.corrupt_batches)
    served: dict[int, int] = {}
    damaged = damaged or {}
    for r in stored.records:
        served[r.offset] = served.get(r.offset, 0) + 1
        if expected.get(r.offset, damaged.get(r.offset)) != r.value:
            verdict.foreign.append((r.offset, r.value))
    verdict.lost = [(expected[o], o, None) for o in sorted(must_survive) if o not in served]
    verdict.duplicated = [(expected.get(o), o) for o, n in served.items() if n > 1]
    return verdict


def read_everything(app: Appliance, data_dir: Path, partition: int) -> Stored:
    bases = [int(p.stem) for p in (data_dir / f"{TOPIC}-{partition}").glob("*.log")]
    return fetch_partition(app, TOPIC, partition, skip_to=bases)


def offsets_of(batches) -> set[int]:
    return {o for b in batches for o in range(b.base, b.last + 1)}


# ---- torn and flipped tails ------------------------------------------------------------


def damage_tail(segments: list[list[BatchAt]], rng) -> tuple[int, str]:
    """Tear or flip the active segment from a random batch on; returns (index of the
    first bad batch in the active segment, what was done). Batches before it are intact."""
    active = segments[-1]
    if not active:
        return 0, "nothing to damage (empty active segment)"
    k = rng.randrange(len(active))
    batch = active[k]
    mode = rng.choice(["truncate mid-batch", "truncate at a batch boundary", "flip", "flip and truncate later"])
    if mode == "truncate mid-batch":
        os.truncate(batch.file, batch.position + rng.randrange(1, batch.size))
    elif mode == "truncate at a batch boundary":
        os.truncate(batch.file, batch.position)
    else:
        flip_bits(batch, rng, rng.randint(1, 3))
        if mode == "flip and truncate later" and k + 1 < len(active):
            later = active[rng.randrange(k + 1, len(active))]
            os.truncate(later.file, later.position + rng.randrange(1, later.size))
    return k, mode


def damage_indexes(segments: list[list[BatchAt]], rng) -> list[str]:
    """Delete, cut short or fill with random bytes the indexes of some segments."""
    done = []
    for batches in segments:
        if not batches or rng.random() < 0.5:
            continue
        log = batches[0].file
        index = log.with_suffix(rng.choice([".index", ".timeindex"]))
        if not index.exists():
            continue
        mode = rng.choice(["delete", "cut", "random bytes"])
        if mode == "delete":
            index.unlink()
        elif mode == "cut":
            os.truncate(index, max(0, index.stat().st_size - rng.randint(1, 11)))
        else:
            index.write_bytes(rng.randbytes(max(8, index.stat().st_size)))
        done.append(f"{index.name}: {mode}")
    return done


def test_torn_or_flipped_tail_is_cut_at_the_first_bad_batch_and_nothing_corrupt_is_served(tmp_path, ledger):
    """Rounds alternate kill -9 and a clean SIGTERM stop before the damage: after a clean
    shutdown the appliance trusts its files, yet a damaged tail must still not be served."""
    row = ledger("torn or bit-flipped active segment, garbled indexes, found on start",
                 "tail cut at the first bad batch, indexes rebuilt, nothing corrupt served")
    rng = rng_for("torn-tail")
    rounds = by_mode(2, 30)
    data_dir = tmp_path / "data"
    app = Appliance(data_dir, workers=2, config_text=CONFIG).start()
    expected: dict[int, dict[int, bytes]] = {p: {} for p in range(PARTITIONS)}
    total, modes, reported = Verdict(), [], set()
    try:
        create_topic(app, TOPIC, PARTITIONS)
        for r in range(rounds):
            fill(app, 100 + 10 * r, expected)
            clean = r % 2 == 1
            if clean:
                assert app.stop() == 0
            else:
                app.kill()
            survivors, first_bad, tail_mode, damaged = {}, {}, {}, {}
            for p in range(PARTITIONS):
                segments = layout(data_dir, p)
                k, tail_mode[p] = damage_tail(segments, rng)
                modes.append(f"{'clean' if clean else 'kill'}: {tail_mode[p]}")
                modes += damage_indexes(segments, rng)
                kept = [b for s in segments[:-1] for b in s] + segments[-1][:k]
                survivors[p] = offsets_of(kept)
                first_bad[p] = segments[-1][k] if segments[-1] else None
                # Damaged: no longer expected (later appends may reuse these offsets).
                damaged[p] = {o: expected[p].pop(o) for o in offsets_of(segments[-1][k:]) if o in expected[p]}
            log_before = len(app.log())
            app.start()
            corrupt_served_before = total.corrupt_served
            for p in range(PARTITIONS):
                stored = read_everything(app, data_dir, p)
                total.add(judge(stored, expected[p], survivors[p], damaged[p]))
                # Intact batches the appliance kept after the damage stay in the log.
                expected[p].update({r.offset: r.value for r in stored.records if damaged[p].get(r.offset) == r.value})
            restart_log = app.log()[log_before:]
            for p in range(PARTITIONS):
                bad = first_bad[p]
                if bad is None or tail_mode[p] == "truncate at a batch boundary":
                    continue  # nothing invalid left to find
                if total.corrupt_served == corrupt_served_before:
                    # Cut as a torn tail, or kept and reported as corrupt: either way, said.
                    if re.search(rf"corrupt data: {re.escape(str(bad.file))}:{bad.position}: ", restart_log):
                        reported.add(f"{bad.file}:{bad.position}: ")
                        # Its segment keeps no indexes, so that every open rescans it.
                        reported |= {f"{bad.file.with_suffix(x)}:" for x in (".index", ".timeindex")}
                    else:
                        cut = rf"{re.escape(str(bad.file))}: cutting \d+ bytes after byte {bad.position} "
                        assert re.search(cut, restart_log), (bad, restart_log[-3000:])
            row.rounds = r + 1
            account(row, total)
        row.notes["damage"] = len(modes)
        assert not total.corrupt_served, f"corrupt batches served after: {modes}"
        total.assert_clean()
        assert app.stop() == 0
    finally:
        app.kill()
        row.notes["modes"] = sorted(set(m.split(": ", 1)[-1] for m in modes))
    # Every tail cut, every index rebuilt; only a batch reported as corrupt may remain.
    problems = [str(problem) for problem in check_data_dir(data_dir)]
    assert all(any(problem.startswith(r) for r in reported) for problem in problems), problems


# ---- sealed segments -------------------------------------------------------------------


def test_corruption_in_a_sealed_segment_is_reported_with_file_position_offset_and_never_served(tmp_path, ledger):
    """A bit flips inside the records of a batch in a sealed segment (its header still
    walks fine), with the segment's indexes intact in one partition and deleted in the
    other (the two swap every round).
    Batches after the corrupt one in the same segment may go unserved (counted in a
    note); every other batch must be served, the corrupt one never, and both the log and
    `ingest check` must name file, byte position and offset."""
    row = ledger("bit flips in a sealed segment, found on start",
                 "reported (file, position, offset) in the log and by ingest check, never served")
    rng = rng_for("sealed")
    rounds = by_mode(1, 20)
    total, not_served, failures = Verdict(), 0, []
    for r in range(rounds):
        data_dir = tmp_path / f"data{r}"
        variant = {p: "indexes deleted" if (r + p) % 2 else "indexes intact" for p in range(PARTITIONS)}
        app = Appliance(data_dir, workers=2, config_text=CONFIG).start()
        expected: dict[int, dict[int, bytes]] = {p: {} for p in range(PARTITIONS)}
        try:
            create_topic(app, TOPIC, PARTITIONS)
            fill(app, 100, expected)
            assert app.stop() == 0
            corrupt = {}
            for p in range(PARTITIONS):
                segments = layout(data_dir, p)
                s = rng.randrange(len(segments) - 1)  # never the active one
                k = rng.randrange(len(segments[s]))
                flip_bits(segments[s][k], rng, rng.randint(1, 3), start=RECORD_BATCH_OVERHEAD)
                if variant[p] == "indexes deleted":
                    for suffix in (".index", ".timeindex"):
                        segments[s][k].file.with_suffix(suffix).unlink()
                corrupt[p] = (segments, s, k)
            log_before = len(app.log())
            app.start()
            for p in range(PARTITIONS):
                segments, s, k = corrupt[p]
                kept = [b for i, seg in enumerate(segments) if i != s for b in seg] + segments[s][:k]
                stored = read_everything(app, data_dir, p)
                verdict = judge(stored, expected[p], offsets_of(kept))
                if verdict.corrupt_served:
                    failures.append(f"round {r}, partition {p} ({variant[p]}): corrupt batch served")
                not_served += len(offsets_of(segments[s][k + 1:]) - {rec.offset for rec in stored.records})
                total.add(verdict)
            for p in range(PARTITIONS):
                if not eventually(lambda: metric_value(app.metrics_text(), "ingest_log_corrupt_batches",
                                                       topic=TOPIC, partition=str(p)) >= 1, 3):
                    failures.append(f"round {r}, partition {p} ({variant[p]}): ingest_log_corrupt_batches is 0")
            restart_log = app.log()[log_before:]
            assert app.stop() == 0
        finally:
            app.kill()
        check = ingest_check(data_dir)
        if check.returncode != 1:
            failures.append(f"round {r}: ingest check exited {check.returncode}")
        for p in range(PARTITIONS):
            segments, s, k = corrupt[p]
            bad = segments[s][k]
            report = f"{bad.file}:{bad.position}: offset {bad.base}"
            if report not in restart_log:
                failures.append(f"round {r}, partition {p} ({variant[p]}): the appliance log does not report {report}")
            if report not in check.stdout:
                failures.append(f"round {r}, partition {p} ({variant[p]}): ingest check does not report {report}")
        row.rounds = r + 1
        account(row, total)
        row.notes["intact_records_after_a_corrupt_batch_not_served"] = not_served
    assert not failures, "\n".join(failures + [total.summary()])
    total.assert_clean()


# ---- garbled indexes -------------------------------------------------------------------


# (.index, .timeindex) damage per segment, in turn; None leaves the file intact, so that
# damage the appliance could miss is not masked by damage that forces a rebuild anyway.
DAMAGE_PAIRS = [("shifted", None), (None, "random bytes"), ("delete", None), ("cut", "random bytes"),
                ("zeros", None), (None, "delete"), ("random bytes", "zeros"), (None, "cut")]


def index_entry_offsets(batches: list[BatchAt]) -> list[int]:
    """The offsets a segment's .index names (last offsets of its indexed batches)."""
    if not batches:
        return []
    index = batches[0].file.with_suffix(".index").read_bytes()
    base = int(batches[0].file.stem)
    return [base + int.from_bytes(index[at:at + 4], "big") for at in range(0, len(index) - 7, 8)]


def garble_index(path: Path, mode: str, rng) -> None:
    size = path.stat().st_size
    if mode == "delete":
        path.unlink()
    elif mode == "cut":
        os.truncate(path, max(0, size - rng.randint(1, 7)))
    elif mode == "random bytes":
        path.write_bytes(rng.randbytes(size))
    elif mode == "shifted":
        # Still increasing and inside the segment, so it passes a sanity check: every
        # offset index entry points a few bytes into its batch instead of at its start.
        assert path.suffix == ".index", path
        shift = rng.randint(1, 40)
        raw = bytearray(path.read_bytes())
        for at in range(0, len(raw) - len(raw) % 8, 8):
            position = int.from_bytes(raw[at + 4:at + 8], "big") + shift
            raw[at + 4:at + 8] = position.to_bytes(4, "big")
        path.write_bytes(bytes(raw))
    elif mode == "zeros":
        path.write_bytes(b"\0" * size)


def test_garbled_indexes_are_rebuilt_and_every_record_is_served_intact(tmp_path, ledger):
    """After a clean shutdown (the appliance then trusts its index files), the indexes of
    every segment are damaged (deleted, cut, random bytes, zeros, or offset index entries
    shifted into their batches); every record must still be served
    intact from any offset, every time lookup (LIST_OFFSETS by timestamp) must answer
    as the records say, and after the next clean stop `ingest check` finds every index
    right."""
    row = ledger("deleted, cut, random, zeroed or shifted .index/.timeindex files",
                 "indexes rebuilt or never trusted blindly; every record served intact")
    rng = rng_for("indexes")
    rounds = by_mode(1, 20)
    data_dir = tmp_path / "data"
    app = Appliance(data_dir, workers=2, config_text=CONFIG).start()
    expected: dict[int, dict[int, bytes]] = {p: {} for p in range(PARTITIONS)}
    total, wrong_time_lookups = Verdict(), []
    try:
        create_topic(app, TOPIC, PARTITIONS)
        for r in range(rounds):
            fill(app, 100 + 10 * r, expected)
            assert app.stop() == 0
            # Offsets named by index entries: a fetch there takes the entry's position as is.
            indexed = {p: [o for seg in layout(data_dir, p) for o in index_entry_offsets(seg)]
                       for p in range(PARTITIONS)}
            n = 0
            for p in range(PARTITIONS):
                for log in sorted((data_dir / f"{TOPIC}-{p}").glob("*.log")):
                    for suffix, mode in zip((".index", ".timeindex"), DAMAGE_PAIRS[n % len(DAMAGE_PAIRS)]):
                        if mode and log.with_suffix(suffix).stat().st_size >= 12:
                            garble_index(log.with_suffix(suffix), mode, rng)
                    n += 1
            app.start()
            for p in range(PARTITIONS):
                stored = read_everything(app, data_dir, p)
                total.add(judge(stored, expected[p], set(expected[p])))
                wrong_time_lookups += time_lookups_that_disagree(app, p, stored.records)
                resumed = sorted(set(indexed[p]) | set(rng.sample(sorted(expected[p]), 20)))
                for offset in resumed:  # consumers resuming at any offset
                    stored = fetch_once(app, TOPIC, p, offset, 2048)
                    verdict = judge(stored, expected[p], {offset})
                    verdict.duplicated = []  # a fetch from inside a batch returns it whole
                    total.add(verdict)
            row.rounds = r + 1
            account(row, total)
            row.notes["wrong_time_lookups"] = len(wrong_time_lookups)
            total.assert_clean()
            assert not wrong_time_lookups, f"(partition, timestamp, right offset, answer): {wrong_time_lookups[:5]}"
        assert app.stop() == 0
    finally:
        app.kill()
    assert_data_dir_checks_clean(data_dir)


def time_lookups_that_disagree(app: Appliance, partition: int, records) -> list[tuple]:
    """LIST_OFFSETS at every record timestamp, against the first offset whose record
    timestamp is at or after it (Kafka's rule)."""
    wrong = []
    for timestamp_ms in sorted({r.timestamp_ms for r in records}):
        want = min(r.offset for r in records if r.timestamp_ms >= timestamp_ms)
        reply = app.request(app.owner_router(partition), wire.ListOffsetsRequest(
            topic=TOPIC, partition=partition, timestamp_ms=timestamp_ms))
        if not isinstance(reply, wire.ListOffsetsReply) or reply.offset != want:
            wrong.append((partition, timestamp_ms, want, getattr(reply, "offset", reply)))
    return wrong
