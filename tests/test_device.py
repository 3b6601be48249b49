"""The device examples, as a firmware developer would use them: examples/c/device.c built
with the system compiler against Debian's libzmq, and examples/python/device.py, run
against a real `ingest serve`; every reading is read back through the SDK.

The C build needs gcc, make, pkg-config and libzmq3-dev (tests/install-deps.sh)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2

from ingest.net import wire
from ingest.shards import batch as batch_codec
from tests.readback import read_back
from tests.support import FAST_HEARTBEATS, Appliance, create_topic, eventually, metric_value

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RAW_TOPIC = "raw-readings"
RAW_PORT_OFFSET = 30  # within the appliance's block of free ports (tests.support)
# Generous: a restarted worker loads its numba kernels before it answers again.
DEVICE_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def device_binary(tmp_path_factory) -> Path:
    """examples/c built by its own Makefile, warnings as errors, out of the source tree."""
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.fail("make and cc are needed: run `sh tests/install-deps.sh` as root")
    build_dir = tmp_path_factory.mktemp("device-build")
    result = subprocess.run(["make", "-C", str(EXAMPLES / "c"), f"BUILD_DIR={build_dir}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"examples/c does not build:\n{result.stdout}{result.stderr}"
    return build_dir / "device"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("device-appliance") / "data"
    appliance = Appliance(data, workers=2)
    appliance.config_text = (FAST_HEARTBEATS + f'\n[[topic]]\nname = "{RAW_TOPIC}"\npartitions = 2\n'
                             f"raw_port = {appliance.port + RAW_PORT_OFFSET}\n")
    appliance.start()
    yield appliance
    exit_code = appliance.stop(signal.SIGTERM)
    assert exit_code == 0, appliance.log()[-4000:]


def run_device(argv: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=DEVICE_TIMEOUT_S)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result


def kafka_partition(key: bytes, partitions: int) -> int:
    return (kafka_murmur2(key) & 0x7FFFFFFF) % partitions


def readings_of(records) -> list[int]:
    return [json.loads(r.value)["seq"] for r in records]


# Calls the C device's encoders with fixed inputs and writes their bytes to stdout.
ENCODER_HARNESS = r"""
#define main device_main
#include "device.c"
#undef main
int main(void) {
    static uint8_t out[FRAME_BYTES_MAX];
    size_t n = encode_record_batch(out, "dev-42", "dev-42", 7, 3, 1000, 5, 1700000000000LL);
    fwrite(out, 1, n, stdout);
    n = encode_record(out, "sensors", "dev-42", "{\"t\":21.5}", ACKS_NONE, 1700000000000LL);
    fwrite(out, 1, n, stdout);
    return 0;
}
"""


def reading(device: str, seq: int) -> bytes:
    """The C device's reading() in Python."""
    return f'{{"device":"{device}","seq":{seq},"temp_c":{20.0 + (seq % 50) / 10:.1f}}}'.encode()


def test_c_device_encoders_write_the_same_bytes_as_the_appliances_codec(tmp_path):
    harness = tmp_path / "harness.c"
    harness.write_text(ENCODER_HARNESS)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq"], capture_output=True,
                           text=True).stdout.split() or ["-lzmq"]
    build = subprocess.run(["cc", "-std=c11", "-Wall", "-Werror", "-I", str(EXAMPLES / "c"), "-o",
                            str(tmp_path / "harness"), str(harness), *flags], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(tmp_path / "harness")], capture_output=True, check=True, timeout=30).stdout
    expected_batch = batch_codec.encode_batch(
        [batch_codec.Record(0, 1_700_000_000_000, b"dev-42", reading("dev-42", seq)) for seq in (7, 8, 9)],
        producer_id=1000, producer_epoch=0, base_sequence=5)
    expected_record = wire.RecordMessage(topic="sensors", value=b'{"t":21.5}', key=b"dev-42",
                                         partition=wire.AUTO_PARTITION, timestamp_ms=1_700_000_000_000,
                                         acks=wire.Durability.NONE).encode()
    assert out[:len(expected_batch)].hex() == expected_batch.hex()
    assert out[len(expected_batch):].hex() == expected_record.hex()


