"""The snapshot contract: every bad book is quarantined with its reason; nothing raises, nothing is lost."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microstructure.contract.book import SNAPSHOT_SCHEMA, table_from_quotes, validate
from tests.conftest import book

GOOD_B = ((100.0, 300.0), (99.9, 200.0))
GOOD_A = ((100.1, 100.0), (100.2, 400.0))


@pytest.mark.parametrize(
    ("bids", "asks", "reason"),
    [
        ((), (), "empty_book"),
        (GOOD_B, (), "one_sided_book"),
        (((math.nan, 5.0),), GOOD_A, "nan_or_inf"),
        (((100.0, math.inf),), GOOD_A, "nan_or_inf"),
        (((100.0, None), (99.9, 1.0)), GOOD_A, "incomplete_level"),
        (((0.0, 5.0),), GOOD_A, "nonpositive_price"),
        (((-1.0, 5.0),), GOOD_A, "nonpositive_price"),
        (((100.0, -5.0),), GOOD_A, "negative_size"),
        (((100.0, 5.0), (100.05, 5.0)), GOOD_A, "levels_out_of_order"),
        (GOOD_B, ((100.2, 5.0), (100.1, 5.0)), "levels_out_of_order"),
        (((100.0, 5.0), (100.0, 7.0)), GOOD_A, "duplicate_level"),
        (((100.2, 5.0),), ((100.1, 5.0),), "crossed_book"),
    ],
)
def test_bad_books_are_quarantined_with_reason(bids, asks, reason):
    v = validate(table_from_quotes([book(bids=bids, asks=asks), book("OK", bids=GOOD_B, asks=GOOD_A)]))
    assert v.clean.column("symbol").to_pylist() == ["OK"]
    assert v.quarantine.column("reason").to_pylist() == [reason]
    assert v.quarantine.column("symbol").to_pylist() == ["AAA"]


def test_level_gap_is_quarantined():
    from microstructure.contract.book import raw_table

    t = table_from_quotes([book(bids=((100.0, 1.0), (99.9, 1.0)))])
    cols = {n: t.column(n) for n in t.column_names}
    cols["bid_px_1"] = pa.nulls(1, pa.float64())
    cols["bid_sz_1"] = pa.nulls(1, pa.float64())
    v = validate(raw_table(cols))
    assert v.quarantine.column("reason").to_pylist() == ["level_gap"]


def test_locked_book_is_kept_and_flagged():
    v = validate(table_from_quotes([book(bids=((100.0, 1.0),), asks=((100.0, 2.0),))]))
    assert v.quarantine.num_rows == 0
    assert v.clean.column("locked").to_pylist() == [True]


def test_missing_symbol_is_quarantined():
    v = validate(table_from_quotes([book(symbol="")]))
    assert v.quarantine.column("reason").to_pylist() == ["missing_key"]


def test_book_levels_counts_what_the_source_gave():
    v = validate(table_from_quotes([book(bids=GOOD_B, asks=GOOD_A[:1]), book("L1")]))
    assert v.clean.column("book_levels").to_pylist() == [2, 1]
    assert v.clean.schema == SNAPSHOT_SCHEMA


def test_levels_beyond_ten_are_not_stored():
    bids = tuple((100.0 - i * 0.01, 1.0) for i in range(12))
    asks = tuple((100.01 + i * 0.01, 1.0) for i in range(12))
    v = validate(table_from_quotes([book(bids=bids, asks=asks)]))
    assert v.clean.column("book_levels").to_pylist() == [10]


prices = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.none())
levels = st.lists(st.tuples(prices, prices), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(levels, levels), min_size=1, max_size=8))
def test_every_row_lands_in_exactly_one_place(books):
    quotes = [book(f"S{i}", bids=b, asks=a) for i, (b, a) in enumerate(books)]
    v = validate(table_from_quotes(quotes))
    assert v.clean.num_rows + v.quarantine.num_rows == len(quotes)
    assert sorted(v.clean.column("symbol").to_pylist() + v.quarantine.column("symbol").to_pylist()) == sorted(
        q.symbol for q in quotes)
    # Whatever is clean satisfies the contract.
    for r in v.clean.to_pylist():
        assert r["bid_px_1"] > 0 and r["ask_px_1"] > 0 and r["bid_px_1"] <= r["ask_px_1"]
        assert r["bid_sz_1"] >= 0 and r["ask_sz_1"] >= 0
        assert 1 <= r["book_levels"] <= 10


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.integers(1, 10), st.floats(1, 1000), st.integers(1, 50),
       st.lists(st.floats(0, 1e6), min_size=20, max_size=20))
def test_well_formed_books_are_clean(nb, na, mid, spread_ticks, sizes):
    tick = 0.01
    best_bid = round(mid, 2)
    bids = [(round(best_bid - i * tick, 2), sizes[i]) for i in range(nb)]
    asks = [(round(best_bid + (spread_ticks + i) * tick, 2), sizes[10 + i]) for i in range(na)]
    bids = [b for b in bids if b[0] > 0] or [(best_bid, 1.0)]
    v = validate(table_from_quotes([book(bids=bids, asks=asks)]))
    assert v.quarantine.num_rows == 0, v.quarantine.column("reason").to_pylist()
