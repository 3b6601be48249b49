"""Shared fixtures.

``appliance``: a real `ingest serve --workers 2` on free loopback ports with its own data
directory, ready (every worker up) when the test starts, stopped with SIGTERM afterwards;
the test fails if the appliance does not then exit 0 (a clean drain).
"""

from __future__ import annotations

import signal

import pytest

from tests.support import FAST_HEARTBEATS, Appliance


@pytest.fixture
def appliance(tmp_path):
    """The running appliance: .bootstrap, .data_dir, .process, .metrics_port and the
    helpers of tests.support.Appliance."""
    app = Appliance(tmp_path / "data", workers=2, config_text=FAST_HEARTBEATS)
    try:
        app.start()
    except BaseException:  # not ready: stop what did start, or it outlives the test run
        app.kill()
        raise
    yield app
    exit_code = app.stop(signal.SIGTERM)
    assert exit_code == 0, f"ingest serve exited with {exit_code} on SIGTERM:\n{app.log()[-4000:]}"
