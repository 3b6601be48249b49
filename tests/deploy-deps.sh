#!/bin/sh
# Debian's `prometheus` package (prometheus + promtool) for tests/test_deploy.py.
# Idempotent: does nothing when both binaries are already on PATH; runs `apt-get update`
# only when apt knows no installable prometheus yet (a fresh machine with empty lists).
# The package's service is never started here: the tests run their own instance on
# loopback with their own ports and data directory.
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "deploy-deps: prometheus/promtool missing; run as root: sh tests/deploy-deps.sh" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -q
fi

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d whether to start a service: exit 101
# means "no". Only add one (and remove it afterwards) if the machine has none.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    trap 'rm -f "$POLICY"' EXIT INT TERM
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
fi
apt-get install -y -q --no-install-recommends prometheus
