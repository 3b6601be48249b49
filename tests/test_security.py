"""CURVE: only clients whose public key is in the allow-list get answers, the list reloads
without a restart, and everything (forwarding included) keeps working encrypted."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import zmq
from kafka.partitioner.default import murmur2 as kafka_murmur2

from ingest import Consumer, Producer
from ingest.net import wire
from ingest.net.client import BootstrapClient, UnreachableError
from ingest.security import ClientCurve
from tests.support import Appliance, eventually

RELOAD_MS = 200


def generate(directory, name):
    result = subprocess.run([sys.executable, "-m", "ingest.cli", "keys", "generate", str(directory), "--name", name],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return directory / f"{name}.key", directory / f"{name}.key_secret"


@pytest.fixture
def secured(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "authorized"
    allowed.mkdir()
    server_public, server_secret = generate(keys, "appliance")
    alice_public, alice_secret = generate(keys, "alice")
    bob_public, bob_secret = generate(keys, "bob")
    shutil.copy(alice_public, allowed)
    app = Appliance(tmp_path / "data", workers=2, config_text=f"""
[server]
heartbeat_interval_ms = 100
[security]
curve = true
server_secret_key_file = "{server_secret}"
authorized_keys_dir = "{allowed}"
reload_interval_ms = {RELOAD_MS}
""")
    app.curve = {name: ClientCurve.from_files(server_public, secret)
                 for name, secret in (("alice", alice_secret), ("bob", bob_secret))}
    app.allowed, app.bob_public, app.alice_public = allowed, bob_public, alice_public
    app.start(wait=False)
    with BootstrapClient(app.bootstrap, curve=app.curve["alice"]) as client:
        assert eventually(lambda: all(w["up"] for w in client.metadata()["workers"]), timeout_s=60)
    yield app
    app.kill()


def answers(app, curve) -> bool:
    try:
        with BootstrapClient(app.bootstrap, timeout_ms=1000, curve=curve) as client:
            return client.metadata()["curve"] is True
    except UnreachableError:
        return False


def test_only_authorized_keys_are_answered_and_the_list_reloads_live(secured):
    assert answers(secured, secured.curve["alice"])
    assert not answers(secured, secured.curve["bob"])
    assert not answers(secured, None)  # a plain client cannot even complete a handshake
    shutil.copy(secured.bob_public, secured.allowed)
    assert eventually(lambda: answers(secured, secured.curve["bob"]), timeout_s=5)
    (secured.allowed / secured.alice_public.name).unlink()
    assert eventually(lambda: not answers(secured, secured.curve["alice"]), timeout_s=5)


def test_sdk_round_trip_and_forwarding_work_encrypted(secured):
    curve = secured.curve["alice"]
    with Producer(secured.bootstrap, acks="fsync", curve=curve) as producer:
        futures = [producer.send("secret", b"v%d" % i, key=b"k%d" % i) for i in range(200)]
        producer.flush()
        assert all(f.result(10)[1] >= 0 for f in futures)
    with Consumer(secured.bootstrap, "secret", from_beginning=True, curve=curve) as consumer:
        values = sorted(r.value for r in consumer.records(idle_timeout_ms=1000))
    assert values == sorted(b"v%d" % i for i in range(200))

    # A device pushing to worker 0 only: keyed records for worker 1's partitions are forwarded
    # worker to worker, over CURVE too.
    with BootstrapClient(secured.bootstrap, curve=curve) as client:
        client.create_topic("pushed", 2)
    ctx = zmq.Context()
    curve.apply(ctx)
    push = ctx.socket(zmq.PUSH)
    push.connect(secured.worker_endpoints(0)[0])
    keys = [b"device-%d" % i for i in range(50)]
    for k in keys:
        push.send(wire.RecordMessage(topic="pushed", key=k, value=k).encode())
    push.close(linger=5000)
    ctx.term()
    got = {}
    with Consumer(secured.bootstrap, "pushed", from_beginning=True, curve=curve) as consumer:
        deadline = time.monotonic() + 20
        while len(got) < 50 and time.monotonic() < deadline:
            for r in consumer.records(idle_timeout_ms=500):
                got[r.value] = r.partition
    assert got == {k: (kafka_murmur2(k) & 0x7FFFFFFF) % 2 for k in keys}
