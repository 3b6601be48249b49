#!/bin/sh
# Debian packages the test suite uses, installed only when missing (idempotent, one apt
# transaction; `apt-get update` only when apt knows no installable candidate yet, as on a
# fresh machine with empty lists):
#   prometheus (prometheus, promtool)      tests/test_deploy.py, promtool lint of metrics
#   gcc libc6-dev make pkg-config           tests/test_device.py builds examples/c
#   libzmq3-dev                             libzmq's headers for examples/c
#   mosquitto                               tests/test_mqtt_bridge.py's broker
#   iproute2 (ip)                           tests/test_replication_netns.py
#   kcat                                    tests/test_kafka_listener.py
# tests/systemd/install-deps.sh installs what the systemd test needs.
# Extra PROBE=PACKAGE arguments add to the list (bench/install-peers.sh uses them); a probe
# is a command looked up on PATH, or an absolute path that must exist.
# No package's own service is started: the tests run their own instances on loopback with
# their own ports and data directories.
# Usage: sh tests/install-deps.sh [PROBE=PACKAGE ...]   (root, when anything is missing)
set -eu

missing=""
need() {
    probe=$1
    shift
    case $probe in
        /*) [ -e "$probe" ] && return 0 ;;
        *) command -v "$probe" >/dev/null 2>&1 && return 0 ;;
    esac
    missing="$missing $*"
}

need prometheus prometheus
need promtool prometheus
need cc gcc libc6-dev
need make make
need pkg-config pkg-config
need /usr/include/zmq.h libzmq3-dev
need /usr/sbin/mosquitto mosquitto
need ip iproute2
need kcat kcat
for extra in "$@"; do
    need "${extra%%=*}" "${extra#*=}"
done
[ -z "$missing" ] && exit 0
missing=$(printf '%s\n' $missing | sort -u | tr '\n' ' ')

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing: $missing; run as root: sh tests/install-deps.sh" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
for package in $missing; do
    if ! apt-cache policy "$package" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -q
        break
    fi
done

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d whether to start a service: exit 101
# means "no". Only add one (and remove it afterwards) if the machine has none.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    trap 'rm -f "$POLICY"' EXIT INT TERM
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
fi
# shellcheck disable=SC2086 # word splitting of the package list is wanted
apt-get install -y -q --no-install-recommends $missing
