"""MicrostructureService and picks against real stores: the imbalance it computes, tradeable or not and why, its
cache on a controllable clock, the live refresh of a stale book, and picks with bad rows. The filters and
thresholds it applies are in test_thresholds.py."""

from __future__ import annotations

import datetime as dt
import json
import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microstructure.contract.book import table_from_quotes, validate
from microstructure.jobs.build import build_and_publish
from microstructure.jobs.poll import cycle_times, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths
from microstructure.sources.simulated import SimulatedSource
from microstructure.store.repo import open_store
from microstructure.trading.picks import check_picks, summary
from microstructure.trading.service import MicrostructureService, calculate_imbalance
from microstructure.trading.thresholds import Thresholds
from tests.conftest import T0, book

T = Thresholds()


# ---- calculate_imbalance -------------------------------------------------------------------------
def test_imbalance_hand_computed():
    assert calculate_imbalance([(10, 300), (9.9, 100)], [(10.1, 100)]) == pytest.approx(0.6)  # (400-100)/500
    assert calculate_imbalance([], []) == 0.0
    assert calculate_imbalance([(1, 0)], [(2, 0)]) == 0.0
    assert calculate_imbalance([(1, 5)], []) == 1.0
    assert calculate_imbalance([], [(1, 5)]) == -1.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_imbalance_rejects_bad_sizes_naming_the_level(bad):
    with pytest.raises(ValueError, match="ask level 2"):
        calculate_imbalance([(10, 1)], [(10.1, 1), (10.2, bad)])


sides = st.lists(st.tuples(st.floats(0.01, 1e4), st.floats(0, 1e9)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(sides, sides)
def test_imbalance_is_bounded_and_antisymmetric(bids, asks):
    x = calculate_imbalance(bids, asks)
    assert -1.0 <= x <= 1.0
    assert calculate_imbalance(asks, bids) == pytest.approx(-x, abs=1e-12)


# ---- the service against real Feast ---------------------------------------------------------------
@pytest.fixture
def world(data_dir):
    """Twenty simulated symbols polled for 100 cycles from T0, plus a halted and an L1-only symbol."""
    paths = LakePaths(data_dir)
    src = SimulatedSource(seed=2)
    pub = OnlinePublisher(paths, open_store(data_dir), None)
    from microstructure.sources.simulated import universe

    poll_cycles(paths, src, universe()[:20], cycle_times(T0, 2.0, 100, 0), publisher=pub)
    last = T0 + dt.timedelta(seconds=198)
    extra = [book("HALTD", ((10, 1e5),), ((10.01, 1e5),), event_ts=last, halted=True),
             book("L1ONLY", ((50, 5000),), ((50.01, 5000),), event_ts=last)]
    pub.add_cycle(validate(table_from_quotes(extra)).clean)
    pub.flush()
    clock = {"t": 0.0}
    return {"paths": paths, "src": src, "last": last, "clock": clock}


def service(world, now, **kw):
    return MicrostructureService(world["paths"].data_dir, source=world["src"], clock=lambda: world["clock"]["t"],
                                 now=lambda: now, **kw)


@pytest.mark.integration  # the `world`: 100 cycles x 20 symbols published to Feast, per test
def test_tradeable_reasons(world):
    s = service(world, world["last"] + dt.timedelta(seconds=2))
    assert s.is_tradeable("MEGA01", "SAFE")["tradeable"] is True
    h = s.is_tradeable("HALTD", "AGGRESSIVE")
    assert h["tradeable"] is False and h["filter"] == "halt"
    assert "halted" in h["reason"]
    u = s.is_tradeable("NOPE", "SAFE")
    assert u["tradeable"] is False and "unknown symbol" in u["reason"]
    ilq = s.is_tradeable("ILQ01", "AGGRESSIVE")
    assert ilq["tradeable"] is False and ilq["filter"] in {"spread", "depth"}
    with pytest.raises(ValueError, match="unknown mode"):
        s.is_tradeable("MEGA01", "YOLO")


@pytest.mark.integration  # the `world`: 100 cycles x 20 symbols published to Feast, per test
def test_cache_hits_and_expiry_with_a_controllable_clock(world):
    s = service(world, world["last"] + dt.timedelta(seconds=2), cache_ttl_s=5)
    s.get_order_book_features("MEGA01")
    world["clock"]["t"] = 4.99
    s.get_order_book_features("MEGA01")
    assert s.cache_stats()["hits"] == 1 and s.cache_stats()["misses"] == 1
    world["clock"]["t"] = 5.0
    s.get_order_book_features("MEGA01")
    assert s.cache_stats()["misses"] == 2


@pytest.mark.integration  # the `world`: 100 cycles x 20 symbols published to Feast, per test
def test_stale_online_data_triggers_one_live_refresh(world):
    later = world["last"] + dt.timedelta(minutes=10)
    s = service(world, later)
    f = s.get_order_book_features("MEGA01")
    assert f["found"] and not f["stale"] and f["age_s"] < 2
    assert dt.datetime.fromisoformat(f["event_ts"]) > world["last"] + dt.timedelta(minutes=9)
    # The refresh went through the lake too, and its features used the pipeline SQL with history.
    snaps = pd.read_parquet(world["paths"].dataset("snapshots"))
    assert (snaps["symbol"] == "MEGA01").sum() == 101
    assert s.is_tradeable("MEGA01", "SAFE")["age_s"] < 2


@pytest.mark.integration  # the `world`: 100 cycles x 20 symbols published to Feast, per test
def test_stale_data_without_a_source_answer_is_not_tradeable(world):
    later = world["last"] + dt.timedelta(minutes=10)
    s = service(world, later)
    r = s.is_tradeable("L1ONLY", "SAFE")  # the simulated source does not know it: stays stale
    assert r["tradeable"] is False and r["filter"] in {"stale", "no_data"}


@pytest.mark.integration  # the `world`: 100 cycles x 20 symbols published to Feast, per test
def test_picks_with_bad_rows(world, tmp_path):
    s = service(world, world["last"] + dt.timedelta(seconds=2))
    picks = pd.DataFrame([
        {"symbol": "MEGA01", "side": "buy", "score": 0.9, "mode": "SAFE"},
        {"symbol": "ILQ01", "side": "sell", "score": 0.8, "mode": "AGGRESSIVE"},
        {"symbol": "L1ONLY", "side": "buy", "score": 0.7, "mode": "AGGRESSIVE"},
        {"symbol": "MEGA02", "side": "buy", "score": 0.5, "mode": "SAFE", "as_of": str(T0 + dt.timedelta(seconds=61))},
        {"symbol": "MEGA01", "side": "buy", "score": 0.6, "mode": "YOLO"},
        {"symbol": "MEGA01", "side": "buy", "score": 0.6, "mode": "SAFE", "notional": -5},
        {"symbol": None, "side": "buy", "score": 0.6, "mode": "SAFE"},
    ])
    build_and_publish(world["paths"])
    res = check_picks(picks, s)
    st_ = [r["status"] for r in res]
    assert st_[:4] == ["kept", "dropped", "kept", "kept"] and st_[4:] == ["error"] * 3
    assert "unknown mode" in res[4]["reason"] and "notional" in res[5]["reason"]
    assert res[6]["reason"] == "missing symbol"
    assert "L1 quote only" in " ".join(res[2]["risk_reasons"])
    assert res[3]["as_of"].startswith("2026-11-23T14:31:01") and res[3]["age_s"] <= 10
    sm = summary(res)
    assert sm["kept"] == 3 and sm["errors"] == 3 and sum(sm["dropped_by_filter"].values()) == 1
    json.dumps(res, default=str)
