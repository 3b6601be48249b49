#!/bin/sh
# iproute2 (`ip`, `tc`) for tests/test_replication_netns.py: network namespaces joined by a
# veth pair, cut with `ip link set down`, delayed with `tc qdisc ... netem`.
# Idempotent: does nothing when both are on PATH.
set -eu

if command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "replication-deps: iproute2 missing; run as root: sh tests/replication-deps.sh" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache policy iproute2 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -q
fi
apt-get install -y -q --no-install-recommends iproute2
