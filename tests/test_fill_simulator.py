"""The fill simulator, hand-computed: a buy walks the asks, a sell the bids; an order larger than the book is
unfillable (with the L1-only note when only the top level is known); more size never gets a better price."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microstructure.research.fills import L1_NOTE, simulate_fill, walk

BOOK = {"bid_px_1": 99.9, "bid_sz_1": 100, "bid_px_2": 99.8, "bid_sz_2": 200,
        "ask_px_1": 100.1, "ask_sz_1": 100, "ask_px_2": 100.2, "ask_sz_2": 100, "ask_px_3": 100.5, "ask_sz_3": 1000}


def test_buy_walks_asks_hand_computed():
    # $15,020: 100 sh @ 100.1 = $10,010, then $5,010 / 100.2 = 50 sh -> 150 sh, avg 100.1333.., mid 100.
    f = simulate_fill(BOOK, "buy", notional=15_020)
    assert f.filled_fraction == 1 and f.levels_consumed == 2 and not f.unfillable
    assert f.avg_price == pytest.approx(15_020 / 150)
    assert f.slippage_bps == pytest.approx((15_020 / 150 - 100) / 100 * 1e4)  # 13.33 bps: not bad
    assert not f.bad
    # 250 shares: 100 @ 100.1, 100 @ 100.2, 50 @ 100.5 = 25,055 / 250 = 100.22 -> 22 bps: bad.
    g = simulate_fill(BOOK, "buy", shares=250)
    assert g.avg_price == pytest.approx(100.22) and g.slippage_bps == pytest.approx(22.0) and g.bad


def test_sell_and_unfillable_and_l1_note():
    f = simulate_fill(BOOK, "sell", shares=300)  # 100 @ 99.9 + 200 @ 99.8 = 29,950 / 300
    assert f.avg_price == pytest.approx(29_950 / 300) and f.slippage_bps == pytest.approx((100 - 29_950 / 300) * 100)
    big = simulate_fill(BOOK, "sell", shares=400)
    assert big.unfillable and big.bad and big.filled_fraction == pytest.approx(0.75) and big.note == ""
    l1 = {"bid_px_1": 10.0, "bid_sz_1": 100, "ask_px_1": 10.01, "ask_sz_1": 100}
    small = simulate_fill(l1, "buy", notional=500)
    assert not small.bad and small.slippage_bps == pytest.approx(5.0, rel=1e-3)
    f1 = simulate_fill(l1, "buy", notional=5_000)
    assert f1.unfillable and f1.note == L1_NOTE
    with pytest.raises(ValueError, match="exactly one"):
        simulate_fill(BOOK, "buy")
    with pytest.raises(ValueError, match="side"):
        simulate_fill(BOOK, "hold", shares=1)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1000), st.floats(1, 10_000)), min_size=1, max_size=10),
       st.floats(1, 1e6), st.floats(1, 1e6))
def test_walk_properties(levels, a, b):
    """More size never gets a better price; fills never exceed the book; fraction in [0, 1]."""
    px = np.sort(np.array([p for p, _ in levels]))  # asks: best (lowest) first
    sz = np.array([s for _, s in levels])
    mid = np.array([px[0] * 0.999])
    lo, hi = sorted((a, b))
    r1 = walk(px[None], sz[None], mid, lo, True, 1.0)
    r2 = walk(px[None], sz[None], mid, hi, True, 1.0)
    assert 0 < r1["filled_fraction"][0] <= 1 and 0 < r2["filled_fraction"][0] <= 1
    assert r2["slippage_bps"][0] >= r1["slippage_bps"][0] - 1e-9
    assert r2["filled_fraction"][0] <= r1["filled_fraction"][0] + 1e-9
    cap = float((px * sz).sum())
    assert r2["unfillable"][0] == (hi > cap * (1 + 1e-12))
