"""Replication over a link that can be cut and delayed. Three network namespaces: the
leader in this one, a middle one, the follower in its own, joined by two veth pairs.
Nothing is routed through the middle: it runs two TCP relays (tests/delay_relay.py),
one on the address the leader advertises, which delays every byte in each direction,
so every connection the follower opens to the leader (bootstrap, fetches) crosses the
delay, and one undelayed on the follower's address as seen from this namespace (the
leader's peer checks, the follower's metrics). Relays rather than tc netem: they run on
kernels without sch_netem. Cut: the leader's end of the first veth goes down.

Needs root (network namespaces) and iproute2 (`ip`: tests/install-deps.sh, run by
`make test-deps`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from ingest.net import wire
from ingest.net.errors import ErrorCode
from tests.support import Appliance, create_topic, eventually, metric_value
from tests.test_replication import PARTITIONS, REPLICA_LAG_MAX_MS, TOPIC, _batch, _in_sync, _produce

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="network namespaces need root and iproute2 (sh tests/install-deps.sh)")

# The middle namespace's two addresses are the relays: FOLLOWER_FACE_IP leads to the
# follower, RELAY_IP to the leader (delayed).
LEADER_IP, FOLLOWER_FACE_IP = "10.231.7.1", "10.231.7.2"
RELAY_IP, FOLLOWER_IP = "10.231.8.1", "10.231.8.2"
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


def _start_relay(netns: str, listen: str, connect: str, ports: list[int], delay_ms: int) -> subprocess.Popen:
    relay = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.delay_relay",
                              "--listen", listen, "--connect", connect, "--ports", ",".join(map(str, ports)),
                              "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, text=True)
    assert relay.stdout.readline().strip() == "ready", "the relay did not start"
    return relay


def _veth(netns_a: str | None, dev_a: str, ip_a: str, netns_b: str, dev_b: str, ip_b: str) -> None:
    """A veth pair from dev_a (in netns_a; None: this namespace) to dev_b in netns_b, one /30."""
    _sh("ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
    for netns, dev, ip in ((netns_a, dev_a, ip_a), (netns_b, dev_b, ip_b)):
        in_netns: tuple[str, ...] = ()
        if netns is not None:
            _sh("ip", "link", "set", dev, "netns", netns)
            in_netns = ("ip", "netns", "exec", netns)
        _sh(*in_netns, "ip", "addr", "add", f"{ip}/30", "dev", dev)
        _sh(*in_netns, "ip", "link", "set", dev, "up")


def _ports(app: Appliance) -> list[int]:
    """The bootstrap port and every worker's two ports."""
    return [app.port + i for i in range(1 + 2 * app.workers)]


@pytest.fixture
def link(tmp_path, request):
    """(leader in this namespace, follower in its own, the leader's end of the first veth).

    Indirect parameter: the one-way delay in ms between follower and leader (default 0)."""
    delay_ms = getattr(request, "param", 0)
    suffix = secrets.token_hex(3)
    middle, far = f"ingest-{suffix}m", f"ingest-{suffix}f"
    here, middle_a, middle_b, there = (f"ing{suffix}{end}" for end in "abcd")
    apps: list[Appliance] = []
    relays: list[subprocess.Popen] = []
    try:
        for netns in (middle, far):
            _sh("ip", "netns", "add", netns)
            _sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        _veth(None, here, LEADER_IP, middle, middle_a, FOLLOWER_FACE_IP)
        _veth(middle, middle_b, RELAY_IP, far, there, FOLLOWER_IP)
        leader = Appliance(tmp_path / "a", workers=2)
        follower = NamespacedAppliance(tmp_path / "b", far, FOLLOWER_FACE_IP, workers=2)
        leader.config_text = _config(follower.bootstrap, "leader", RELAY_IP)
        follower.config_text = _config(f"tcp://{RELAY_IP}:{leader.port}", "follower", FOLLOWER_FACE_IP)
        apps += [leader, follower]
        relays.append(_start_relay(middle, RELAY_IP, LEADER_IP, _ports(leader), delay_ms))
        relays.append(_start_relay(middle, FOLLOWER_FACE_IP, FOLLOWER_IP,
                                   _ports(follower) + [follower.metrics_port], 0))
        yield leader, follower, here
    finally:
        for app in apps:
            if app.process is not None:
                app.kill()
        for relay in relays:
            relay.kill()
            relay.wait(timeout=10)
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        for netns in (middle, far):
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


@pytest.mark.parametrize("link", [LINK_DELAY_MS], indirect=True)
def test_acks_all_waits_for_the_follower_over_a_delayed_link(link):
    leader, follower, _ = link
    _start_in_sync(leader, follower)
    # Each acks=all reply waits for a follower fetch that crosses the delayed link.
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
