"""The Prefect flows run for real, on a temporary Prefect server."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration  # a temporary Prefect server


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_main_flow_end_to_end(harness, data_dir):
    from microstructure.flows.pipeline import build_features_flow, main_flow, poll_flow

    from microstructure.lake.paths import LakePaths
    from microstructure.lake.views import connect

    s = main_flow(str(data_dir), cycles=20, interval=0, step=2.0, symbols=5, seed=1)
    assert s["poll"]["cycles"] == 20 and s["poll"]["written"] > 50
    assert all(b["published"] for b in s["builds"])
    assert len(s["online_sample"]) == 5
    # The session poller continues the saved simulated book; then the build flow republishes.
    p = poll_flow(str(data_dir), cycles=3, interval=0.01, step=0.01, symbols=5, session=False)
    assert p["cycles"] == 3
    res = build_features_flow(str(data_dir))
    assert all(r["published"] for r in res)
    con = connect(LakePaths(data_dir))
    n, d = con.sql("SELECT count(*), count(DISTINCT (symbol, event_ts)) FROM features").fetchall()[0]
    assert n == d > 50


def test_session_flow_exits_at_once_without_a_session(harness, tmp_path):
    """The scheduled poller asks the exchange calendar: on a holiday, a weekend or after the close it returns
    at once with the reason in its log; never polls past the close."""
    from microstructure.flows.pipeline import poll_flow

    from microstructure.contract.calendar import poll_window

    window = poll_window()
    if not isinstance(window, str):
        pytest.skip("the exchange trades later today: the session flow would poll until the close")
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    state = poll_flow(str(tmp_path / "d"), symbols=3, return_state=True)
    assert state.result() == {"polled": False, "reason": window}

    async def logs() -> list[str]:
        async with get_client() as c:
            got = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            return [r.message for r in got]

    import time

    deadline = time.time() + 20
    while f"nothing to poll: {window}" not in (got := asyncio.run(logs())) and time.time() < deadline:
        time.sleep(0.5)
    assert f"nothing to poll: {window}" in got  # in the flow run's own log (sent to the API in batches)
    assert not (tmp_path / "d" / "lake").exists()


def test_vendor_poll_flow_keeps_keys_out_of_prefect(harness, env, tmp_path):
    """Poll the fallback chain through Prefect; no key in the flow's parameters, results, states or logs."""
    from microstructure.flows.pipeline import poll_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import LogSort, TaskRunSort

    from tests.vendor_server import (
        ALPACA_STOCKS,
        POLY_STOCKS,
        SECRET_ID,
        SECRET_KEY,
        SECRET_POLY,
        alpaca_quotes,
        poly_quote,
        poly_snapshot,
    )

    env.expect_request(POLY_STOCKS).respond_with_json(poly_snapshot(poly_quote("AAPL", 189.5, 189.52)))
    env.expect_request(ALPACA_STOCKS).respond_with_json(alpaca_quotes({"MSFT": (410.0, 1, 410.05, 4)}))
    d = tmp_path / "data"
    state = poll_flow(str(d), cycles=2, interval=0, step=1.0, source="polygon", symbol_list=["AAPL"], session=False,
                      return_state=True)
    stats = state.result()
    assert stats["served_by"] == {"polygon_stocks": 2}
    texts = [repr(stats)]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        texts += [repr(run.parameters), repr(run.state)]
        # This prefect's sync client sends sort=None, which its server rejects: pass the sorts explicitly.
        texts += [repr(t.state) + repr(t.task_inputs)
                  for t in client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)]
        texts += [log.message for log in client.read_logs(limit=200, offset=0, sort=LogSort.TIMESTAMP_ASC)]
    texts += [f.read_bytes().decode("latin-1") for f in d.rglob("*") if f.is_file()]
    for secret in (SECRET_POLY, SECRET_ID, SECRET_KEY):
        assert not any(secret in t for t in texts)
