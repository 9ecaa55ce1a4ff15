"""Hand-computed values for every feature in transforms/features.sql, including the L1-only case."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microstructure.contract.book import table_from_quotes, validate
from microstructure.features.compute import compute_features
from tests.conftest import T0, book

M = dt.timedelta(minutes=1)


def features(quotes):
    v = validate(table_from_quotes(quotes))
    assert v.quarantine.num_rows == 0
    rows = compute_features(v.clean).to_pylist()
    return {(r["symbol"], r["event_ts"]): r for r in rows}


def test_l2_book_every_feature():
    bids = ((100.00, 300), (99.99, 200), (99.98, 1), (99.97, 1), (99.96, 1), (99.95, 1000))
    asks = ((100.02, 100), (100.03, 400))
    r = features([book("A", bids, asks)])[("A", T0)]
    assert r["best_bid"] == 100.00 and r["best_ask"] == 100.02
    assert r["bid_size"] == 300 and r["ask_size"] == 100
    assert r["mid"] == pytest.approx(100.01)
    assert r["spread_bps"] == pytest.approx(0.02 / 100.01 * 10_000)
    assert r["order_imbalance"] == pytest.approx(0.5)
    # Top 5 only: the 1000 shares on the 6th bid level are not depth.
    assert r["bid_depth"] == 503 and r["ask_depth"] == 500
    assert r["depth_imbalance"] == pytest.approx(3 / 1003)
    bid_usd = 100 * 300 + 99.99 * 200 + 99.98 + 99.97 + 99.96
    ask_usd = 100.02 * 100 + 100.03 * 400
    assert r["bid_depth_dollars"] == pytest.approx(bid_usd)
    assert r["ask_depth_dollars"] == pytest.approx(ask_usd)
    assert r["depth_dollars"] == pytest.approx(bid_usd + ask_usd)
    assert r["microprice"] == pytest.approx((100 * 100 + 100.02 * 300) / 400)  # 100.015
    assert r["gap_pct"] == 0 and r["has_recent_halt"] is False
    assert r["book_levels"] == 6 and r["source"] == "test"


def test_l1_only_book():
    r = features([book("L1", ((50.0, 10),), ((50.5, 30),))])[("L1", T0)]
    assert r["book_levels"] == 1
    assert r["bid_depth"] == 10 and r["ask_depth"] == 30  # top of book only, flagged by book_levels
    assert r["spread_bps"] == pytest.approx(0.5 / 50.25 * 10_000)
    assert r["order_imbalance"] == pytest.approx(-0.5) and r["depth_imbalance"] == pytest.approx(-0.5)
    assert r["depth_dollars"] == pytest.approx(500 + 1515)
    assert r["microprice"] == pytest.approx(50.125)


def test_empty_queues_give_zero_imbalance_and_mid_microprice():
    r = features([book("Z", ((10.0, 0),), ((10.1, 0),))])[("Z", T0)]
    assert r["order_imbalance"] == 0 and r["depth_imbalance"] == 0
    assert r["microprice"] == pytest.approx(10.05)


def _mid_book(t, mid, halted=False):
    return book("W", ((mid - 0.1, 10),), ((mid + 0.1, 10),), event_ts=t, halted=halted)


def test_gap_and_halt_windows_with_their_boundaries():
    f = features([
        _mid_book(T0, 100),
        _mid_book(T0 + 2 * M, 110, halted=True),
        _mid_book(T0 + 5 * M, 100),  # window [T0, T0+5m] includes T0 (inclusive boundary)
        _mid_book(T0 + 6 * M, 105),  # window [T0+1m, T0+6m]: 110, 100, 105
        _mid_book(T0 + 8 * M, 105),  # window [T0+3m, T0+8m]: 100, 105, 105
        _mid_book(T0 + 32 * M, 100),  # halt at T0+2m is exactly 30 minutes back: still recent
        _mid_book(T0 + 32 * M + dt.timedelta(seconds=1), 100),
    ])
    g = {t: f[("W", t)]["gap_pct"] for (_, t) in f}
    h = {t: f[("W", t)]["has_recent_halt"] for (_, t) in f}
    assert g[T0] == 0
    assert g[T0 + 2 * M] == pytest.approx(0.1)
    assert g[T0 + 5 * M] == pytest.approx(0.1)
    assert g[T0 + 6 * M] == pytest.approx(0.1)
    assert g[T0 + 8 * M] == pytest.approx(0.05)
    assert g[T0 + 32 * M] == 0  # 24 minutes since the last different mid
    assert [h[t] for t in sorted(h)] == [False, True, True, True, True, True, False]


def test_same_instant_from_two_sources_keeps_first_received():
    late = book("D", ((10.0, 1),), ((10.2, 1),), source="b", received_ts=T0 + dt.timedelta(seconds=2))
    early = book("D", ((10.0, 5),), ((10.2, 1),), source="a", received_ts=T0 + dt.timedelta(seconds=1))
    f = features([late, early])
    assert len(f) == 1 and f[("D", T0)]["source"] == "a"


def test_windows_are_per_symbol():
    f = features([_mid_book(T0, 100), book("X", ((49.9, 1),), ((50.1, 1),), event_ts=T0 + M)])
    assert f[("X", T0 + M)]["gap_pct"] == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["P", "Q"]), st.integers(0, 80), st.integers(0, 3),
                          st.sampled_from(["a", "b"]), st.integers(90, 110), st.sampled_from([False, True, None])),
                min_size=1, max_size=40))
def test_windows_and_source_ties_match_a_plain_python_reference(rows):
    """Random books (ties on time across sources, halts, gaps of minutes) against the definitions written out
    in Python: first received per (symbol, time) wins; gap = mid range over the trailing 5 minutes / its low;
    halt = any halted book in the trailing 30 minutes."""
    quotes = {}
    for sym, minute, recv, src, mid, halted in rows:
        t = T0 + minute * dt.timedelta(seconds=30)
        quotes[(sym, t, src)] = book(sym, ((mid - 0.5, 1),), ((mid + 0.5, 1),), event_ts=t, source=src,
                                     received_ts=t + dt.timedelta(seconds=recv), halted=halted)
    got = features(list(quotes.values()))
    first = {}
    for (sym, t, _src), q in sorted(quotes.items(), key=lambda kv: (kv[1].received_ts, kv[0][2])):
        first.setdefault((sym, t), q)
    assert set(got) == set(first)
    for (sym, t), q in first.items():
        mid = (q.bids[0][0] + q.asks[0][0]) / 2
        assert got[(sym, t)]["mid"] == mid and got[(sym, t)]["source"] == q.source
        window = [(w.bids[0][0] + w.asks[0][0]) / 2 for (s2, t2), w in first.items()
                  if s2 == sym and t - 5 * M <= t2 <= t]
        assert got[(sym, t)]["gap_pct"] == pytest.approx((max(window) - min(window)) / min(window), abs=1e-12)
        halted = any(w.halted for (s2, t2), w in first.items() if s2 == sym and t - 30 * M <= t2 <= t)
        assert got[(sym, t)]["has_recent_halt"] is halted
