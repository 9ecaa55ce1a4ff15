"""Feast the way Feast users run it: from feature_repo/ with no variable set, the stock `feast` CLI lists the
views, `feast serve` answers with each book's age and stale flag, `feast ui` serves, and `feast materialize`
never moves the online store back in time. The checkout's layout is reproduced in a temporary folder
(feature_repo/ beside data/), so the test never touches the developer's own data dir."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

pytestmark = pytest.mark.integration  # the stock feast CLI, `feast serve` and `feast ui` in subprocesses

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "feature_repo", root / "feature_repo")
    r = subprocess.run([str(BIN / "microstructure"), "run", "--data-dir", str(root / "data"), "--cycles", "30",
                        "--symbols", "5", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # microstructure keeps its registry in the user's cache, never in a data dir (store.registry_dir); Feast's CLI
    # on the repo's own yaml gets one in the checkout's data/ the Feast way.
    feast(root / "feature_repo", "apply")
    return root


def feast_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MICROSTRUCTURE_DATA_DIR"}


def feast(repo: Path, *args: str) -> str:
    r = subprocess.run([str(BIN / "feast"), *args], capture_output=True, text=True, cwd=repo, env=feast_env(),
                       timeout=300)
    assert r.returncode == 0, f"feast {' '.join(args)}: {r.stdout[-1500:]} {r.stderr[-2000:]}"
    return r.stdout


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> httpx.Response:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            return httpx.get(url, timeout=2)
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail(f"{url} never answered")


def test_feast_cli_from_the_repo_with_no_variable(checkout):
    repo = checkout / "feature_repo"
    out = feast(repo, "feature-views", "list")
    assert "order_book" in out and "freshness" in out
    feast(repo, "plan")


def test_feast_serve_answers_with_age_and_stale(checkout):
    repo, port = checkout / "feature_repo", _port()
    proc = subprocess.Popen([str(BIN / "feast"), "serve", "-h", "127.0.0.1", "-p", str(port)], cwd=repo,
                            env=feast_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        asked = dt.datetime.now(dt.UTC)
        r = httpx.post(f"http://127.0.0.1:{port}/get-online-features", timeout=30, json={
            "feature_service": "order_book_live", "entities": {"symbol": ["MEGA01", "NOPE"]}})
        answered = dt.datetime.now(dt.UTC)
        assert r.status_code == 200, r.text
        body = r.json()
        got = {n: res["values"] for n, res in zip(body["metadata"]["feature_names"], body["results"], strict=True)}
        # The book's time to the microsecond (event_ts_us), the lake's own; event_ts is Feast's whole second.
        us = got["event_ts_us"][0]
        assert isinstance(us, int) and got["event_ts"][0] == us // 1_000_000 and us % 1_000_000
        ev = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)
        lake = pd.read_parquet(checkout / "data" / "lake" / "features", filters=[("symbol", "==", "MEGA01")])
        assert ev in set(lake["event_ts"].dt.to_pydatetime())
        # Computed by Feast at request time, from the exact time (from the floored second it would be older).
        assert (asked - ev).total_seconds() <= got["age_s"][0] <= (answered - ev).total_seconds()
        age = got["age_s"][0]
        assert got["stale"] == [age > 10, True]  # an unknown symbol is stale, never silently PRESENT-and-fresh
        assert got["event_ts_us"][1] is None
    finally:
        proc.terminate()
        proc.wait(30)


def test_feast_ui_serves(checkout):
    repo, port = checkout / "feature_repo", _port()
    proc = subprocess.Popen([str(BIN / "feast"), "ui", "-h", "127.0.0.1", "-p", str(port)], cwd=repo,
                            env=feast_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/", proc).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_feast_materialize_never_moves_online_back(checkout):
    repo = checkout / "feature_repo"
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    # The poller moves on after the last build: online rows are now newer than anything offline, which is
    # what Feast's stock SQLite store let `feast materialize` overwrite with older offline rows.
    r = subprocess.run([str(BIN / "microstructure"), "poll", "--data-dir", str(checkout / "data"), "--interval", "0.5",
                        "--cycles", "3", "--symbols", "5", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["online_pushed"] > 0
    store = open_store(checkout / "data")
    before = {r.symbol: r.event_ts for r in read_online(store, ["MEGA01", "LRG01", "MID01"])}
    end = dt.datetime.now(dt.UTC)
    feast(repo, "materialize", (end - dt.timedelta(hours=2)).isoformat(), end.isoformat())
    r = subprocess.run([sys.executable, "-c", (
        "import json, pathlib; from microstructure.store.repo import open_store; "
        "from microstructure.store.lookup import read_online; "
        f"s = open_store(pathlib.Path({str(checkout / 'data')!r})); "
        "print(json.dumps({r.symbol: r.event_ts.isoformat() for r in read_online(s, ['MEGA01', 'LRG01', 'MID01'])}))")],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after = {k: dt.datetime.fromisoformat(v) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    for sym, t in before.items():
        assert after[sym] >= t, (sym, t, after[sym])
