"""Fault tests: the `ledger` fixture each scenario writes its numbers to, soak-mode time
limits, and the results file (plus, in soak mode, docs/RELIABILITY.md) at session end."""

from __future__ import annotations

import time

import pytest

from tests.faults import report
from tests.faults.harness import LEDGER, MODE, SOAK

# pytest-timeout's limit per test in soak mode: the longest soak scenario (200 rounds of
# kill -9 and recovery) takes well under an hour on 2 cores.
SOAK_TEST_TIMEOUT_S = 3 * 3600


def pytest_collection_modifyitems(config, items):
    if not SOAK:
        return
    for item in items:
        if item.nodeid.startswith("tests/faults/"):
            item.add_marker(pytest.mark.timeout(SOAK_TEST_TIMEOUT_S))


# The appliance code under test when the session starts; if it changed by the end (a
# long soak in a busy tree), the results say start..end.
SESSION_COMMIT = report.source_commit()


@pytest.fixture
def ledger(request):
    """ledger(scenario, promise) -> the Row this test fills in (rounds, acked, lost, ...)."""
    started = time.monotonic()
    rows = []

    def open_row(scenario: str, promise: str):
        row = LEDGER.open(request.node.nodeid, scenario, promise)
        rows.append(row)
        return row

    yield open_row
    for row in rows:
        row.seconds = round(time.monotonic() - started, 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    row = LEDGER.rows.get(item.nodeid)
    if row is None:
        return
    if rep.when == "call" or (rep.when == "setup" and rep.failed):
        row.outcome = rep.outcome
    elif rep.when == "teardown" and rep.failed:
        row.outcome = "failed"


def pytest_sessionfinish(session, exitstatus):
    rows = list(LEDGER.rows.values())
    if not rows:
        return
    at_end = report.source_commit()
    commit = SESSION_COMMIT if at_end == SESSION_COMMIT else f"{SESSION_COMMIT}..{at_end}"
    report.merge_results(MODE, rows, commit)
    if SOAK:
        report.write_doc()
