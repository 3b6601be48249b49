# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test bench clean check

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

# pytest exits 5 when it collected no test: treat that as a failure, not a pass.
test: $(TEST_STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: $(TEST_STAMP)
	$(PY) -m bench.run

check: $(STAMP)
	$(VENV)/bin/ingest check ./data

clean:
	rm -rf $(VENV) build *.egg-info
