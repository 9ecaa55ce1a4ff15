"""A running poll flow shows its progress in Prefect (artifacts updated while it polls), and its run log carries
the run's warnings but no library's deprecation notices. A real Prefect server (``prefect_test_harness``); the
artifacts and logs are read back through the Prefect client, as the UI reads them."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # a temporary Prefect server and live polls of a few seconds


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _latest(key: str, flow_run_id=None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    f = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
    if flow_run_id is not None:
        f.flow_run_id = ArtifactFilterFlowRunId(any_=[flow_run_id])
    with get_client(sync_client=True) as c:
        got = c.read_artifacts(artifact_filter=f, sort=ArtifactSort.CREATED_DESC, limit=5)
    return got


def _run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as c:
        return [r.message for r in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                               limit=200, offset=0, sort=LogSort.TIMESTAMP_ASC)]


def _wait_for_logs(flow_run_id, enough, timeout_s: float = 20.0) -> list[str]:
    """The run's logs reach the API in batches after the run: wait until ``enough(logs)`` or the timeout."""
    deadline = time.time() + timeout_s
    while not enough(got := _run_logs(flow_run_id)) and time.time() < deadline:
        time.sleep(0.5)
    return got


def test_progress_and_health_artifacts_update_while_the_poll_runs(harness, data_dir):
    """A live poll of 10 cycles, 0.4 s apart: a reader polling the API sees the progress artifact rise and the health
    table's cycle count grow before the run ends; both end complete."""
    from microstructure.flows.pipeline import poll_flow

    seen: list[tuple[float, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            prog, health = _latest("poll-progress"), _latest("poll-health")
            if prog and health:
                rows = json.loads(health[0].data) if isinstance(health[0].data, str) else health[0].data
                cycles = next(r["value"] for r in rows if r["measure"] == "cycles")
                seen.append((float(prog[0].data), int(cycles)))
            time.sleep(0.1)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        state = poll_flow(str(data_dir), cycles=10, interval=0.4, symbols=3, seed=2, session=False,
                          return_state=True)
    finally:
        done.set()
        reader.join(timeout=10)
    stats = state.result()
    assert stats["cycles"] == 10
    during = [p for p, _ in seen if p < 100.0]
    assert len(set(during)) >= 2, seen  # seen rising mid-run, not only written at the end
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert [c for _, c in seen] == sorted(c for _, c in seen) and len({c for _, c in seen}) >= 2
    run_id = state.state_details.flow_run_id
    prog, health = _latest("poll-progress", run_id), _latest("poll-health", run_id)
    assert len(prog) == 1 and len(health) == 1  # updated in place: one of each a session, not one per update
    assert float(prog[0].data) == 100.0
    rows = {r["measure"]: r["value"] for r in json.loads(health[0].data)}
    assert rows["cycles"] == 10 and rows["snapshots written"] == stats["written"] > 0
    assert rows["quarantined"] == 0
    assert rows["latest cycle, simulated: L2 / shallow / L1 only / none"] == "3 / 0 / 0 / 0"
    assert rows["online books age, newest / oldest (s)"] != "-"


def test_run_logs_carry_no_library_deprecation_warnings(harness, data_dir):
    """The main flow (poll, build, GE checks, Feast publish) in a fresh process, as a worker runs it: Feast and GE are
    first imported inside the run, so their import-time notices fire there, where ``run_warnings`` would log them.
    The run log, read from the API, has no DeprecationWarning/FutureWarning text."""
    import os
    import subprocess
    import sys
    from uuid import UUID

    from prefect.settings import PREFECT_API_URL

    script = ("import sys\n"
              "from microstructure.flows.pipeline import main_flow\n"
              "s = main_flow(sys.argv[1], cycles=5, interval=0, step=2.0, symbols=3, seed=1, return_state=True)\n"
              "assert s.result()['poll']['cycles'] == 5\n"
              "print(s.state_details.flow_run_id)\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONWARNINGS": "default"}
    got = subprocess.run([sys.executable, "-c", script, str(data_dir)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    run_id = UUID(got.stdout.strip().splitlines()[-1])
    logs = _wait_for_logs(run_id, lambda got: any("Finished in state Completed" in m for m in got))
    assert any("Finished in state Completed" in m for m in logs)  # the whole run's log is there
    noise = [m for m in logs if "DeprecationWarning" in m or "FutureWarning" in m]
    assert noise == []


def test_a_warning_raised_in_a_flow_reaches_its_run_log_but_a_library_notice_does_not(harness):
    """The other half of the test above: a warning does reach the run log (so "no warning text" means none was
    raised), scrubbed; a deprecation notice attributed to a listed library (feast) does not; the same category from
    a module not listed (ours) does."""
    from microstructure.flows.pipeline import run_warnings
    from prefect import flow

    secret = "sk-live-0123456789abcdef"

    @flow(name="warns")
    def warns() -> None:
        with run_warnings():
            warnings.warn(f"a warning of ours, apiKey={secret}", UserWarning, stacklevel=1)
            warnings.warn_explicit("feast's own notice", DeprecationWarning, "feast/repo_config.py", 1,
                                   module="feast.repo_config")
            warnings.warn_explicit("our deprecated call", DeprecationWarning, "microstructure/x.py", 1,
                                   module="microstructure.x")

    state = warns(return_state=True)
    logs = _wait_for_logs(state.state_details.flow_run_id,
                          lambda got: sum("Warning: " in m for m in got) >= 2)
    text = "\n".join(logs)
    assert "UserWarning: a warning of ours, apiKey=***" in text
    assert secret not in text
    assert "DeprecationWarning: our deprecated call" in text
    assert "DeprecationWarning: feast's own notice" not in text
    # Scoped to the run: the process's filters are as they were.
    assert not any(f[2] is DeprecationWarning and str(getattr(f[3], "pattern", f[3])).startswith("feast")
                   for f in warnings.filters)


def test_our_warning_from_a_checkout_under_a_folder_named_prefect_still_reaches_the_run_log(harness):
    """A worker built on Prefect's image runs our code from /opt/prefect/...: a folder named like a listed library
    is not that library; only notices from where the library is installed are left out."""
    import feast
    from microstructure.flows.pipeline import run_warnings
    from prefect import flow

    feast_file = str(Path(feast.__file__).parent / "repo_config.py")

    @flow(name="warns-from-opt-prefect")
    def warns() -> None:
        with run_warnings():
            warnings.warn_explicit("our deprecated call under opt", DeprecationWarning,
                                   "/opt/prefect/microstructure/jobs/x.py", 7, module="microstructure.jobs.x")
            warnings.warn_explicit("a feast notice under its own name", DeprecationWarning, feast_file, 7,
                                   module="notfeast")

    state = warns(return_state=True)
    logs = _wait_for_logs(state.state_details.flow_run_id, lambda got: any("under opt" in m for m in got))
    text = "\n".join(logs)
    assert "DeprecationWarning: our deprecated call under opt" in text
    assert "a feast notice under its own name" not in text


def test_a_flow_leaves_logging_capture_of_warnings_as_it_found_it(harness):
    """run_warnings turns logging.captureWarnings on for the run; left on, logging takes a later
    captureWarnings(True) (an application's, GE's) for a no-op and that caller's warnings never reach py.warnings."""
    import logging

    from microstructure.flows.pipeline import run_warnings
    from prefect import flow

    logging.captureWarnings(False)  # the state of a process that never asked for it

    @flow(name="quiet")
    def quiet() -> None:
        with run_warnings():
            pass

    assert quiet(return_state=True).is_completed()
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    keep = Keep()
    logging.getLogger("py.warnings").addHandler(keep)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(True)
            try:
                warnings.warn("after the flow, to py.warnings", UserWarning, stacklevel=1)
            finally:
                logging.captureWarnings(False)
    finally:
        logging.getLogger("py.warnings").removeHandler(keep)
    assert any("after the flow, to py.warnings" in r.getMessage() for r in got)


def test_an_api_hiccup_between_the_two_artifact_creations_still_gives_the_session_its_health_table(harness, server):
    """The Prefect API (behind a real HTTP proxy) refuses the first creation of the health table once, after the
    progress artifact was created: the next update creates it; it is not updated by an id it never got."""
    import re

    import httpx
    from microstructure.flows.pipeline import _LiveArtifacts
    from prefect import flow
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from werkzeug import Response

    from microstructure.jobs.poll import PollStats

    real = PREFECT_API_URL.value()
    origin = real[: real.index("/api")]
    refused: list[str] = []

    def forward(request):  # the proxy: one table creation refused, everything else passed on
        body = request.get_data()
        if (request.method == "POST" and request.path.rstrip("/").endswith("/artifacts") and not refused
                and json.loads(body or b"{}").get("type") == "table"):
            refused.append(request.path)
            return Response('{"detail": "hiccup"}', status=500, content_type="application/json")
        q = request.query_string.decode()
        r = httpx.request(request.method, origin + request.path + (f"?{q}" if q else ""), content=body,
                          headers={k: v for k, v in request.headers.items()
                                   if k.lower() not in ("host", "content-length", "transfer-encoding")})
        return Response(r.content, status=r.status_code, content_type=r.headers.get("content-type"))

    server.expect_request(re.compile("/api/.*")).respond_with_handler(forward)

    @flow(name="artifacts-through-a-flaky-api")
    def session() -> None:
        live = _LiveArtifacts(cycles=4, until=None)
        # The run's own client (its state, its logs) keeps the real API; the artifact calls get a client of the
        # proxy's, as a fresh client of a worker whose API flickers.
        token = SyncClientContext.__var__.set(None)  # type: ignore[arg-type]
        try:
            with temporary_settings({PREFECT_API_URL: server.url_for("/api")}), SyncClientContext():
                for i in range(4):
                    live.cycle(i, PollStats(cycles=i + 1, written=3 * (i + 1)))
                live.finish(PollStats(cycles=4, written=12))
        finally:
            SyncClientContext.__var__.reset(token)

    state = session(return_state=True)
    assert state.is_completed() and refused  # the attack happened
    health = _latest("poll-health", state.state_details.flow_run_id)
    assert len(health) == 1, health
    rows = {r["measure"]: r["value"] for r in json.loads(health[0].data)}
    assert rows["cycles"] == 4 and rows["snapshots written"] == 12
    assert float(_latest("poll-progress", state.state_details.flow_run_id)[0].data) == 100.0


def test_a_prefect_api_that_hangs_on_artifacts_never_holds_a_poll_cycle(harness, server):
    """The API (behind a real HTTP proxy) holds every artifact request until the test lets it go: the poll's cycles
    go on meanwhile (an update is written off the poll's thread, one at a time); once the API answers, the session
    ends with both artifacts complete."""
    import re
    import threading

    import httpx
    from microstructure.flows.pipeline import _LiveArtifacts
    from prefect import flow
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from werkzeug import Response

    from microstructure.jobs.poll import PollStats

    real = PREFECT_API_URL.value()
    origin = real[: real.index("/api")]
    reached, released = threading.Event(), threading.Event()
    held_too_long: list[str] = []

    def forward(request):  # the proxy: artifact requests wait for the test; everything else is passed on
        if "/artifacts" in request.path:
            reached.set()
            if not released.wait(15):
                held_too_long.append(request.path)
        q = request.query_string.decode()
        r = httpx.request(request.method, origin + request.path + (f"?{q}" if q else ""), content=request.get_data(),
                          headers={k: v for k, v in request.headers.items()
                                   if k.lower() not in ("host", "content-length", "transfer-encoding")})
        return Response(r.content, status=r.status_code, content_type=r.headers.get("content-type"))

    server.expect_request(re.compile("/api/.*")).respond_with_handler(forward)
    cycles_done_while_held: list[int] = []

    @flow(name="artifacts-through-a-hanging-api")
    def session() -> None:
        live = _LiveArtifacts(cycles=4, until=None)
        token = SyncClientContext.__var__.set(None)  # type: ignore[arg-type]
        try:
            with temporary_settings({PREFECT_API_URL: server.url_for("/api")}), SyncClientContext():
                for i in range(4):
                    live.cycle(i, PollStats(cycles=i + 1, written=3 * (i + 1)))
                    if not released.is_set() and not held_too_long:
                        cycles_done_while_held.append(i + 1)
                assert reached.wait(15)  # the attack happened: an artifact request is held
                released.set()
                live.finish(PollStats(cycles=4, written=12))
        finally:
            released.set()
            SyncClientContext.__var__.reset(token)

    state = session(return_state=True)
    assert state.is_completed()
    assert cycles_done_while_held == [1, 2, 3, 4] and held_too_long == []
    health = _latest("poll-health", state.state_details.flow_run_id)
    assert len(health) == 1
    assert {r["measure"]: r["value"] for r in json.loads(health[0].data)}["cycles"] == 4
    assert float(_latest("poll-progress", state.state_details.flow_run_id)[0].data) == 100.0


def test_a_typo_in_the_workers_log_format_fails_the_session_flow_before_it_waits_for_the_open(harness, data_dir,
                                                                                               monkeypatch):
    """MICROSTRUCTURE_LOG_FORMAT=xml on the worker: the session run fails at once with the format's error, on any
    day (not at the open hours later, nor silently on a holiday). The timeout only stops a run that waits."""
    from microstructure.flows.pipeline import poll_flow

    monkeypatch.setenv("MICROSTRUCTURE_LOG_FORMAT", "xml")
    state = poll_flow.with_options(retries=0, timeout_seconds=20)(str(data_dir), symbols=2, session=True,
                                                                  return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="text or json"):
        state.result()