def test_c_device_pushes_readings_that_land_once_on_their_keys_partition(app, device_binary):
    create_topic(app, "pushed", 4)
    run_device([str(device_binary), "push", app.bootstrap, "pushed", "boiler-7", "500"])
    records = read_back(app.bootstrap, "pushed", 500)
    assert sorted(readings_of(records)) == list(range(500))  # every reading, once
    assert {r.key for r in records} == {b"boiler-7"}
    assert {r.partition for r in records} == {kafka_partition(b"boiler-7", 4)}
    assert readings_of(records) == list(range(500))  # one partition: in send order


def test_c_device_acked_sends_resend_after_a_timeout_and_store_each_reading_once(app, device_binary):
    """The owner worker is stopped (SIGSTOP) when the device sends its first batch: no reply
    comes, the device resends the same batch, and when the worker resumes it finds the
    original and the resends in its queue; it stores one and answers the others with the
    original offsets (the batch's producer id and sequence)."""
    create_topic(app, "acked", 2)
    partition = kafka_partition(b"meter-1", 2)
    victim = app.worker_pids()[partition % 2]
    duplicates_before = metric_value(app.metrics_text(), "ingest_duplicate_batches_total")
    os.kill(victim, signal.SIGSTOP)
    try:
        device = subprocess.Popen([str(device_binary), "send", app.bootstrap, "acked", "meter-1", "50"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.5)  # two or three request timeouts: resends pile up behind the stopped worker
    finally:
        os.kill(victim, signal.SIGCONT)
    out, err = device.communicate(timeout=DEVICE_TIMEOUT_S)
    assert device.returncode == 0, out + err
    assert "resending the batch" in err
    records = read_back(app.bootstrap, "acked", 50)
    assert readings_of(records) == list(range(50))  # once each, in order
    assert {(r.key, r.partition) for r in records} == {(b"meter-1", partition)}
    # What the device printed as acked is where the readings are.
    acked = [line.split("offsets ")[1] for line in out.splitlines() if line.startswith("acked")]
    assert acked[0] == f"{records[0].offset}..{records[9].offset}" and len(acked) == 5
    assert eventually(lambda: metric_value(app.metrics_text(), "ingest_duplicate_batches_total")
                      > duplicates_before, timeout_s=10)


def test_c_device_acked_sends_ride_out_a_kill_9_of_the_owner_worker(app, device_binary):
    create_topic(app, "acked-kill", 2)
    partition = kafka_partition(b"meter-2", 2)
    owner = partition % 2
    victim = app.worker_pids()[owner]
    device = subprocess.Popen([str(device_binary), "send", app.bootstrap, "acked-kill", "meter-2", "1500"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert device.stdout.readline().startswith("acked")  # mid-stream, then:
    os.kill(victim, signal.SIGKILL)
    out, err = device.communicate(timeout=DEVICE_TIMEOUT_S)
    assert device.returncode == 0, out + err
    assert "resending the batch" in err  # the kill cost it at least one reply
    assert app.worker_pids()[owner] != victim  # the supervisor restarted it
    records = read_back(app.bootstrap, "acked-kill", 1500)
    assert readings_of(records) == list(range(1500))  # nothing lost, nothing twice, in order


def test_c_device_raw_frames_become_one_record_each(app, device_binary):
    run_device([str(device_binary), "raw", app.bootstrap, RAW_TOPIC, "200"])
    records = read_back(app.bootstrap, RAW_TOPIC, 200)
    assert sorted(readings_of(records)) == list(range(200))
    assert all(r.key is None for r in records)


def test_c_device_refuses_a_topic_without_a_raw_port_with_a_clear_message(app, device_binary):
    create_topic(app, "no-raw", 1)
    result = subprocess.run([str(device_binary), "raw", app.bootstrap, "no-raw", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "has no raw_port" in result.stderr


def test_python_device_example_pushes_readings_read_back_by_the_sdk(app):
    create_topic(app, "py-device", 2)
    script = EXAMPLES / "python" / "device.py"
    assert len(script.read_text().splitlines()) <= 30  # the example stays short enough to read
    run_device([sys.executable, str(script), app.bootstrap, "py-device", "sensor-9", "300"])
    records = read_back(app.bootstrap, "py-device", 300)
    assert readings_of(records) == list(range(300))
    assert {(r.key, r.partition) for r in records} == {(b"sensor-9", kafka_partition(b"sensor-9", 2))}
