"""The online path on real DuckDB, Great Expectations and Feast: what each cycle pushes equals what the batch
build writes, Feast serves the last cycle with its age, and rows failing the checks are quarantined, not pushed."""

from __future__ import annotations

import datetime as dt

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from microstructure.checks.ge import Checker
from microstructure.contract.book import table_from_quotes, validate
from microstructure.contract.schemas import FEATURE_NAMES
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import FEATURES_QUARANTINE, LakePaths
from microstructure.store.lookup import read_online
from microstructure.store.repo import open_store
from tests.conftest import T0, book


def _offline(paths: LakePaths) -> pd.DataFrame:
    return duckdb.sql("SELECT * FROM read_parquet(?)", params=[paths.glob("features")]).df()


@pytest.mark.integration  # shares the `polled` run: 200 cycles x 20 symbols through GE and Feast
def test_online_and_offline_values_are_identical(polled):
    online = pa.concat_tables(polled["online"]).to_pandas()
    offline = _offline(polled["paths"])
    assert len(online) == len(offline) == polled["stats"].written
    m = online.merge(offline, on=["symbol", "event_ts"], suffixes=("_on", "_off"), validate="one_to_one")
    assert len(m) == len(online)
    for name in FEATURE_NAMES:
        if name == "event_ts":
            continue
        a, b = m[f"{name}_on"], m[f"{name}_off"]
        assert ((a == b) | (a.isna() & b.isna())).all(), name
    # The windowed features were exercised, not trivially zero.
    assert (offline["gap_pct"] > 0).any()


@pytest.mark.integration  # shares the `polled` run: 200 cycles x 20 symbols through GE and Feast
def test_feast_online_store_holds_the_last_cycle(polled):
    paths = polled["paths"]
    offline = _offline(paths)
    latest = offline.sort_values("received_ts").groupby("symbol").tail(1).set_index("symbol")
    now = latest["event_ts"].max().to_pydatetime() + dt.timedelta(seconds=3)
    rows = read_online(open_store(paths.data_dir), [*list(latest.index), "NOPE99"], freshness_s=10, now=now)
    for r in rows[:-1]:
        exp = latest.loc[r.symbol]
        assert r.found and r.features["spread_bps"] == exp["spread_bps"]
        assert r.features["order_imbalance"] == exp["order_imbalance"]
        # Exact: from event_ts_us (Feast keeps the UnixTimestamp event_ts to the second only).
        assert r.event_ts == exp["event_ts"] and r.age_s == (now - exp["event_ts"]).total_seconds()
        assert r.stale is False
    assert rows[-1].found is False and rows[-1].stale is True
    later = read_online(open_store(paths.data_dir), ["MEGA01"], freshness_s=10, now=now + dt.timedelta(seconds=30))
    assert later[0].stale is True


def test_online_batch_failing_checks_is_not_pushed(data_dir):
    paths = LakePaths(data_dir)
    pub = OnlinePublisher(paths, open_store(data_dir), Checker())
    stale = validate(table_from_quotes([book("S", event_ts=T0, received_ts=T0 + dt.timedelta(minutes=20))])).clean
    pub.add_cycle(stale)
    pub.flush()
    assert pub.pushed == 0 and sum(pub.rejected.values()) == 1
    assert read_online(open_store(data_dir), ["S"])[0].found is False
    assert paths.has(FEATURES_QUARANTINE)


def test_online_cycle_quarantines_a_stale_row_and_serves_the_others(data_dir):
    from microstructure.checks.sql import SqlChecker

    paths = LakePaths(data_dir)
    store = open_store(data_dir)
    pub = OnlinePublisher(paths, store, SqlChecker())
    stale = book("S", event_ts=T0, received_ts=T0 + dt.timedelta(minutes=20))
    fresh = book("F", event_ts=T0 + dt.timedelta(minutes=20), received_ts=T0 + dt.timedelta(minutes=20))
    pub.add_cycle(validate(table_from_quotes([stale, fresh])).clean)
    pub.flush()
    assert pub.pushed == 1 and pub.rejected == {"expect_column_values_to_be_between(lag_s)": 1}
    s, f = read_online(store, ["S", "F"])
    assert not s.found and f.found
    q = duckdb.sql("SELECT symbol, reason FROM read_parquet(?)",
                   params=[paths.glob(FEATURES_QUARANTINE)]).fetchall()
    assert q == [("S", "expect_column_values_to_be_between(lag_s)")]
