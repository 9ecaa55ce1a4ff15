"""Thresholds per asset class: the symbol picks the profile; the TOML file changes or adds profiles."""

from __future__ import annotations

import pytest

from microstructure.trading.filters import apply_filters
from microstructure.trading.thresholds import CRYPTO, Thresholds, ThresholdSet, load_threshold_set


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
