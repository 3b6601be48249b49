"""A real systemd to run the unit under: a Debian rootfs booted with systemd-nspawn.

The rootfs (debootstrap, about a minute) and the wheels of the project's dependencies are
built once and cached outside the repository (CACHE_DIR); each test run extracts a fresh
copy of the rootfs, boots it, drives its systemd with `nsenter ... systemctl` (machinectl
needs a D-Bus on the host, which a bare container host does not have) and powers it off.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

CACHE_DIR = Path(os.environ.get("INGEST_TEST_CACHE_DIR", "/var/cache/ingest-tests"))
INSTALL_DEPS = Path(__file__).with_name("install-deps.sh")

DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, the project's Python
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# make: the container installs with the project's own `make install`.
ROOTFS_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "make")
CONTAINER_PYTHON = (3, 11)

# Timeouts in seconds, each with its reason.
DEBOOTSTRAP_TIMEOUT_S = 900  # about 60 s on a good mirror; slow mirrors take minutes
PIP_WHEEL_TIMEOUT_S = 600  # downloads numba, llvmlite, numpy (~80 MB) on the first run
BOOT_TIMEOUT_S = 60  # a minbase container is up in well under a second
POWEROFF_TIMEOUT_S = 30  # systemd stops every unit; ingest drains within 20 s
COMMAND_TIMEOUT_S = 120  # the longest container command is `make install` (~10 s)

PR_SET_PDEATHSIG = 1
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def install_host_packages() -> None:
    """systemd-nspawn, debootstrap and systemd-analyze on the host (idempotent)."""
    subprocess.run(["sh", str(INSTALL_DEPS)], check=True, timeout=600)


@contextmanager
def _locked(path: Path):
    """One builder at a time: two test runs must not debootstrap into the same cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def rootfs_tarball() -> Path:
    """The cached tarball of a minbase Debian with systemd and python3; built when missing."""
    tarball = CACHE_DIR / f"rootfs-{DEBIAN_SUITE}-{_key(DEBIAN_SUITE, *ROOTFS_PACKAGES)}.tar"
    if tarball.exists():
        return tarball
    with _locked(CACHE_DIR / "rootfs.lock"):
        if tarball.exists():
            return tarball
        build = Path(tempfile.mkdtemp(prefix="rootfs-build-", dir=CACHE_DIR))
        partial = tarball.with_suffix(".tar.partial")
        try:
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
                 DEBIAN_SUITE, str(build), DEBIAN_MIRROR],
                capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
            if result.returncode != 0:
                log = build / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace")[-3000:] if log.exists() else result.stderr[-3000:]
                raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{detail}")
            build.chmod(0o755)  # mkdtemp's 0700 would become the container's / and lock out every user
            subprocess.run(["tar", "--numeric-owner", "-C", str(build), "-cf", str(partial), "."],
                           check=True, timeout=300)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
            partial.unlink(missing_ok=True)
    return tarball


def extract_rootfs(tarball: Path, root: Path) -> None:
    root.mkdir(parents=True)
    subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-xf", str(tarball)], check=True, timeout=300)
    root.chmod(0o755)  # the container's /, whatever mode the directory it lands in has


def wheelhouse(pyproject: Path) -> Path:
    """A cached directory of wheels: the project's build requirements and dependencies,
    for an offline `pip install --no-index --find-links` inside the container."""
    if sys.version_info[:2] != CONTAINER_PYTHON:
        raise RuntimeError(f"wheels are built with the host's Python, which must be "
                           f"{'.'.join(map(str, CONTAINER_PYTHON))} like the container's")
    doc = tomllib.loads(pyproject.read_text())
    requirements = sorted(doc["build-system"]["requires"] + doc["project"]["dependencies"])
    wheels = CACHE_DIR / f"wheels-cp311-{_key(*requirements)}"
    if wheels.exists():
        return wheels
    with _locked(CACHE_DIR / "wheels.lock"):
        if wheels.exists():
            return wheels
        partial = Path(tempfile.mkdtemp(prefix="wheels-build-", dir=CACHE_DIR))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                 "--wheel-dir", str(partial), *requirements],
                capture_output=True, text=True, timeout=PIP_WHEEL_TIMEOUT_S)
            if result.returncode != 0:
                raise RuntimeError(f"pip wheel failed ({result.returncode}):\n{result.stderr[-3000:]}")
            os.replace(partial, wheels)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return wheels


