"""The topic table: names, partition counts, raw ports; persisted in DATA_DIR/topics.json.

The supervisor is its only writer and pushes every change to the workers; a worker never
invents a topic on its own, so every process agrees on each topic's partition count
(which decides where a key lands).

Ownership is static and needs no table: worker i owns partition p of every topic when
p % workers == i.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import orjson

from ingest.config import ConfigError, TopicConfig

TOPICS_FILE = "topics.json"


class TopicLimitError(Exception):
    """A new topic would exceed [limits] topics_max; nothing was created."""


def owner_of(partition: int, workers: int) -> int:
    return partition % workers


def raw_listener_of(topic: str, workers: int) -> int:
    """The worker that binds a topic's raw_port (one process can bind a port)."""
    return zlib.crc32(topic.encode()) % workers


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` so that a crash leaves either the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class TopicRegistry:
    def __init__(self, data_dir: Path) -> None:
        self._path = Path(data_dir) / TOPICS_FILE
        self._topics: dict[str, TopicConfig] = {}
        if self._path.exists():
            for name, t in orjson.loads(self._path.read_bytes()).items():
                self._topics[name] = TopicConfig(name, t["partitions"], t.get("raw_port"))

    def get(self, name: str) -> TopicConfig | None:
        return self._topics.get(name)

    def as_dict(self) -> dict[str, dict]:
        return {n: {"partitions": t.partitions, "raw_port": t.raw_port} for n, t in sorted(self._topics.items())}

    def create(self, topic: TopicConfig, topics_max: int | None = None) -> bool:
        """Add `topic`; False if it exists with the same partitions, ConfigError if it differs,
        TopicLimitError if it is new and `topics_max` topics exist already.

        Shrinking a topic would move keys between partitions and orphan data: refused.
        Growing is refused too, for now, since it remaps keys (Kafka warns of the same).
        """
        existing = self._topics.get(topic.name)
        if existing is not None:
            if existing.partitions != topic.partitions:
                raise ConfigError(
                    f"topic {topic.name!r} exists with {existing.partitions} partitions, "
                    f"not {topic.partitions}: partition counts cannot change"
                )
            if topic.raw_port != existing.raw_port:
                self._topics[topic.name] = topic
                self._save()
                return True
            return False
        if topics_max is not None and len(self._topics) >= topics_max:
            raise TopicLimitError(f"topic {topic.name!r} not created: the appliance holds "
                                  f"{len(self._topics)} topics, [limits] topics_max is {topics_max}")
        used = {t.raw_port for t in self._topics.values() if t.raw_port}
        if topic.raw_port and topic.raw_port in used:
            raise ConfigError(f"raw_port {topic.raw_port} is already used by another topic")
        self._topics[topic.name] = topic
        self._save()
        return True

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self._path, orjson.dumps(self.as_dict(), option=orjson.OPT_INDENT_2))
