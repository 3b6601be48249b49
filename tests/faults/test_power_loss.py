"""acks=fsync promises: the record is on disk, so it survives a power loss. acks=1 does not
(see test_crash): only a process crash.

A power loss is simulated on the files a kill -9 leaves: the page cache holds every write,
and the disk holds at least what was fsynced. Which bytes were fsynced is known from the
acks (an acks=fsync reply is sent only after the fdatasync that covers the batch) and
from the recovery point (every segment below it was fsynced whole). Everything else may
be lost, so the test drops as much of it as a disk may lose.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ingest.net import wire
from ingest.shards import batch as batch_codec
from tests.faults.harness import (
    CONFIG,
    PARTITIONS,
    Verdict,
    assert_data_dir_checks_clean,
    account,
    by_mode,
    rng_for,
    start_producers,
    stop_producers,
    verify_partition,
    wait_for_progress,
)
from tests.support import Appliance, create_topic


def drop_unsynced_writes(part_dir: Path, last_acked_offset: int | None, rng) -> int:
    """Make `part_dir` look like the disk after a power loss; returns bytes dropped.

    Kept whole: segments below the recovery point, and segments before the one holding
    the last acked offset (the group commit that acked it fsynced every segment rolled
    before it). Kept up to the end of the batch holding the last acked offset: that
    segment. Anything after that may be lost, in one of the ways a disk loses writes:
    - truncate: the file ends at a random byte, possibly mid-batch (a torn write);
    - zeros: the file keeps its length but the tail reads as zeros (the size reached the
      disk, the data did not);
    and a segment created after the recovery point was written may vanish altogether (its
    directory entry was never fsynced). Indexes of damaged segments may be lost too.
    """
    recovery_point = int((part_dir / "recovery-point").read_text().strip())
    logs = sorted(part_dir.glob("*.log"))
    bases = [int(p.stem) for p in logs]
    acked_index = -1
    if last_acked_offset is not None:
        acked_index = max(i for i, b in enumerate(bases) if b <= last_acked_offset)
    dropped = 0
    for i, path in enumerate(logs):
        if i < acked_index or (bases[i] < recovery_point and i + 1 < len(logs)):
            continue  # fsynced whole
        size = path.stat().st_size
        durable = 0
        if i == acked_index:
            durable = next(pos + h.size_bytes for pos, h in batch_codec.iter_batches(path.read_bytes())
                           if h.base_offset <= last_acked_offset <= h.last_offset)
        if bases[i] > recovery_point and i > acked_index and rng.random() < 0.3:
            for suffix in (".log", ".index", ".timeindex"):
                path.with_suffix(suffix).unlink(missing_ok=True)
            dropped += size
            continue
        cut = rng.randint(durable, size)
        if rng.random() < 0.5:
            os.truncate(path, cut)
        else:
            with open(path, "r+b") as f:
                f.seek(cut)
                f.write(b"\0" * (size - cut))
        dropped += size - cut
        if rng.random() < 0.5:
            for suffix in (".index", ".timeindex"):
                if path.with_suffix(suffix).exists():
                    os.truncate(path.with_suffix(suffix), 0)
    return dropped


def last_acked(producers, partition: int) -> int | None:
    offsets = [o for p in producers if p.partition == partition for o in p.acked_snapshot().values()]
    return max(offsets, default=None)


def test_acks_fsync_records_survive_a_simulated_power_loss_that_drops_every_unsynced_write(tmp_path, ledger):
    """Each round: acks=fsync load on every partition, kill -9 of the appliance at a random
    moment, then every write not covered by an fsync is dropped as described in
    drop_unsynced_writes, and the appliance restarts on what is left. Every fsync-acked
    record of every round must be there exactly once; producers of later rounds write on
    top of the recovered logs."""
    row = ledger("power loss: kill -9, then every unsynced write dropped (torn, zeroed, vanished files)",
                 "acks=fsync: every acked record survives exactly once")
    rng = rng_for("power-loss")
    rounds = by_mode(2, 50)
    data_dir = tmp_path / "data"
    app = Appliance(data_dir, workers=2, config_text=CONFIG).start()
    everyone, fsynced, dropped_bytes = [], [], 0
    try:
        create_topic(app, "power", PARTITIONS)
        for r in range(rounds):
            producers = start_producers(app, "power", list(range(PARTITIONS)), first_id=2000 + 10 * r)
            # acks=1 traffic in between: written, not promised to survive, so the bytes
            # after the last fsync-acked batch are many and all of them may go.
            written = start_producers(app, "power", list(range(PARTITIONS)), first_id=5000 + 10 * r,
                                      acks=wire.Durability.WRITTEN)
            fsynced += producers
            everyone += producers + written
            wait_for_progress(producers + written, 3)
            time.sleep(rng.uniform(0, 1.0))
            app.kill()
            stop_producers(producers + written)
            for p in range(PARTITIONS):
                dropped_bytes += drop_unsynced_writes(data_dir / f"power-{p}", last_acked(fsynced, p), rng)
            app.start()
            row.rounds = r + 1
        final = Verdict()
        for p in range(PARTITIONS):  # acks=1 records may be gone; any record stored twice may not
            acked = {v: o for prod in fsynced if prod.partition == p for v, o in prod.acked_snapshot().items()}
            final.add(verify_partition(app, "power", p, everyone, acked))
        account(row, final)
        row.notes["unsynced_bytes_dropped"] = dropped_bytes
        final.assert_clean()
        assert dropped_bytes > 0, "the simulation dropped nothing: it tested nothing"
        assert "cutting" in app.log()
        assert app.stop() == 0
    finally:
        for p in everyone:
            p.request_stop()
        app.kill()
    assert_data_dir_checks_clean(data_dir)
