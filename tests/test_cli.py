"""The `ingest` command as a user types it, against a real appliance."""

from __future__ import annotations

import subprocess
import sys

import orjson

from tests.support import eventually

INGEST = [sys.executable, "-m", "ingest.cli"]


def ingest(*args: str, stdin: bytes | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*INGEST, *args], input=stdin, capture_output=True, timeout=timeout_s)


def test_ten_thousand_lines_round_trip_in_order_per_partition(appliance):
    lines = [b"reading %05d" % i for i in range(10_000)]
    sent = ingest("produce", "--bootstrap", appliance.bootstrap, "--topic", "lines",
                  stdin=b"\n".join(lines) + b"\n")
    assert sent.returncode == 0, sent.stderr
    assert b"10000 records acked" in sent.stderr

    got = ingest("consume", "--bootstrap", appliance.bootstrap, "--topic", "lines", "--from-beginning",
                 "--idle-timeout-ms", "1500", "--format", "json")
    assert got.returncode == 0, got.stderr
    records = [orjson.loads(line) for line in got.stdout.splitlines()]
    assert sorted(r["value"].encode() for r in records) == lines  # none lost, none twice
    for p in {r["partition"] for r in records}:
        mine = [r for r in records if r["partition"] == p]
        assert [r["offset"] for r in mine] == list(range(len(mine)))
        # one producer, so each partition holds its lines in the order they were read
        assert [r["value"] for r in mine] == sorted(r["value"] for r in mine)


def test_keyed_lines_share_a_partition_and_a_group_resumes(appliance):
    sent = ingest("produce", "--bootstrap", appliance.bootstrap, "--topic", "keyed", "--key", "device-7",
                  "--acks", "1", stdin=b"a\nb\nc\nd\n")
    assert sent.returncode == 0, sent.stderr
    first = ingest("consume", "--bootstrap", appliance.bootstrap, "--topic", "keyed", "--from-beginning",
                   "--group", "g", "--max-records", "2", "--format", "json")
    second = ingest("consume", "--bootstrap", appliance.bootstrap, "--topic", "keyed", "--group", "g",
                    "--idle-timeout-ms", "1000", "--format", "json")
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    rows = [orjson.loads(x) for x in first.stdout.splitlines() + second.stdout.splitlines()]
    assert [r["value"] for r in rows] == ["a", "b", "c", "d"]
    assert {r["partition"] for r in rows} == {rows[0]["partition"]} and {r["key"] for r in rows} == {"device-7"}


def test_topics_and_status_describe_the_running_appliance(appliance):
    created = ingest("topics", "create", "sensors", "--partitions", "3", "--bootstrap", appliance.bootstrap)
    assert created.returncode == 0 and b"sensors: 3 partitions" in created.stdout, created.stderr
    listed = ingest("topics", "list", "--bootstrap", appliance.bootstrap)
    assert b"sensors\t3" in listed.stdout
    status = ingest("status", "--json", "--bootstrap", appliance.bootstrap)
    doc = orjson.loads(status.stdout)
    assert status.returncode == 0 and len(doc["workers"]) == 2 and all(w["up"] for w in doc["workers"])
    assert doc["topics"]["sensors"]["partitions"] == 3


def test_user_errors_are_one_line_without_a_traceback(appliance, tmp_path):
    cases = [
        ("produce", "--bootstrap", "tcp://127.0.0.1:1", "--topic", "x", "--timeout-ms", "1000"),
        ("topics", "describe", "missing", "--bootstrap", appliance.bootstrap),
        ("topics", "create", "bad/name", "--bootstrap", appliance.bootstrap),
        ("serve", "--config", str(tmp_path / "missing.toml")),
        ("check", str(tmp_path / "no-such-dir")),
    ]
    for args in cases:
        result = ingest(*args, stdin=b"x\n", timeout_s=60)
        assert result.returncode != 0, args
        assert b"Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_status_and_top_show_workers_partitions_offsets_and_lag(appliance):
    sent = ingest("produce", "--bootstrap", appliance.bootstrap, "--topic", "seen", stdin=b"x\n" * 300)
    assert sent.returncode == 0, sent.stderr
    read = ingest("consume", "--bootstrap", appliance.bootstrap, "--topic", "seen", "--from-beginning",
                  "--group", "ops", "--max-records", "100")
    assert read.returncode == 0, read.stderr
    # The offsets reach the supervisor with the next heartbeat.
    assert eventually(lambda: b"GROUP" in ingest("status", "--bootstrap", appliance.bootstrap).stdout)
    status = ingest("status", "--bootstrap", appliance.bootstrap)
    assert status.returncode == 0, status.stderr
    text = status.stdout.decode()
    for header in ("WORKER", "STATE", "RSS", "TOPIC", "END", "RECORDS/S", "GROUP", "LAG"):
        assert header in text
    ends = {line.split()[1]: int(line.split()[3]) for line in text.splitlines() if line.startswith("seen ")}
    assert sum(ends.values()) == 300
    lags = [int(line.split()[3]) for line in text.splitlines() if line.startswith("ops ")]
    assert sum(lags) == 200
    top = ingest("top", "--bootstrap", appliance.bootstrap, "--iterations", "2", "--interval-ms", "200")
    assert top.returncode == 0 and top.stdout.count(b"WORKER") == 2, top.stderr
