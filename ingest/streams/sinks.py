"""Sink topics: created by the supervisor with their source's partition count.

Co-partitioning is what keeps a processor inside one worker: sink partition p must be
owned by the worker that owns source partition p, and ownership is p % workers, so the
two topics need the same partition count. A sink that exists with another count is a
configuration error (partition counts never change).
"""

from __future__ import annotations

from ingest.config import ConfigError, TopicConfig
from ingest.streams.spec import ProcessorConfig


def sinks_to_create(processors: tuple[ProcessorConfig, ...], topics: dict[str, dict]) -> list[TopicConfig]:
    """Sink topics to create now: each processor's whose source exists and sink does not.

    Raises ConfigError for a sink that exists with another partition count. Repeats until
    no more appear, so a processor reading another processor's sink gets its sink too.
    """
    known = {name: t["partitions"] for name, t in topics.items()}
    out: list[TopicConfig] = []
    grew = True
    while grew:
        grew = False
        for p in processors:
            if p.source not in known:
                continue
            if p.sink in known:
                if known[p.sink] != known[p.source]:
                    raise ConfigError(
                        f"processor {p.name!r}: sink {p.sink!r} has {known[p.sink]} partitions but source "
                        f"{p.source!r} has {known[p.source]}: they must be equal (co-partitioned)")
                continue
            known[p.sink] = known[p.source]
            out.append(TopicConfig(p.sink, known[p.source]))
            grew = True
    return out
