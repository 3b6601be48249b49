"""The appliance under a real systemd: systemd/ingest.service, `make install`, the example
config, sd_notify, the watchdog and the drain.

The fast tests read the unit and ask the host's systemd-analyze about it. The slow ones
boot Debian bookworm in a systemd-nspawn container (rootfs cached under
/var/cache/ingest-tests, tests/systemd/nspawn.py), install the project there with
`make install` exactly as systemd/README.md says, start the unit and poke it: READY,
watchdog petting, a SIGSTOPped worker, `systemctl stop`, records across restarts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from ingest import config as config_mod
from tests.systemd import nspawn

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "ingest.service"
EXAMPLE_CONFIG = REPO / "systemd" / "ingest.toml"
# What `make install` needs of the source tree (the rest stays out of the container).
SOURCE_ENTRIES = ("pyproject.toml", "README.md", "Makefile", "ingest", "systemd")
SOURCE_IN_CONTAINER = "/usr/src/ingest"
WHEELS_IN_CONTAINER = "/usr/src/wheels"

EXPOSURE_MAX = 2.0
# A cold start compiles every numba kernel (~20 s on 2 cores) before READY.
START_TIMEOUT_S = 180
SLOW_TEST_TIMEOUT_S = 600  # the first run debootstraps (~1 min) and downloads wheels

# The supervisor pets the watchdog every WatchdogSec / 2 (= 5 s): two pets fit in this.
WATCHDOG_PETS_WAIT_S = 14
# Stall noticed after heartbeat_timeout_ms (3 s), the watchdog fires at most WatchdogSec
# (10 s) after the last pet, then RestartSec (2 s) and a warm start (~2 s).
WATCHDOG_RESTART_WAIT_S = 45


# ---- the unit file, read as systemd reads it ---------------------------------------------

def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """{"Section.Key": [values in order]}: repeated keys accumulate, as in systemd."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    """A systemd time span of this unit ("30s", "10s", "300s") in seconds."""
    match = re.fullmatch(r"(\d+)s", value)
    if match is None:
        raise ValueError(f"write time spans as '<n>s' in {UNIT.name}, not {value!r}")
    return float(match.group(1))


@pytest.fixture(scope="session")
def host_tools():
    nspawn.install_host_packages()


def test_unit_exposure_is_at_most_2_0(host_tools):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for ingest\.service: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= EXPOSURE_MAX, result.stdout


def test_unit_leaves_numba_its_jit_and_a_writable_kernel_cache():
    settings = unit_settings()
    # numba maps writable+executable pages: under MemoryDenyWriteExecute it cannot import.
    assert settings.get("Service.MemoryDenyWriteExecute", ["no"])[-1] in ("no", "false", "0")
    environment = dict(v.split("=", 1) for v in settings["Service.Environment"])
    cache_dirs = settings["Service.CacheDirectory"][-1].split()
    assert environment["NUMBA_CACHE_DIR"] in [f"/var/cache/{d}" for d in cache_dirs]
    assert settings["Service.ProtectSystem"] == ["strict"]  # so only that cache is writable


def test_unit_timeouts_cover_the_appliance_bounds():
    settings = unit_settings()
    example = config_mod.load(EXAMPLE_CONFIG)
    for server in (config_mod.ServerConfig(), example.server):
        assert seconds(settings["Service.TimeoutStopSec"][-1]) * 1000 > server.shutdown_timeout_ms
        assert seconds(settings["Service.WatchdogSec"][-1]) * 1000 > server.heartbeat_timeout_ms
    assert settings["Service.Type"] == ["notify"] and settings["Service.NotifyAccess"] == ["main"]
    assert settings["Service.KillMode"] == ["mixed"]  # SIGTERM to the supervisor only: it drains
    assert settings["Service.Restart"] == ["on-failure"]


def test_example_config_keeps_data_in_the_units_state_directory():
    example = config_mod.load(EXAMPLE_CONFIG)
    state_dirs = unit_settings()["Service.StateDirectory"][-1].split()
    assert str(example.server.data_dir) in [f"/var/lib/{d}" for d in state_dirs]
    # Every key of the example is one the appliance knows (load() rejects unknown keys)
    # and the example sets the keys the comments in the unit refer to.
    doc = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert {"shutdown_timeout_ms", "heartbeat_timeout_ms", "data_dir"} <= set(doc["server"])


# ---- under a booted systemd --------------------------------------------------------------

@pytest.fixture(scope="module")
def container(host_tools, tmp_path_factory):
    """A booted container with the project installed by `make install` and ingest.service
    started; powered off and deleted afterwards, whatever happened."""
    rootfs = nspawn.rootfs_tarball()
    wheels = nspawn.wheelhouse(REPO / "pyproject.toml")
    work = tmp_path_factory.mktemp("systemd")
    root = work / "root"
    nspawn.extract_rootfs(rootfs, root)
    _copy_source(root / SOURCE_IN_CONTAINER.lstrip("/"))
    shutil.copytree(wheels, root / WHEELS_IN_CONTAINER.lstrip("/"))
    box = nspawn.Container(root, f"ingest-{uuid.uuid4().hex[:8]}", work / "nspawn.log")
    try:
        box.boot()
        box.run("make", "-C", SOURCE_IN_CONTAINER, "install",
                f"INSTALL_PIP_FLAGS=--no-index --find-links {WHEELS_IN_CONTAINER}")
        start = box.run("systemctl", "enable", "--now", "ingest", check=False, timeout_s=START_TIMEOUT_S)
        assert start.returncode == 0, f"{start.stderr}\n{journal_tail(box)}"
        yield box
    finally:
        box.poweroff()
        leftovers = box.leftover_mounts()
        shutil.rmtree(work, ignore_errors=True)
        assert not leftovers, f"mounts left behind by the container: {leftovers}"


def _copy_source(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    dest.mkdir(parents=True)
    for entry in SOURCE_ENTRIES:
        src = REPO / entry
        if src.is_dir():
            shutil.copytree(src, dest / entry, ignore=ignore)
        else:
            shutil.copy2(src, dest / entry)


def ensure_running(box: nspawn.Container) -> dict[str, str]:
    box.run("systemctl", "start", "ingest", timeout_s=START_TIMEOUT_S)
    return box.show("ingest", "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")


def journal_tail(box: nspawn.Container) -> str:
    return box.run("journalctl", "--no-pager", "-u", "ingest", "-n", "60", check=False).stdout


# Runs inside the container (its python3): the supervisor's children with their uid, cpu
# affinity and the segment files each has open.
WORKERS_SCRIPT = r"""
import json, os, sys
main = sys.argv[1]
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(l.split(":\t", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in l)
        if status["PPid"].strip() != main:
            continue
        logs = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        continue
    out.append({"pid": int(pid), "uid": int(status["Uid"].split()[0]),
                "cpus": status["Cpus_allowed_list"].strip(), "logs": [l for l in logs if l.endswith(".log")]})
print(json.dumps(out))
"""


def workers_of(box: nspawn.Container, main_pid: str) -> list[dict]:
    import json

    return json.loads(box.run("python3", "-c", WORKERS_SCRIPT, main_pid).stdout)


# The example config turns CURVE on; make install authorized this key pair for the local CLI.
LOCAL_CURVE = ("--curve-server-key", "/etc/ingest/keys/appliance.key",
               "--curve-client-key", "/etc/ingest/keys/local.key_secret")


def produce(box: nspawn.Container, values: list[str], key: str) -> None:
    result = box.run("/opt/ingest/bin/ingest", "produce", *LOCAL_CURVE, "--topic", "telemetry", "--key", key,
                     input="".join(v + "\n" for v in values))
    assert f"{len(values)} records acked" in result.stderr, result.stderr


def consume_all(box: nspawn.Container) -> list[str]:
    result = box.run("/opt/ingest/bin/ingest", "consume", *LOCAL_CURVE, "--topic", "telemetry",
                     "--from-beginning", "--idle-timeout-ms", "2000")
    return result.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_make_install_lays_out_venv_unit_and_config_and_keeps_an_edited_config(container):
    root = container.root
    assert (root / "opt/ingest/bin/ingest").is_file()
    assert (root / "etc/systemd/system/ingest.service").read_text() == UNIT.read_text()
    config = root / "etc/ingest/ingest.toml"
    assert config.read_text() == EXAMPLE_CONFIG.read_text()
    edited = EXAMPLE_CONFIG.read_text() + "# edited by the operator\n"
    config.write_text(edited)
    container.run("make", "-C", SOURCE_IN_CONTAINER, "install",
                  f"INSTALL_PIP_FLAGS=--no-index --find-links {WHEELS_IN_CONTAINER}")
    assert config.read_text() == edited
    assert (root / "etc/systemd/system/multi-user.target.wants/ingest.service").is_symlink()


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_installed_unit_passes_systemd_analyze_verify_silently(container):
    result = container.run("systemd-analyze", "verify", "/etc/systemd/system/ingest.service", check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_service_is_active_running_after_ready_with_pinned_unprivileged_workers_owning_disjoint_partitions(container):
    state = ensure_running(container)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), journal_tail(container)
    assert state["StatusText"].startswith("serving: bootstrap tcp://127.0.0.1:7400, 2 workers")
    workers = workers_of(container, state["MainPID"])
    assert len(workers) == 2, workers
    assert all(w["uid"] != 0 for w in workers)  # DynamicUser: never root
    assert sorted(w["cpus"] for w in workers) == ["0", "1"]  # pinned, one core each
    # Each worker has its own partitions' segments open, none of the other's.
    first, second = (set(w["logs"]) for w in workers)
    assert first and second and not first & second, workers
    assert all("/ingest/telemetry-" in log for log in first | second)
    # The kernels compiled before READY were cached where the unit points numba to.
    assert list((container.root / "var/cache/private/ingest").rglob("*.nbi")), "no numba cache index"


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_watchdog_is_petted_while_every_worker_is_healthy(container):
    ensure_running(container)
    seen = [container.show("ingest", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]]
    deadline = time.monotonic() + WATCHDOG_PETS_WAIT_S
    while len(set(seen)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        seen.append(container.show("ingest", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    pets = sorted(set(int(s) for s in seen))
    assert len(pets) >= 3 and pets[0] > 0, f"watchdog timestamps in {WATCHDOG_PETS_WAIT_S} s: {pets}"


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_systemctl_stop_drains_with_result_success_and_records_survive_the_restart(container):
    ensure_running(container)
    before = consume_all(container)
    values = [f"stop-{i}" for i in range(500)]
    produce(container, values[:250], key="device-a")
    produce(container, values[250:], key="device-b")
    t0 = time.monotonic()
    container.run("systemctl", "stop", "ingest")
    stop_s = time.monotonic() - t0
    state = container.show("ingest", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                     "ExecMainStatus": "0"}, journal_tail(container)
    assert stop_s < seconds(unit_settings()["Service.TimeoutStopSec"][-1])
    assert "supervisor INFO stopped cleanly" in journal_tail(container)
    ensure_running(container)
    assert sorted(consume_all(container)) == sorted(before + values)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_a_sigstopped_worker_stops_the_petting_and_the_watchdog_restarts_the_appliance(container):
    state = ensure_running(container)
    values = [f"watchdog-{i}" for i in range(100)]
    produce(container, values, key="device-c")
    before = consume_all(container)
    since = container.epoch_s()
    stalled = workers_of(container, state["MainPID"])[0]["pid"]
    container.run("python3", "-c", f"import os, signal; os.kill({stalled}, signal.SIGSTOP)")
    deadline = time.monotonic() + WATCHDOG_RESTART_WAIT_S
    now = state
    while time.monotonic() < deadline:
        now = container.show("ingest", "ActiveState", "SubState", "MainPID", "NRestarts")
        if int(now["NRestarts"]) > int(state["NRestarts"]) and now["SubState"] == "running":
            break
        time.sleep(0.5)
    assert int(now["NRestarts"]) == int(state["NRestarts"]) + 1, journal_tail(container)
    assert (now["ActiveState"], now["SubState"]) == ("active", "running"), journal_tail(container)
    assert now["MainPID"] != state["MainPID"]
    journal = container.journal("ingest", since)
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal, journal
    assert sorted(consume_all(container)) == sorted(before)
    assert set(values) <= set(before)


# Runs inside the container with the installed venv's Python: asks the bootstrap endpoint
# for metadata as the client whose key files are given ("-" for a plain, keyless socket)
# and prints whether an answer came.
CURVE_CLIENT_SCRIPT = r"""
import sys, zmq, zmq.auth
from ingest.net import wire
server_public, _ = zmq.auth.load_certificate("/etc/ingest/keys/appliance.key")
ctx = zmq.Context()
answered = []
for key_file in sys.argv[1:]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if key_file != "-":
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(key_file)
        s.curve_serverkey = server_public
    s.connect("tcp://127.0.0.1:7400")
    s.send(wire.MetadataRequest(correlation_id=1).encode())
    answered.append(bool(s.poll(3000)))
    s.close()
print(" ".join(map(str, answered)))
"""
@pytest.mark.slow
@pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)
def test_curve_with_the_secret_key_as_a_credential_admits_only_authorized_clients(container):
    ingest_cli = "/opt/ingest/bin/ingest"
    container.run(ingest_cli, "keys", "generate", "/root/clients", "--name", "device1")
    container.run(ingest_cli, "keys", "generate", "/root/clients", "--name", "stranger")
    container.run("install", "-D", "-m", "0644", "/root/clients/device1.key",
                  "/etc/ingest/keys/authorized/device1.key")
    time.sleep(6)  # the allow-list is re-read every reload_interval_ms (5 s): no restart
    state = container.show("ingest", "ActiveState", "SubState")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), journal_tail(container)
    answers = container.run("/opt/ingest/bin/python", "-c", CURVE_CLIENT_SCRIPT, "/etc/ingest/keys/local.key_secret",
                            "/root/clients/device1.key_secret", "/root/clients/stranger.key_secret", "-")
    assert answers.stdout.split() == ["True", "True", "False", "False"], journal_tail(container)