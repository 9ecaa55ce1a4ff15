"""The Prefect flows run for real, on a temporary Prefect server."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_main_flow_end_to_end(harness, data_dir):
    from flows.pipeline import build_features_flow, main_flow, poll_flow
    from microstructure import lake

    s = main_flow(str(data_dir), cycles=20, interval=0, step=2.0, symbols=5, seed=1)
    assert s["poll"]["cycles"] == 20 and s["poll"]["written"] > 50
    assert all(b["published"] for b in s["builds"])
    assert len(s["online_sample"]) == 5
    # The session poller continues the saved simulated book; then the build flow republishes.
    p = poll_flow(str(data_dir), cycles=3, interval=0.01, step=0.01, symbols=5)
    assert p["cycles"] == 3
    res = build_features_flow(str(data_dir))
    assert all(r["published"] for r in res)
    con = lake.connect(lake.LakePaths(data_dir))
    n, d = con.sql("SELECT count(*), count(DISTINCT (symbol, event_ts)) FROM features").fetchall()[0]
    assert n == d > 50
