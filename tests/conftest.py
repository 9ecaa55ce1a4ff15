"""Shared fixtures. Everything is real: DuckDB, Parquet, Great Expectations, Feast (SQLite + DuckDB)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FEAST_USAGE", "False")

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def book(symbol: str = "AAA", bids=((100.0, 300.0),), asks=((100.1, 100.0),), *, event_ts: dt.datetime = T0,
         received_ts: dt.datetime | None = None, source: str = "test", halted: bool | None = False):
    from microstructure.book import BookQuote

    return BookQuote(symbol, event_ts, received_ts or event_ts + dt.timedelta(milliseconds=50), source,
                     tuple(bids), tuple(asks), halted)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def polled(tmp_path_factory: pytest.TempPathFactory):
    """A small but complete pipeline run shared by read-only tests: 20 symbols x 200 cycles (400 s)."""
    from microstructure import pipeline
    from microstructure.checks import Checker
    from microstructure.lake import LakePaths
    from microstructure.sources.simulated import SimulatedSource, universe
    from microstructure.store import open_store

    d = tmp_path_factory.mktemp("polled") / "data"
    paths = LakePaths(d)
    src = SimulatedSource(seed=11)
    online_rows = []
    pub = pipeline.OnlinePublisher(paths, open_store(d), Checker())
    orig = pub.add_cycle

    def keep(written):
        f = orig(written)
        online_rows.append(f)
        return f

    pub.add_cycle = keep  # type: ignore[method-assign]
    stats = pipeline.poll(paths, src, universe()[:20], pipeline.cycle_times(T0, 2.0, 200, 0), publisher=pub,
                          publish_every=10)
    builds = pipeline.build_and_publish(paths, None, Checker(d / "gx"))
    return {"paths": paths, "stats": stats, "online": online_rows, "builds": builds, "source": src}
