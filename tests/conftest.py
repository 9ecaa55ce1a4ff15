"""Shared fixtures. Everything is real: DuckDB, Parquet, Great Expectations, Feast (SQLite + DuckDB)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FEAST_USAGE", "False")
# Feast registries are derived state kept in a per-user cache (store.registry_dir): the tests' go in a folder of
# their own (subprocesses inherit it) instead of piling up in ~/.cache.
os.environ.setdefault("MICROSTRUCTURE_CACHE_DIR", tempfile.mkdtemp(prefix="microstructure-cache-"))

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def book(symbol: str = "AAA", bids=((100.0, 300.0),), asks=((100.1, 100.0),), *, event_ts: dt.datetime = T0,
         received_ts: dt.datetime | None = None, source: str = "test", halted: bool | None = False):
    from microstructure.contract.book import BookQuote

    return BookQuote(symbol, event_ts, received_ts or event_ts + dt.timedelta(milliseconds=50), source,
                     tuple(bids), tuple(asks), halted)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def polled(tmp_path_factory: pytest.TempPathFactory):
    """A small but complete pipeline run shared by read-only tests: 20 symbols x 200 cycles (400 s). It takes
    seconds, so the tests that use it are marked integration."""
    from microstructure.checks.ge import Checker
    from microstructure.jobs.build import build_and_publish
    from microstructure.jobs.poll import cycle_times, poll_cycles
    from microstructure.jobs.publisher import OnlinePublisher
    from microstructure.lake.paths import LakePaths
    from microstructure.sources.simulated import SimulatedSource, universe
    from microstructure.store.repo import open_store

    d = tmp_path_factory.mktemp("polled") / "data"
    paths = LakePaths(d)
    src = SimulatedSource(seed=11)
    online_rows = []
    pub = OnlinePublisher(paths, open_store(d), Checker())
    orig = pub.add_cycle

    def keep(written):
        f = orig(written)
        online_rows.append(f)
        return f

    pub.add_cycle = keep  # type: ignore[method-assign]
    stats = poll_cycles(paths, src, universe()[:20], cycle_times(T0, 2.0, 200, 0), publisher=pub,
                          publish_every=10)
    builds = build_and_publish(paths, None, Checker(d / "gx"))
    return {"paths": paths, "stats": stats, "online": online_rows, "builds": builds, "source": src}


@pytest.fixture(scope="session")
def ran(tmp_path_factory: pytest.TempPathFactory):
    """One data dir made the way a user makes it, shared by the CLI tests: `microstructure run` in a subprocess,
    60 cycles x 10 symbols. (data dir, its --json summary)."""
    d = tmp_path_factory.mktemp("cli") / "data"
    p = subprocess.run([sys.executable, "-m", "microstructure", "run", "--data-dir", str(d), "--cycles", "60",
                        "--symbols", "10", "--json"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return d, json.loads(p.stdout)


@pytest.fixture(scope="session")
def _http_stand_in():
    from pytest_httpserver import HTTPServer

    s = HTTPServer(threaded=True)  # threaded: a hanging request must not block the next one
    s.start()
    yield s
    s.stop()  # once per session: a stop waits out the server loop's 0.5 s poll


@pytest.fixture
def server(_http_stand_in):
    """The local stand-in vendor (real HTTP on 127.0.0.1), with no handler and an empty log for each test."""
    _http_stand_in.clear()
    yield _http_stand_in
    _http_stand_in.clear()


@pytest.fixture
def env(server, monkeypatch):
    """Vendor keys and base URLs the way a user sets them: environment variables."""
    from tests.vendor_server import SECRET_ID, SECRET_KEY, SECRET_POLY

    monkeypatch.setenv("POLYGON_API_KEY", SECRET_POLY)
    monkeypatch.setenv("APCA_API_KEY_ID", SECRET_ID)
    monkeypatch.setenv("APCA_API_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("MICROSTRUCTURE_POLYGON_BASE_URL", server.url_for("/").rstrip("/"))
    monkeypatch.setenv("MICROSTRUCTURE_ALPACA_DATA_URL", server.url_for("/").rstrip("/"))
    return server


LOBSTER_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "lobster"


@pytest.fixture
def lobster_dir() -> Path:
    """The real LOBSTER AAPL sample shared with this repo (../shared/data/lobster)."""
    if not LOBSTER_SAMPLE.exists():
        pytest.skip("shared LOBSTER sample not present")
    return LOBSTER_SAMPLE
