"""The device examples, as a firmware developer would use them: examples/c/device.c built
with the system compiler against Debian's libzmq, and examples/python/device.py, run
against a real `ingest serve`; every reading is read back through the SDK.

The C build needs gcc, make, pkg-config and libzmq3-dev (tests/device-deps.sh)."""

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
        pytest.fail("make and cc are needed: run `sh tests/device-deps.sh` as root")
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
    device = subprocess.Popen([str(device_binary), "send", app.bootstrap, "acked-kill", "meter-2", "3000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert device.stdout.readline().startswith("acked")  # mid-stream, then:
    os.kill(victim, signal.SIGKILL)
    out, err = device.communicate(timeout=DEVICE_TIMEOUT_S)
    assert device.returncode == 0, out + err
    assert "resending the batch" in err  # the kill cost it at least one reply
    assert app.worker_pids()[owner] != victim  # the supervisor restarted it
    records = read_back(app.bootstrap, "acked-kill", 3000)
    assert readings_of(records) == list(range(3000))  # nothing lost, nothing twice, in order


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
