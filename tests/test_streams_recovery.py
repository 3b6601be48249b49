"""A processor resumes from the position in its sink: a chunk whose outputs were cut by a
crash (some sink batches written, the one carrying the position not) is completed, not
duplicated. Real partitions on disk; the worker's append is the only piece stood in for."""

from __future__ import annotations

import random

import orjson

from ingest.clock import now_ms
from ingest.shards import batch as batch_codec
from ingest.shards.log import LogConfig
from ingest.shards.partition import Partition
from ingest.streams import position as position_mod
from ingest.streams.runtime import ProcessorTask
from ingest.streams.spec import ProcessorConfig


class Appender:
    """What a ProcessorTask needs of its worker: append to a partition it owns."""

    def append(self, part, data, header, t_ms):
        return part.append(data, header, t_ms)


def fill_source(part: Partition, records: int) -> None:
    rng = random.Random(5)
    t = 1_700_000_000_000
    for lo in range(0, records, 500):
        rows = []
        for i in range(lo, lo + 500):
            t += rng.randrange(0, 30)
            value = orjson.dumps({"temp_c": rng.uniform(0, 100), "pad": "p" * 250})
            rows.append(batch_codec.Record(0, t - rng.choice([0, 0, 400, 3000]), b"dev-%d" % rng.randrange(20), value))
        data = batch_codec.encode_batch(rows)
        part.append(data, batch_codec.parse_header(data), now_ms())
    part.log.flush()


def sink_records(part: Partition) -> list[batch_codec.Record]:
    out, offset = [], 0
    while offset < part.log.log_end_offset:
        chunk = part.log.read(offset, 1 << 20)
        for pos, header in batch_codec.iter_batches(chunk):
            if header.base_offset >= offset:
                out += batch_codec.decode_batch(chunk, pos)[1]
                offset = header.last_offset + 1
    return out


def run(task: ProcessorTask) -> None:
    while task.behind() or task.processor is None:
        task.step(1 << 30)


def test_outputs_of_a_chunk_cut_by_a_crash_are_completed_once(tmp_path):
    config = ProcessorConfig("w", "aggregate", "src", "out", fields=("temp_c",), window_ms=1000,
                             advance_ms=500, grace_ms=200)
    source = Partition(tmp_path, "src", 0, LogConfig(), now_ms())
    fill_source(source, 20_000)  # about 6 MiB: several chunks, each ending with a position
    whole = Partition(tmp_path, "out", 0, LogConfig(), now_ms())
    run(ProcessorTask(config, source, whole, Appender()))
    reference = sink_records(whole)
    positioned = [i for i, r in enumerate(reference) if position_mod.decode(r.headers)]
    assert len(positioned) >= 3 and positioned[-1] == len(reference) - 1

    # The state a crash leaves: everything up to the second position, then part of the
    # next chunk's outputs in a batch without a position.
    cut_at = positioned[1] + 1
    orphans = (positioned[2] - positioned[1]) // 2
    assert orphans > 0
    crashed = Partition(tmp_path, "crashed", 0, LogConfig(), now_ms())
    head = reference[:cut_at]
    for lo in range(0, len(head), 1000):
        data = batch_codec.encode_batch(head[lo:lo + 1000])
        crashed.append(data, batch_codec.parse_header(data), now_ms())
    # The position rides on the last record of the last batch written before the cut.
    assert position_mod.decode(head[-1].headers)
    orphan_rows = [batch_codec.Record(0, r.timestamp_ms, r.key, r.value) for r in reference[cut_at:cut_at + orphans]]
    data = batch_codec.encode_batch(orphan_rows)
    crashed.append(data, batch_codec.parse_header(data), now_ms())

    resumed = ProcessorTask(config, source, crashed, Appender())
    resumed.open()
    assert resumed.skip_outputs == orphans
    assert resumed.position == position_mod.decode(reference[positioned[1]].headers).next_offset
    run(resumed)
    strip = lambda rows: [(r.key, r.value, r.timestamp_ms) for r in rows]  # noqa: E731
    assert strip(sink_records(crashed)) == strip(reference)


def test_a_checkpoint_file_is_used_only_where_the_sink_agrees_with_it(tmp_path):
    from ingest.streams import checkpoint
    from ingest.streams.position import Position
    from ingest.streams.runtime import find_position

    config = ProcessorConfig("f", "filter", "src", "out", where="temp_c > 50")
    source = Partition(tmp_path, "src", 0, LogConfig(), now_ms())
    fill_source(source, 4000)
    sink = Partition(tmp_path, "out", 0, LogConfig(), now_ms())
    run(ProcessorTask(config, source, sink, Appender()))
    end = sink.log.log_end_offset
    in_sink, orphans = find_position(sink.log, "f")
    assert in_sink.next_offset == 4000 and orphans == 0
    # Saved after the sink's newest position, the sink unchanged since: the file wins.
    later = Position("f", 4100, 4100)
    checkpoint.save(sink.directory, later, end)
    assert find_position(sink.log, "f", checkpoint.load(sink.directory, "f")) == (later, 0)
    # Saved before the sink's newest positioned batch: the sink knows better.
    checkpoint.save(sink.directory, Position("f", 4100, 4100), end - 1)
    assert find_position(sink.log, "f", checkpoint.load(sink.directory, "f")) == (in_sink, 0)
    # Claims records the sink does not hold (a power cut took its tail): ignored.
    checkpoint.save(sink.directory, Position("f", 4100, 4100), end + 5)
    assert find_position(sink.log, "f", checkpoint.load(sink.directory, "f")) == (in_sink, 0)