def _die_with_parent() -> None:
    """In the nspawn child: SIGTERM (a clean poweroff) if the test process dies first."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Container:
    """A booted container. `run()` executes a command inside it as root; `poweroff()`
    stops it and leaves no process, mount or cgroup of it behind."""

    def __init__(self, root: Path, name: str, log_path: Path) -> None:
        self.root = root
        self.name = name
        self.log_path = log_path
        self.nspawn: subprocess.Popen | None = None
        self.init_pid = 0  # host pid of the container's systemd
        self._cgroups: list[Path] = []

    # ---- boot / poweroff ---------------------------------------------------------------

    def boot(self) -> None:
        self._cgroups = _own_cgroups(self.name)
        log = open(self.log_path, "ab")
        # --private-network: the appliance binds its default ports on the container's own
        # loopback, never clashing with anything on the host.
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(self.root), "-b", "-M", self.name, "--register=no",
             "--keep-unit", "--console=passive", "--private-network"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: (_enter_cgroups(self._cgroups), _die_with_parent()))
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.init_pid:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no systemd in container {self.name}:\n{self.log()}")
            self.init_pid = _find_init(self.nspawn.pid)
            time.sleep(0.05)
        while True:
            self._check_alive()
            state = self.run("systemctl", "is-system-running", check=False, timeout_s=10).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {self.name} did not boot (state {state!r}):\n{self.log()}")
            time.sleep(0.1)

    def poweroff(self) -> None:
        """SIGTERM to nspawn halts the container cleanly; SIGKILL if it hangs."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.terminate()
            try:
                self.nspawn.wait(POWEROFF_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        for cgroup in self._cgroups:
            _remove_cgroup_tree(cgroup)

    def leftover_mounts(self) -> list[str]:
        """Host mounts still under the container's root (none once it is off)."""
        root = str(self.root)
        with open("/proc/self/mountinfo") as f:
            return [line for line in f if f" {root}" in line]

    def _check_alive(self) -> None:
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    # ---- commands inside ---------------------------------------------------------------

    def run(self, *argv: str, input: str | None = None, check: bool = True,
            timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", *argv], input=input, capture_output=True,
            text=True, timeout=timeout_s,
            env={"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since_epoch_s: int = 0) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit,
                        f"--since=@{since_epoch_s}").stdout

    def epoch_s(self) -> int:
        return int(self.run("date", "+%s").stdout)


def _find_init(nspawn_pid: int) -> int:
    """The container's systemd: the descendant of nspawn in another pid namespace running
    systemd (nspawn's own child first runs nspawn code, then execs systemd)."""
    own_ns = os.readlink("/proc/self/ns/pid")
    pending = [nspawn_pid]
    while pending:
        pid = pending.pop()
        try:
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                pending.append(int(child))
            if pid != nspawn_pid and os.readlink(f"/proc/{pid}/ns/pid") != own_ns \
                    and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return pid
        except (FileNotFoundError, ProcessLookupError):
            continue
    return 0


def _own_cgroups(name: str) -> list[Path]:
    """A fresh cgroup per hierarchy that names processes (cgroup v2, or v1's name=systemd)
    for nspawn: --keep-unit makes it nest its payload/ and supervisor/ groups under its own,
    which would otherwise be whatever group the test runs in."""
    groups = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = Path("/sys/fs/cgroup/unified")
            mount = mount if mount.is_dir() else Path("/sys/fs/cgroup")
        elif controllers == "name=systemd":
            mount = Path("/sys/fs/cgroup/systemd")
        else:
            continue
        group = mount / path.lstrip("/") / f"ingest-test-{name}"
        if (group.parent / "cgroup.procs").exists():
            groups.append(group)
    return groups


def _enter_cgroups(groups: list[Path]) -> None:
    for group in groups:
        try:
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text("0")
        except OSError:
            pass  # nspawn still runs, only without its own group


def _remove_cgroup_tree(group: Path) -> None:
    if not group.is_dir():
        return
    for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        group.rmdir()
    except OSError:
        pass
