"""The leader-epoch cache of one partition and its file, ``leader-epoch-checkpoint``.

Kafka's LeaderEpochFileCache: an ordered list of (epoch, start_offset), one entry per
leader epoch that appended to this log, where start_offset is the first offset written
in that epoch. It answers Kafka's OffsetsForLeaderEpoch ("where does epoch e end in this
log?"), which tells a follower how much of its log it shares with the leader.

File format (Kafka's CheckpointFile): a version line "0", a count line, then one
"epoch start_offset" line per entry. Replaced atomically (write, fsync, rename, fsync the
directory) on every change, which happens once per epoch, not per batch.

Contract: epochs and start offsets both grow strictly along the list; an entry is on disk
before the batch that introduced it is acknowledged (the caller saves before appending).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path

CHECKPOINT_FILE = "leader-epoch-checkpoint"
CHECKPOINT_VERSION = 0
NO_EPOCH = -1


class CorruptCheckpointError(ValueError):
    pass


class LeaderEpochCache:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / CHECKPOINT_FILE
        self.entries: list[tuple[int, int]] = self._load()

    # ---- queries -----------------------------------------------------------------------

    @property
    def latest_epoch(self) -> int:
        return self.entries[-1][0] if self.entries else NO_EPOCH

    def end_offset_for(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """(largest epoch <= `epoch` here, where it ends): the next epoch's start offset,
        or log_end_offset for the latest one. NO_EPOCH with the first start offset when
        every epoch here is newer (or log_end_offset when there is none)."""
        if not self.entries:
            return NO_EPOCH, log_end_offset
        epochs = [e for e, _ in self.entries]
        i = bisect_right(epochs, epoch)
        if i == 0:
            return NO_EPOCH, self.entries[0][1]
        if i == len(self.entries):
            return self.entries[-1][0], log_end_offset
        return self.entries[i - 1][0], self.entries[i][1]

    # ---- changes -----------------------------------------------------------------------

    def assign(self, epoch: int, start_offset: int) -> bool:
        """Record that `epoch` starts at `start_offset` if it is newer than the latest
        epoch; True if the cache changed (and the file was replaced)."""
        if epoch <= self.latest_epoch or epoch < 0:
            return False
        if self.entries and start_offset < self.entries[-1][1]:
            raise ValueError(f"epoch {epoch} cannot start at {start_offset}, before epoch "
                             f"{self.entries[-1][0]} at {self.entries[-1][1]}")
        self.entries.append((epoch, start_offset))
        self._save()
        return True

    def truncate_from_end(self, end_offset: int) -> None:
        """Forget epochs that start at or after `end_offset` (the log was cut there)."""
        kept = [entry for entry in self.entries if entry[1] < end_offset]
        if kept != self.entries:
            self.entries = kept
            self._save()

    # ---- file --------------------------------------------------------------------------

    def _load(self) -> list[tuple[int, int]]:
        try:
            lines = self.path.read_text().split("\n")
        except FileNotFoundError:
            return []
        try:
            if int(lines[0]) != CHECKPOINT_VERSION:
                raise ValueError(f"version {lines[0]}")
            count = int(lines[1])
            entries = [tuple(map(int, line.split())) for line in lines[2:2 + count]]
            if len(entries) != count or any(len(e) != 2 for e in entries):
                raise ValueError("entry count does not match")
        except (ValueError, IndexError) as e:
            raise CorruptCheckpointError(f"{self.path}: {e}") from None
        for (e1, o1), (e2, o2) in zip(entries, entries[1:]):
            if not (e1 < e2 and o1 <= o2):
                raise CorruptCheckpointError(f"{self.path}: entries out of order")
        return [(int(e), int(o)) for e, o in entries]

    def _save(self) -> None:
        text = f"{CHECKPOINT_VERSION}\n{len(self.entries)}\n" + "".join(
            f"{e} {o}\n" for e, o in self.entries)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
