"""Recorded Binance depth streams (../shared/data/binance) rebuilt exactly as Binance documents, checked against
the recorded bookTicker; gaps quarantined, never papered over; the real CLI's backfill is idempotent."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microstructure.recorded.binance import GAP, read_binance_depth, replay

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "binance"
SPOT_BTC = [DATA / "spot" / "btcusdt_20240808.gz", DATA / "spot" / "btcusdt_20240809.gz"]
STREAMS = {
    "spot BTCUSDT": SPOT_BTC,
    "spot ETHUSDT": [DATA / "spot" / "ethusdt_20240808.gz", DATA / "spot" / "ethusdt_20240809.gz"],
    "usdm BTCUSDT": [DATA / "usdm" / "btcusdt_20240808.gz"],
    "usdm ETHUSDT": [DATA / "usdm" / "ethusdt_20240808.gz"],
    "cm BTCUSD_PERP": [DATA / "cm" / "btcusd_perp_20240808.gz", DATA / "cm" / "btcusd_perp_20240809.gz"],
    "cm ETHUSD_PERP": [DATA / "cm" / "ethusd_perp_20240808.gz", DATA / "cm" / "ethusd_perp_20240809.gz"],
}

needs_data = pytest.mark.skipif(not SPOT_BTC[0].exists(), reason="../shared/data/binance is not beside the repo")


@pytest.mark.integration  # replays a day of a recorded depth stream
@needs_data
@pytest.mark.parametrize("name", list(STREAMS))
def test_rebuilt_book_matches_every_book_ticker_with_the_same_update_id(name):
    books: dict[int, tuple[float | None, float | None]] = {}
    tickers, crossed, kinds = [], 0, set()
    for ev in replay(STREAMS[name]):
        kinds.add(ev.kind)
        if ev.kind == "book":
            assert ev.book is not None
            bid, ask = ev.book.best()
            crossed += bid is not None and ask is not None and bid >= ask
            books[int(ev.data["u"])] = (bid, ask)
        elif ev.kind == "ticker":
            tickers.append((int(ev.data["u"]), (float(ev.data["b"]), float(ev.data["a"]))))
    matched = [(books[u], t) for u, t in tickers if u in books]
    assert len(matched) > 500  # hundreds of moments where both streams describe the same book state
    assert [m for m in matched if m[0] != m[1]] == []
    assert crossed == 0 and "gap" not in kinds and "skip" not in kinds


def _write(path: Path, lines: list[tuple[int, dict]]) -> None:
    with gzip.open(path, "wt") as f:
        for ns, msg in lines:
            f.write(f"{ns} {json.dumps(msg)}\n")


def _diff(first: int, last: int, e_ms: int, bids=(), asks=()) -> dict:
    return {"stream": "abcusdt@depth@100ms", "data": {"e": "depthUpdate", "E": e_ms, "s": "ABCUSDT", "U": first,
                                                        "u": last, "b": list(bids), "a": list(asks)}}


def test_diffs_before_the_snapshot_are_buffered_and_a_gap_is_quarantined(tmp_path):
    t = 1_723_161_255_000
    ns = t * 1_000_000
    lines = [
        (ns, _diff(95, 100, t, bids=[["9.0", "1"]])),  # before the snapshot, older than it: dropped
        (ns + 1, _diff(101, 103, t + 100, asks=[["10.5", "2"]])),  # straddles lastUpdateId + 1: first applied
        (ns + 2, {"lastUpdateId": 100, "bids": [["10.0", "1"], ["9.5", "3"]], "asks": [["10.2", "1"]]}),
        (ns + 3, _diff(104, 104, t + 1100, bids=[["10.0", "0"]])),  # size 0 removes the level
        (ns + 4, _diff(106, 107, t + 2100, bids=[["10.1", "5"]])),  # 105 is missing: a gap
        (ns + 5, _diff(108, 109, t + 3100, bids=[["10.15", "5"]])),  # unusable: no new snapshot
    ]
    f = tmp_path / "abc.gz"
    _write(f, lines)
    (batch,) = list(read_binance_depth([f], cadence=1.0))
    books = batch.raw.to_pylist()
    assert [(b["bid_px_1"], b["bid_sz_1"], b["ask_px_1"], b["ask_sz_1"], b["ask_px_2"]) for b in books] == [
        (10.0, 1.0, 10.2, 1.0, 10.5),  # after 101-103 (slot t)
        (9.5, 3.0, 10.2, 1.0, 10.5),  # after 104 (slot t + 1 s)
    ]
    assert books[0]["source"] == "binance-spot" and books[0]["symbol"] == "ABCUSDT"
    gaps = batch.rejected.to_pylist()
    assert [g["reason"] for g in gaps] == [GAP, GAP]  # the gap's slot and the next one: no book after a gap
    assert "book is at 104" in gaps[0]["detail"]


@pytest.mark.integration  # the CLI's backfill in subprocesses
@needs_data
def test_backfill_of_one_stream_in_two_files_is_idempotent(tmp_path):
    d = tmp_path / "data"

    def backfill() -> dict:
        p = subprocess.run([sys.executable, "-m", "microstructure", "backfill", *map(str, SPOT_BTC), "--format",
                            "binance-depth", "--data-dir", str(d), "--json"], capture_output=True, text=True,
                           timeout=300, env=os.environ)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)[0]

    first = backfill()
    assert first["written"] > 600 and first["quarantined"] == {}
    assert first["dates"] == ["2024-08-08", "2024-08-09"]  # across midnight: one stream, two files
    again = backfill()
    assert again["written"] == 0 and again["already_in_lake_or_unchanged"] == first["written"]
    import duckdb

    rows = duckdb.sql(f"SELECT min(book_levels), bool_and(bid_px_1 < ask_px_1)::INT, count(*) FROM "
                      f"read_parquet('{d}/lake/snapshots/*/*.parquet')").fetchall()[0]
    assert rows == (10, 1, first["written"])  # ten real levels, never crossed


@needs_data
def test_hyperliquid_l2_snapshots_sampled_per_slot():
    from microstructure.recorded.hyperliquid import read_hyperliquid_l2

    (batch,) = list(read_hyperliquid_l2([DATA / "hyperliquid" / "btcusd_20250126.gz"], cadence=1.0))
    rows = batch.raw.to_pylist()
    assert 15 <= len(rows) <= 30  # ~25 s of snapshots, one per second
    assert all(r["symbol"] == "BTC-PERP" and r["source"] == "hyperliquid" for r in rows)
    assert all(r["bid_px_1"] < r["ask_px_1"] and r["bid_px_10"] is not None for r in rows)
    times = [r["event_ts"] for r in rows]
    assert times == sorted(times) and len({t.replace(microsecond=0) for t in times}) == len(times)


def test_coin_m_sizes_become_base_asset_units(tmp_path):
    """COIN-M books quote contracts (100 USD each for BTC, 10 for others): price x size must be dollars."""
    t = 1_723_161_255_000
    ns = t * 1_000_000
    diff = {"stream": "btcusd_perp@depth@0ms", "data": {"e": "depthUpdate", "E": t, "s": "BTCUSD_PERP", "U": 99,
                                                         "u": 101, "pu": 98, "b": [], "a": [["60010", "7"]]}}
    f = tmp_path / "cm.gz"
    _write(f, [(ns, {"lastUpdateId": 100, "bids": [["60000", "3"]], "asks": [["60005", "2"]]}), (ns + 1, diff)])
    (batch,) = list(read_binance_depth([f]))
    row = batch.raw.to_pylist()[0]
    assert row["source"] == "binance-coinm" and row["symbol"] == "BTCUSD_PERP"
    assert row["bid_sz_1"] == pytest.approx(3 * 100 / 60000) and row["ask_sz_2"] == pytest.approx(7 * 100 / 60010)
    assert row["bid_px_1"] * row["bid_sz_1"] == pytest.approx(300.0)  # three $100 contracts
