"""Prefect the way Prefect users run it: a real server (not the ephemeral one), `prefect deploy --all` from
prefect.yaml, the scheduler filling the Upcoming runs, a process worker running a triggered poll to
Completed, and `python -m flows.serve` serving its deployments. Every step is the stock `prefect` CLI. The
deploy-schedule-worker test runs twice: on a SQLite-backed server and on one backed by the local PostgreSQL
(Prefect's production database)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

pytestmark = pytest.mark.integration  # a real Prefect server (SQLite and PostgreSQL), its CLI and a worker

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PG = os.environ.get("MICROSTRUCTURE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_database(name: str) -> str:
    """A fresh database on the local PostgreSQL (the production backend of a Prefect server)."""
    import asyncio

    import asyncpg

    async def create() -> None:
        con = await asyncpg.connect(PG)
        try:
            await con.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()

    asyncio.run(create())
    base = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    if request.param == "postgresql":
        db_url = _postgres_database(f"prefect_test_{port}")
    else:
        db_url = f"sqlite+aiosqlite:///{home}/prefect.db"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": db_url, "PREFECT_LOGGING_LEVEL": "INFO",
           "MICROSTRUCTURE_TEST_BACKEND": request.param}
    env.pop("PREFECT_TEST_MODE", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("prefect server did not start: " + (home / "server.log").read_text()[-2000:])
    yield env
    proc.terminate()
    proc.wait(30)
    log.close()
    if request.param == "postgresql":
        import asyncio

        import asyncpg

        async def drop() -> None:
            con = await asyncpg.connect(PG)
            try:
                await con.execute(f'DROP DATABASE IF EXISTS "prefect_test_{port}" WITH (FORCE)')
            finally:
                await con.close()

        asyncio.run(drop())


def prefect(env: dict, *args: str, cwd: Path = ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "prefect"), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                       env={**env, "COLUMNS": "250"})
    assert r.returncode == 0, f"prefect {' '.join(args)}: {r.stdout[-1500:]} {r.stderr[-1500:]}"
    return r


def api(env: dict, method: str, path: str, body: dict | None = None) -> object:
    import httpx

    r = httpx.request(method, env["PREFECT_API_URL"] + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_deploy_schedule_and_run_through_a_worker(server, tmp_path):
    env = server
    prefect(env, "work-pool", "create", "microstructure", "--type", "process")
    prefect(env, "deploy", "--all")
    listed = prefect(env, "deployment", "ls").stdout
    assert "us-session" in listed and "nightly-rebuild" in listed
    # The scheduler fills Upcoming with runs at 09:30 New York on weekdays.
    ny = ZoneInfo("America/New_York")
    deadline = time.time() + 60
    runs: list = []
    while time.time() < deadline and not runs:
        runs = [r for r in api(env, "POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {
            "any_": ["SCHEDULED"]}}}, "limit": 50}) if r["auto_scheduled"]]
        time.sleep(1)
    assert runs, "the scheduler created no runs"
    for r in runs:
        t = dt.datetime.fromisoformat(r["expected_start_time"]).astimezone(ny)
        assert t.weekday() < 5 and (t.hour, t.minute) in ((9, 30), (17, 30)), t
    prefect(env, "flow-run", "ls")  # exits 0: the CLI's list calls are accepted (no HTTP 422 on `limit: null`)
    # Trigger a short poll and let a worker run it from this checkout (the pull step's MICROSTRUCTURE_HOME).
    d = tmp_path / "data"
    params = {"data_dir": str(d), "session": False, "cycles": 3, "interval": 0.2, "symbols": 5}
    out = prefect(env, "deployment", "run", "poll-order-books/us-session", "--params", json.dumps(params)).stdout
    assert "Created flow run" in out
    wenv = {**env, "MICROSTRUCTURE_HOME": str(ROOT)}
    prefect(wenv, "worker", "start", "--pool", "microstructure", "--run-once", timeout=600)
    done = [r for r in api(env, "POST", "/flow_runs/filter", {"deployments": {"name": {"any_": ["us-session"]}},
                                                               "flow_runs": {"state": {"type": {"any_": [
                                                                   "COMPLETED", "FAILED", "CRASHED"]}}}})]
    assert [r["state_type"] for r in done] == ["COMPLETED"], done
    assert (d / "lake" / "snapshots").exists()
    arts = api(env, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["poll-session"]}}})
    assert arts and "Poll session" in arts[0]["data"]
    if env["MICROSTRUCTURE_TEST_BACKEND"] == "postgresql":  # the runs really live in PostgreSQL
        import asyncio

        import asyncpg

        async def completed() -> int:
            con = await asyncpg.connect(env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].replace("+asyncpg", ""))
            try:
                return await con.fetchval("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
            finally:
                await con.close()

        assert asyncio.run(completed()) == 1


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # serving does not depend on the backend: run once
def test_flows_serve_serves_both_deployments(server, tmp_path):
    env = server
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--data-dir", str(tmp_path / "d")], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        names: set[str] = set()
        while time.time() < deadline and not {"us-session-served", "nightly-rebuild-served"} <= names:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            names = {d["name"] for d in api(env, "POST", "/deployments/filter", {})}
            time.sleep(1)
        assert {"us-session-served", "nightly-rebuild-served"} <= names
    finally:
        proc.terminate()
        proc.wait(30)
