"""Replication over a link that can be cut and delayed: the follower appliance runs in its
own network namespace, joined to the leader's by a veth pair (cut: link down; delay:
tc netem, where the kernel has it).

Needs root (network namespaces) and iproute2 (`ip`, `tc`: tests/install-deps.sh,
run by `make test-deps`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import urllib.request

import pytest

from ingest.net import wire
from ingest.net.errors import ErrorCode
from tests.support import Appliance, create_topic, eventually, metric_value
from tests.test_replication import PARTITIONS, REPLICA_LAG_MAX_MS, TOPIC, _batch, _in_sync, _produce

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
                                reason="network namespaces need root and iproute2 (sh tests/install-deps.sh)")

LEADER_IP, FOLLOWER_IP = "10.231.7.1", "10.231.7.2"
LINK_DELAY_MS = 40


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class NamespacedAppliance(Appliance):
    """An appliance started inside network namespace `netns`, reached at `host`."""

    def __init__(self, data_dir, netns: str, host: str, **kwargs) -> None:
        super().__init__(data_dir, **kwargs)
        self.netns, self.host = netns, host
        self.bootstrap = f"tcp://{host}:{self.port}"

    def start(self, wait: bool = True) -> "Appliance":
        real_popen = subprocess.Popen

        def in_netns(argv, *args, **kwargs):
            return real_popen(["ip", "netns", "exec", self.netns, *argv], *args, **kwargs)

        subprocess.Popen = in_netns
        try:
            return super().start(wait)
        finally:
            subprocess.Popen = real_popen

    def worker_endpoints(self, worker_id: int) -> tuple[str, str]:
        return (f"tcp://{self.host}:{self.port + 1 + 2 * worker_id}", f"tcp://{self.host}:{self.port + 2 + 2 * worker_id}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


def _config(peer_bootstrap: str, role: str, advertised: str) -> str:
    return f"""
[server]
bind = "0.0.0.0"
advertised_host = "{advertised}"
metrics_bind = "0.0.0.0"
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000

[replication]
role = "{role}"
peers = ["{peer_bootstrap}"]
min_insync_replicas = 2
replica_lag_max_ms = {REPLICA_LAG_MAX_MS}
peer_check_interval_ms = 200
fetch_max_wait_ms = 200
"""


@pytest.fixture
def link(tmp_path):
    """(leader in this namespace, follower in its own, the leader's end of the veth)."""
    suffix = secrets.token_hex(3)
    netns, here, there = f"ingest-{suffix}", f"ing{suffix}a", f"ing{suffix}b"
    _sh("ip", "netns", "add", netns)
    apps: list[Appliance] = []
    try:
        _sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _sh("ip", "link", "set", there, "netns", netns)
        _sh("ip", "addr", "add", f"{LEADER_IP}/30", "dev", here)
        _sh("ip", "link", "set", here, "up")
        _sh("ip", "netns", "exec", netns, "ip", "addr", "add", f"{FOLLOWER_IP}/30", "dev", there)
        _sh("ip", "netns", "exec", netns, "ip", "link", "set", there, "up")
        _sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        leader = Appliance(tmp_path / "a", workers=2)
        follower = NamespacedAppliance(tmp_path / "b", netns, FOLLOWER_IP, workers=2)
        leader.config_text = _config(follower.bootstrap, "leader", LEADER_IP)
        follower.config_text = _config(f"tcp://{LEADER_IP}:{leader.port}", "follower", FOLLOWER_IP)
        apps += [leader, follower]
        yield leader, follower, here
    finally:
        for app in apps:
            if app.process is not None:
                app.kill()
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _acks_all_ms(leader, partition: int, value: bytes) -> float:
    started = time.monotonic()
    reply = _produce(leader, partition, _batch([value]), wire.Durability.ALL, timeout_ms=30_000)
    assert isinstance(reply, wire.ProduceReply), reply
    return (time.monotonic() - started) * 1000


def _start_in_sync(leader, follower) -> None:
    leader.start(wait=False)
    follower.start(wait=False)
    leader.wait_ready()
    follower.wait_ready()
    create_topic(leader, TOPIC, PARTITIONS)
    assert eventually(lambda: _in_sync(leader, 2), timeout_s=30), leader.metrics_text()


def _netem_available(veth: str) -> bool:
    ok = subprocess.run(["tc", "qdisc", "add", "dev", veth, "root", "netem", "delay", "0ms"],
                        capture_output=True).returncode == 0
    subprocess.run(["tc", "qdisc", "del", "dev", veth, "root"], capture_output=True)
    return ok


def test_acks_all_waits_for_the_follower_over_a_delayed_link(link):
    leader, follower, veth = link
    if not _netem_available(veth):
        pytest.skip("this kernel has no sch_netem (tc qdisc ... netem)")
    _start_in_sync(leader, follower)
    _sh("tc", "qdisc", "add", "dev", veth, "root", "netem", "delay", f"{LINK_DELAY_MS}ms")
    # Each acks=all reply waits for a follower fetch that crosses the link.
    assert min(_acks_all_ms(leader, 0, b"delayed-%d" % i) for i in range(5)) >= LINK_DELAY_MS
    assert _in_sync(leader, 2)


def test_a_cut_link_shrinks_the_in_sync_set_and_acks_all_fails_then_the_follower_rejoins(link):
    leader, follower, veth = link
    _start_in_sync(leader, follower)
    assert _acks_all_ms(leader, 0, b"before-the-cut") < 10_000

    # Cut: the leader's end of the link goes down, nothing gets through (no reset either).
    # acks=all neither hangs nor lies.
    _sh("ip", "link", "set", veth, "down")
    started = time.monotonic()
    reply = _produce(leader, 1, _batch([b"during-the-cut"]), wire.Durability.ALL, timeout_ms=30_000)
    assert isinstance(reply, wire.ErrorReply) and reply.error_code == ErrorCode.NOT_ENOUGH_REPLICAS, reply
    assert time.monotonic() - started < REPLICA_LAG_MAX_MS / 1000 + 5
    assert eventually(lambda: _in_sync(leader, 1), timeout_s=5)
    text = leader.metrics_text()
    assert metric_value(text, "ingest_under_replicated_partitions") == PARTITIONS

    # Healed: the follower catches up and rejoins; acks=all works again.
    _sh("ip", "link", "set", veth, "up")
    assert eventually(lambda: _in_sync(leader, 2), timeout_s=30)
    assert _acks_all_ms(leader, 1, b"after-the-cut") < 10_000
    end = [_produce(leader, p, _batch([b"end"]), wire.Durability.ALL).last_offset + 1 for p in range(PARTITIONS)]
    assert eventually(lambda: all(metric_value(follower.metrics_text(), "ingest_log_end_offset", topic=TOPIC,
                                               partition=str(p)) == end[p] for p in range(PARTITIONS)), timeout_s=10)
