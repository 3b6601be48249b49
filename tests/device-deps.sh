#!/bin/sh
# Debian packages for the device side's tests: a C compiler, make, pkg-config and libzmq's
# headers for tests/test_device.py (examples/c), the mosquitto broker for
# tests/test_mqtt_bridge.py. Idempotent: installs only what is missing; runs
# `apt-get update` only when apt knows no installable candidate yet (fresh machine).
# mosquitto's own service is never started here: the tests run their own broker on a free
# loopback port with a temporary persistence directory.
set -eu

missing=""
command -v cc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
command -v make >/dev/null 2>&1 || missing="$missing make"
command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
[ -e /usr/include/zmq.h ] || missing="$missing libzmq3-dev"
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "device-deps: missing$missing; run as root: sh tests/device-deps.sh" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache policy libzmq3-dev mosquitto 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -q
fi
# invoke-rc.d asks policy-rc.d whether to start mosquitto's service: 101 means "no". Only
# add one (and remove it afterwards) if the machine has none.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    trap 'rm -f "$POLICY"' EXIT INT TERM
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
fi
# shellcheck disable=SC2086 # word splitting of the package list is wanted
apt-get install -y -q --no-install-recommends $missing
