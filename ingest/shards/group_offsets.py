"""Committed consumer-group offsets of one partition, stored by the worker that owns it.

`consumer-offsets.json` in the partition directory maps group -> next offset to read.
A commit returns only after the file was replaced atomically and fsynced, so a committed
offset survives any crash (commits are rare next to records: one small file write each).
"""

from __future__ import annotations

from pathlib import Path

import orjson

from ingest.topics import write_atomically

OFFSETS_FILE = "consumer-offsets.json"
# Bound on the file: a partition remembers at most this many groups.
GROUPS_MAX = 10_000


class GroupOffsets:
    def __init__(self, directory: Path) -> None:
        self._path = Path(directory) / OFFSETS_FILE
        try:
            self._offsets: dict[str, int] = orjson.loads(self._path.read_bytes())
        except FileNotFoundError:
            self._offsets = {}

    def get(self, group: str) -> int | None:
        return self._offsets.get(group)

    def commit(self, group: str, offset: int) -> None:
        if group not in self._offsets and len(self._offsets) >= GROUPS_MAX:
            raise ValueError(f"more than {GROUPS_MAX} groups committed to one partition")
        if self._offsets.get(group) == offset:
            return
        self._offsets[group] = offset
        write_atomically(self._path, orjson.dumps(self._offsets))

    def groups(self) -> dict[str, int]:
        return dict(self._offsets)
