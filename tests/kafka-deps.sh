#!/bin/sh
# Debian's `kcat` for tests/test_kafka_listener.py (kcat -P/-C/-L against the appliance's
# Kafka listener). Idempotent: does nothing when kcat is already on PATH; runs
# `apt-get update` only when apt knows no installable kcat yet (empty package lists).
set -eu

if command -v kcat >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "kafka-deps: kcat missing; run as root: sh tests/kafka-deps.sh" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache policy kcat 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -q
fi
apt-get install -y -q --no-install-recommends kcat
