"""The per-cycle SQL check and Great Expectations give the same verdicts (and unexpected counts) on the same
suites, on good batches and on batches broken in every way the suites guard against."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microstructure.checks.ge import Checker
from microstructure.checks.sql import SqlChecker
from microstructure.contract.book import validate
from microstructure.features.compute import compute_features
from microstructure.jobs import poll as pipeline
from microstructure.sources.simulated import SimulatedSource, universe
from tests.conftest import T0


@pytest.fixture(scope="module")
def checkers():
    return Checker(), SqlChecker()


@pytest.fixture(scope="module")
def batches():
    src = SimulatedSource(seed=3)
    syms = universe()[:12]
    snaps = []
    for t in pipeline.cycle_times(T0, 2.0, 5, 0):
        snaps.append(validate(src.poll(syms, t).raw).clean)
    snapshots = pa.concat_tables(snaps)
    # The lake's writer drops repeated (stale) quotes; so does this fixture.
    seen, keep = set(), []
    for k in zip(snapshots.column("symbol").to_pylist(), snapshots.column("event_ts").to_pylist(), strict=True):
        keep.append(k not in seen)
        seen.add(k)
    snapshots = snapshots.filter(pa.array(keep))
    return {"snapshots": snapshots, "features": compute_features(snapshots)}


def _verdicts(checkers, kind, table):
    ge, sql = checkers
    a = ge.check(kind, table.to_pandas())
    b = sql.check(kind, table)
    return a, b


@pytest.mark.parametrize("kind", ["snapshots", "features"])
def test_good_batches_pass_both(checkers, batches, kind):
    a, b = _verdicts(checkers, kind, batches[kind])
    assert a.success and b.success and a.rows == b.rows > 0


def _set(table: pa.Table, col: str, row: int, value) -> pa.Table:
    values = table.column(col).to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(col), col,
                            pa.array(values, table.schema.field(col).type))


MUTATIONS = ["null", "nan", "negative", "huge", "duplicate", "stale", "crossed", "levels"]


@pytest.mark.integration  # 40 broken batches, each through Great Expectations
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["snapshots", "features"]), mutation=st.sampled_from(MUTATIONS),
       row=st.integers(0, 50), col_pick=st.integers(0, 1000))
def test_broken_batches_get_the_same_verdicts(checkers, batches, kind, mutation, row, col_pick):
    t = batches[kind]
    row %= t.num_rows
    floats = [f.name for f in t.schema if pa.types.is_floating(f.type)]
    any_col = [f.name for f in t.schema if f.name != "date"]
    if mutation == "null":
        col = any_col[col_pick % len(any_col)]
        t = _set(t, col, row, None)
    elif mutation == "nan":
        t = _set(t, floats[col_pick % len(floats)], row, float("nan"))
    elif mutation == "negative":
        t = _set(t, floats[col_pick % len(floats)], row, -1.0)
    elif mutation == "huge":
        t = _set(t, floats[col_pick % len(floats)], row, 1e12)
    elif mutation == "duplicate":
        t = pa.concat_tables([t, t.slice(row, 1)])
    elif mutation == "stale":
        ev = t.column("event_ts")[row].as_py()
        t = _set(t, "received_ts", row, ev + dt.timedelta(seconds=301))
    elif mutation == "crossed":
        if kind == "snapshots":
            t = _set(t, "ask_px_1", row, t.column("bid_px_1")[row].as_py() - 0.01)
        else:
            t = _set(t, "best_bid", row, np.nextafter(t.column("best_bid")[row].as_py(), 0))
    elif mutation == "levels":
        t = _set(t, "book_levels", row, 11)
    a, b = _verdicts(checkers, kind, t)
    assert (a.success, sorted(a.failures)) == (b.success, sorted(b.failures)), mutation


def test_a_broken_batch_is_reported_by_expectation_and_count(checkers, batches):
    t = _set(_set(batches["features"], "spread_bps", 0, -2.0), "order_imbalance", 3, 1.5)
    _, b = _verdicts(checkers, "features", t)
    assert not b.success
    assert sorted(b.failures) == ["expect_column_values_to_be_between(order_imbalance): 1 rows",
                                  "expect_column_values_to_be_between(spread_bps): 1 rows"]


def test_split_quarantines_bad_rows_and_serves_the_rest(checkers, batches):
    ge, sql = checkers
    t = batches["features"]
    ev = t.column("event_ts")[4].as_py()
    t = _set(_set(t, "spread_bps", 0, -2.0), "received_ts", 4, ev + dt.timedelta(seconds=400))  # stale book
    res, good, bad = sql.split("features", t)
    assert not res.success and good.num_rows == t.num_rows - 2
    assert bad.column("reason").to_pylist() == ["expect_column_values_to_be_between(spread_bps)",
                                                "expect_column_values_to_be_between(lag_s)"]
    assert ge.check("features", good).success  # what is served passes GE itself
    for i in range(bad.num_rows):
        assert not ge.check("features", bad.slice(i, 1).drop_columns(["reason"])).success


def test_split_holds_back_a_batch_with_duplicate_keys(checkers, batches):
    _, sql = checkers
    t = batches["features"]
    _, good, bad = sql.split("features", pa.concat_tables([t, t.slice(0, 1)]))
    assert good.num_rows == 0 and bad.num_rows == t.num_rows + 1
    assert "expect_compound_columns_to_be_unique" in bad.column("reason")[0].as_py()
