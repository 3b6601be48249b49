# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test soak bench bench-full clean check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/ingest serve --data-dir ./data

# pytest exits 5 when it collected no test, which make reports as a failure, as it must.
# Compiling every numba kernel once first keeps the cold compile out of the first test's
# start-up timeout (the tests start appliances whose workers load the cache).
test: $(TEST_STAMP) test-deps
	$(PY) -c 'from ingest.shards import intake, kernels; from ingest.streams import window_kernel; kernels.warm_up(); intake.warm_up(); window_kernel.warm_up()'
	$(PY) -m pytest tests -q -p no:cacheprovider

# The fault tests' long mode (docs/RELIABILITY.md): hundreds of rounds; regenerates the
# results table of docs/RELIABILITY.md.
soak: $(TEST_STAMP) test-deps
	INGEST_SOAK=1 $(PY) -m pytest tests/faults -q -p no:cacheprovider

# bench/run.py: the component benchmarks, then bench/compare.py against NATS JetStream,
# Redis Streams, Tansu and mosquitto (installed by bench/install-peers.sh; root for apt).
# Writes bench/results/<date>.json and PNGs, regenerates bench/RESULTS.md's comparison.
bench: $(TEST_STAMP)
	sh bench/install-peers.sh $(PY)
	$(PY) -m bench.run

bench-full: $(TEST_STAMP)
	sh bench/install-peers.sh $(PY)
	$(PY) -m bench.run --full

check: $(STAMP)
	$(VENV)/bin/ingest check ./data

clean:
	rm -rf $(VENV) build *.egg-info

# ---- make install: bare metal under systemd, as root (systemd/README.md) -----------------
# A venv in PREFIX with ingest and its dependencies, the unit in UNITDIR (paths rewritten to
# PREFIX and CONFDIR), the example config in CONFDIR unless one is already there.
# Offline: make install INSTALL_PIP_FLAGS="--no-index --find-links /path/to/wheels"
PREFIX ?= /opt/ingest
CONFDIR ?= /etc/ingest
UNITDIR ?= /etc/systemd/system
INSTALL_PIP_FLAGS ?=

.PHONY: install
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install --quiet --disable-pip-version-check $(INSTALL_PIP_FLAGS) .
	install -d -m 0755 $(UNITDIR) $(CONFDIR)
	sed -e 's|/opt/ingest|$(PREFIX)|g' -e 's|/etc/ingest|$(CONFDIR)|g' systemd/ingest.service > $(UNITDIR)/ingest.service.tmp
	chmod 0644 $(UNITDIR)/ingest.service.tmp
	mv $(UNITDIR)/ingest.service.tmp $(UNITDIR)/ingest.service
	test -e $(CONFDIR)/ingest.toml || sed -e 's|/etc/ingest|$(CONFDIR)|g' systemd/ingest.toml > $(CONFDIR)/ingest.toml
	chmod 0644 $(CONFDIR)/ingest.toml
	# CURVE keys (the example config turns CURVE on): the appliance's pair, handed to the
	# service as a credential, and a pair for the local operator's CLI, authorized.
	install -d -m 0755 $(CONFDIR)/keys $(CONFDIR)/keys/authorized
	test -e $(CONFDIR)/keys/appliance.key_secret || $(PREFIX)/bin/ingest keys generate $(CONFDIR)/keys --name appliance
	test -e $(CONFDIR)/keys/local.key_secret || $(PREFIX)/bin/ingest keys generate $(CONFDIR)/keys --name local
	test -e $(CONFDIR)/keys/authorized/local.key || install -m 0644 $(CONFDIR)/keys/local.key $(CONFDIR)/keys/authorized/local.key
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: $(PREFIX) $(UNITDIR)/ingest.service $(CONFDIR)/ingest.toml"
	@echo "next: edit $(CONFDIR)/ingest.toml, then systemctl enable --now ingest"
	@echo "clients need $(CONFDIR)/keys/appliance.key and a key pair whose .key is in $(CONFDIR)/keys/authorized/"

# Debian packages the tests use (root; each script installs only what is missing):
# systemd, systemd-container and debootstrap for tests/test_systemd.py; the rest (prometheus,
# a C toolchain with libzmq3-dev, mosquitto, iproute2, kcat) is listed in tests/install-deps.sh.
.PHONY: test-deps
test-deps:
	sh tests/systemd/install-deps.sh
	sh tests/install-deps.sh
