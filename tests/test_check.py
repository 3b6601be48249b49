"""`ingest check`: offline verification of every segment of every partition."""

import os
import struct
from pathlib import Path

from ingest.shards.check import check_data_dir, main
from ingest.shards.log import Log, LogConfig
from tests.kafka_batches import make_batch, parse_batches

CONFIG = LogConfig(segment_bytes=3000, index_interval_bytes=300)


def build_data_dir(data_dir: Path, partitions: int = 2) -> None:
    for p in range(partitions):
        log = Log(data_dir / f"telemetry.raw-{p}", CONFIG)
        for i in range(40):
            log.append(make_batch(count=1 + i % 3, value_bytes=60 + i, seed=p * 1000 + i,
                                  timestamp_ms=5_000 + (i * 31) % 700))
        log.close()


def segment_files(partition_dir: Path, suffix: str) -> list[Path]:
    return sorted(partition_dir.glob(f"*{suffix}"))


def test_clean_data_has_no_problems_and_check_exits_0_with_a_summary(tmp_path, capsys):
    build_data_dir(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    assert check_data_dir(tmp_path) == []
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 2 partition(s)") and "80 batches" in out


def test_a_corrupt_batch_in_a_sealed_segment_is_reported_with_file_position_and_offset(
        tmp_path, capsys):
    build_data_dir(tmp_path)
    sealed = segment_files(tmp_path / "telemetry.raw-1", ".log")[1]
    data = bytearray(sealed.read_bytes())
    victim = parse_batches(bytes(data))[2]
    data[victim.position + victim.size - 1] ^= 0x01
    sealed.write_bytes(bytes(data))

    problems = check_data_dir(tmp_path)
    log_problems = [p for p in problems if p.file == str(sealed)]
    assert len(log_problems) == 1
    assert (log_problems[0].position, log_problems[0].offset) == (victim.position,
                                                                  victim.base_offset)
    assert "crc" in log_problems[0].message.lower()
    assert main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"{sealed}:{victim.position}: offset {victim.base_offset}:" in lines[0]


def test_an_index_entry_that_disagrees_with_the_log_is_reported(tmp_path):
    build_data_dir(tmp_path, partitions=1)
    index = segment_files(tmp_path / "telemetry.raw-0", ".index")[0]
    raw = bytearray(index.read_bytes())
    assert len(raw) >= 16
    relative_offset, position = struct.unpack_from(">ii", raw, 8)
    struct.pack_into(">ii", raw, 8, relative_offset, position + 1)  # not a batch start
    index.write_bytes(bytes(raw))
    problems = check_data_dir(tmp_path)
    assert [(p.file, p.position) for p in problems] == [(str(index), 8)]


def test_a_time_index_entry_with_a_wrong_timestamp_is_reported(tmp_path):
    build_data_dir(tmp_path, partitions=1)
    index = segment_files(tmp_path / "telemetry.raw-0", ".timeindex")[0]
    raw = bytearray(index.read_bytes())
    timestamp_ms, relative_offset = struct.unpack_from(">qi", raw, 0)
    struct.pack_into(">qi", raw, 0, timestamp_ms - 1, relative_offset)
    index.write_bytes(bytes(raw))
    assert [(p.file, p.position) for p in check_data_dir(tmp_path)] == [(str(index), 0)]


def test_a_missing_segment_is_reported_as_a_gap_in_offsets(tmp_path):
    build_data_dir(tmp_path, partitions=1)
    partition = tmp_path / "telemetry.raw-0"
    logs = segment_files(partition, ".log")
    assert len(logs) >= 3
    expected_offset = int(logs[1].name[:20])
    for suffix in (".log", ".index", ".timeindex"):
        os.unlink(partition / (logs[1].name[:20] + suffix))
    problems = check_data_dir(tmp_path)
    assert [(p.file, p.offset) for p in problems] == [(str(logs[2]), expected_offset)]


def test_a_torn_tail_of_an_unclean_shutdown_is_reported_as_such(tmp_path):
    build_data_dir(tmp_path, partitions=1)
    partition = tmp_path / "telemetry.raw-0"
    os.unlink(partition / "clean-shutdown")
    active = segment_files(partition, ".log")[-1]
    with open(active, "ab") as f:
        f.write(b"\x00" * 30)
    problems = check_data_dir(tmp_path)
    assert len(problems) == 1 and problems[0].file == str(active)
    assert "next open cuts it" in problems[0].message


def test_check_of_a_missing_directory_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 2
    assert "not a directory" in capsys.readouterr().err
