"""Thresholds and the filters they drive: hand-computed limits (just below, at, just above) per mode, risky
marking, profiles per asset class, and the TOML file and environment that change them."""

from __future__ import annotations

import pytest

from microstructure.trading.filters import apply_filters, risk_marking
from microstructure.trading.thresholds import CRYPTO, Thresholds, ThresholdSet, load_threshold_set, load_thresholds

T = Thresholds()


# ---- filters: just below, at, just above ----------------------------------------------------------
def feats(**kw):
    base = {"spread_bps": 10.0, "depth_dollars": 1e6, "gap_pct": 0.0, "halted": False, "has_recent_halt": False,
            "order_imbalance": 0.0, "book_levels": 10}
    return {**base, **kw}


@pytest.mark.parametrize(("mode", "limit"), [("SAFE", 50.0), ("AGGRESSIVE", 100.0)])
def test_spread_threshold(mode, limit):
    assert apply_filters(feats(spread_bps=limit - 1e-9), mode, T).kept
    assert apply_filters(feats(spread_bps=limit), mode, T).kept
    v = apply_filters(feats(spread_bps=limit + 1e-9), mode, T)
    assert not v.kept and v.filter == "spread" and f"> {limit:g} bps" in v.reason


@pytest.mark.parametrize(("mode", "limit"), [("SAFE", 100_000.0), ("AGGRESSIVE", 50_000.0)])
def test_depth_threshold(mode, limit):
    v = apply_filters(feats(depth_dollars=limit - 0.01), mode, T)
    assert not v.kept and v.filter == "depth"
    assert apply_filters(feats(depth_dollars=limit), mode, T).kept
    assert apply_filters(feats(depth_dollars=limit + 0.01), mode, T).kept


def test_gap_and_halt_filters():
    assert apply_filters(feats(gap_pct=0.05), "SAFE", T).kept
    assert apply_filters(feats(gap_pct=0.0500001), "SAFE", T).filter == "gap"
    assert apply_filters(feats(has_recent_halt=True), "AGGRESSIVE", T).filter == "halt"
    assert apply_filters(feats(halted=True), "AGGRESSIVE", T).reason == "trading is halted"


def test_risky_marking():
    assert not risk_marking(feats(), "buy", T, stale=False).risky
    r = risk_marking(feats(depth_dollars=60_000, book_levels=1, order_imbalance=-0.5, gap_pct=0.03), "buy", T, False)
    assert len(r.reasons) == 4
    assert risk_marking(feats(order_imbalance=-0.5), "sell", T, False).risky is False  # with the sell
    assert risk_marking(feats(order_imbalance=0.5), "sell", T, False).risky is True
    assert risk_marking(feats(order_imbalance=0.49), "sell", T, False).risky is False
    assert risk_marking(feats(), "buy", T, stale=True).reasons == ["book is stale"]


# ---- where thresholds come from: profiles per asset class, the TOML file, the environment ----------
@pytest.mark.parametrize(("symbol", "profile"), [("AAPL", "equity"), ("MEGA01", "equity"), ("BTC/USD", "crypto"),
                                                 ("BTCUSDT", "crypto"), ("ETHUSDT-PERP", "crypto"),
                                                 ("BTCUSD_PERP", "crypto"), ("BTC-PERP", "crypto")])
def test_the_symbol_picks_the_profile(symbol, profile):
    assert ThresholdSet().profile_of(symbol) == profile


def test_filters_apply_the_symbols_profile():
    t = ThresholdSet()
    # 30 bps wide and $150k deep: fine for an equity under SAFE (50 bps / $100k), not for crypto (10 bps / $200k).
    row = {"spread_bps": 30.0, "depth_dollars": 150_000.0, "gap_pct": 0.0, "halted": False, "has_recent_halt": False}
    assert apply_filters({**row, "symbol": "AAPL"}, "SAFE", t).kept
    v = apply_filters({**row, "symbol": "BTCUSDT"}, "SAFE", t)
    assert not v.kept and v.filter == "spread" and "10 bps" in v.reason
    assert t.freshness_s == Thresholds().freshness_s  # shared settings fall through to the default


def test_toml_changes_a_profile_and_adds_one(tmp_path):
    f = tmp_path / "microstructure.toml"
    f.write_text('[thresholds]\nsafe_max_spread_bps = 40\n\n[profiles.crypto]\nsafe_min_depth_usd = 500000\n\n'
                 '[profiles.futures]\npatterns = ["ES*", "NQ*"]\nsafe_max_spread_bps = 2\n')
    t = load_threshold_set(f)
    assert t.default.safe_max_spread_bps == 40
    assert t.for_symbol("BTCUSDT").safe_min_depth_usd == 500_000
    assert t.for_symbol("BTCUSDT").safe_max_spread_bps == CRYPTO.safe_max_spread_bps  # the rest of crypto kept
    assert t.profile_of("ESZ6") == "futures" and t.for_symbol("ESZ6").safe_max_spread_bps == 2
    f.write_text('[profiles.crypto]\nmin_depth = 1\n')
    with pytest.raises(ValueError, match="unknown threshold"):
        load_threshold_set(f)


def test_thresholds_from_file_and_environment(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("[thresholds]\nsafe_max_spread_bps = 40\ncache_ttl_s = 2\n")
    t = load_thresholds(f, env={"MICROSTRUCTURE_SAFE_MAX_SPREAD_BPS": "30"})
    assert t.safe_max_spread_bps == 30 and t.cache_ttl_s == 2 and t.aggressive_max_spread_bps == 100
    with pytest.raises(ValueError, match="between 1 and 10"):
        load_thresholds(None, env={"MICROSTRUCTURE_CACHE_TTL_S": "11"})
    with pytest.raises(ValueError, match="unknown threshold"):
        load_thresholds(None, env={}, nope=1)
