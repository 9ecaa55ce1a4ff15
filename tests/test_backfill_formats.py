"""Backfill of recorded files: IEX DEEP pcap replay, wide CSV/Parquet, our own snapshots; then coverage."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microstructure.recorded.bounds import FileFormatError
from microstructure.recorded.iex_deep import DeepFormatError, read_iex_deep
from microstructure.recorded.timestamps import parse_ts
from microstructure.recorded.wide import read_wide
from tests.deep_pcap import NS, iextp, plu, status, write_pcap

T = 1_764_000_000 * NS  # 2025-11-24 16:00:00 UTC


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "microstructure", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def deep(tmp_path):
    packets = [
        (T - 9, iextp([plu("8", T - 9, "ZIEXT", 10.00, 100), plu("8", T - 8, "ZIEXT", 9.99, 300),
                       plu("5", T - 7, "ZIEXT", 10.02, 200)], 1, T - 9)),
        # An event in progress at the 1 s grid point: the half-applied book must never be sampled.
        (T + NS // 2, iextp([plu("5", T + NS // 2, "ZIEXT", 10.01, 50, complete=False)], 4, T + NS // 2)),
        (T + 3 * NS // 2, iextp([plu("5", T + 3 * NS // 2, "ZIEXT", 10.02, 0)], 5, T + 3 * NS // 2)),
        (T + 5 * NS // 2, iextp([status(T + 5 * NS // 2, "ZIEXT", "H")], 6, T + 5 * NS // 2)),
        (T + 7 * NS // 2, iextp([status(T + 7 * NS // 2, "ZIEXT", "T"),
                                 plu("8", T + 7 * NS // 2, "AAPL", 190.0, 100),
                                 plu("5", T + 7 * NS // 2 + 5, "AAPL", 190.05, 100)], 7, T + 7 * NS // 2)),
        (T + 4 * NS, iextp([b"S" + b"\0" * 9], 9, T + 4 * NS, protocol=0x8003)),  # another protocol: ignored
    ]
    return write_pcap(tmp_path / "data_feeds_20251124_DEEP1.0.pcap", packets)


def test_deep_replay_samples_consistent_books_and_carries_halts(deep):
    rows = read_iex_deep(deep, cadence_s=1.0).to_pylist()
    z = [r for r in rows if r["symbol"] == "ZIEXT"]
    at = [r["received_ts"] for r in z]
    assert at == [dt.datetime.fromtimestamp(1_764_000_000 + i, dt.UTC) for i in range(5)]
    first, second = z[0], z[1]
    assert (first["bid_px_1"], first["bid_sz_1"], first["bid_px_2"], first["ask_px_1"]) == (10.0, 100, 9.99, 10.02)
    # At t+1 s the 10.01 ask was added with the "event complete" flag unset: still the t+0 book.
    assert second["ask_px_1"] == 10.02 and second["event_ts"] == first["event_ts"]
    third = z[2]  # t+1.5 s: 10.02 removed, event complete -> the 10.01 ask remains
    assert third["ask_px_1"] == 10.01 and third["ask_sz_1"] == 50 and third["ask_px_2"] is None
    assert [r["halted"] for r in z] == [False, False, False, True, False]
    aapl = [r for r in rows if r["symbol"] == "AAPL"]
    assert aapl[0]["bid_px_1"] == 190.0 and aapl[0]["ask_px_1"] == 190.05


def test_deep_rejects_files_that_are_not_deep(tmp_path):
    p = tmp_path / "x.pcap"
    p.write_bytes(b"not a capture at all")
    with pytest.raises(DeepFormatError, match="not a pcap"):
        read_iex_deep(p)
    empty = write_pcap(tmp_path / "other.pcap", [(T, iextp([b"S" + b"\0" * 9], 1, T, protocol=0x8003))])
    with pytest.raises(DeepFormatError, match="no IEX DEEP"):
        read_iex_deep(empty)


def test_wide_csv_epoch_and_iso_times_and_bad_rows(tmp_path):
    p = tmp_path / "wide.csv"
    pd.DataFrame({
        "symbol": ["AAA", "AAA", "BBB", "BBB"],
        "ts": ["2025-11-24T16:00:00Z", "2025-11-24T11:00:01-05:00", "2025-11-24 16:00:00.5", "garbage"],
        "bid_px_1": [10.0, 10.0, 20.0, 20.0], "bid_sz_1": [100, 100, 5, 5],
        "ask_px_1": [10.01, 9.99, 20.1, 20.1], "ask_sz_1": [100, 100, 5, 5],
        "bid_px_2": [9.99, None, None, None], "bid_sz_2": [50, None, None, None],
    }).to_csv(p, index=False)
    (batch,) = list(read_wide(p))
    rows = batch.raw.to_pylist()
    assert rows[0]["event_ts"] == dt.datetime(2025, 11, 24, 16, tzinfo=dt.UTC) == rows[0]["received_ts"]
    assert rows[1]["event_ts"] == dt.datetime(2025, 11, 24, 16, 0, 1, tzinfo=dt.UTC)
    assert rows[2]["event_ts"] == dt.datetime(2025, 11, 24, 16, 0, 0, 500000, tzinfo=dt.UTC)
    assert len(rows) == 3 and rows[0]["bid_px_2"] == 9.99 and rows[0]["source"] == "wide"
    bad = batch.rejected.to_pylist()  # the unreadable time is quarantined, the good rows go in
    assert [(r["symbol"], r["reason"], r["detail"]) for r in bad] == [("BBB", "unparseable_time", "ts='garbage'")]
    pd.DataFrame({"symbol": ["A"], "bid_px_1": [1.0]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(FileFormatError, match="missing column"):
        list(read_wide(tmp_path / "bad.csv"))
    pd.DataFrame({"symbol": ["A"], "ts": [1], "bid_px_1": [1.0], "bid_px_11": [1.0]}).to_csv(
        tmp_path / "b2.csv", index=False)
    with pytest.raises(FileFormatError, match="at most 10 levels"):
        list(read_wide(tmp_path / "b2.csv"))


def test_backfill_times_per_value_implausible_quarantined_good_rows_kept(tmp_path):
    from microstructure.jobs.ingest import backfill
    from microstructure.lake import paths as lake

    p = tmp_path / "mixed.csv"
    secs = 1_764_000_000
    ts = [str(secs), str((secs + 1) * 1000), "1970-01-01T00:00:05Z", str(4_102_444_800), "not a time",
          "2025-11-24T16:00:03Z"]
    pd.DataFrame({"symbol": ["A"] * 6, "ts": ts, "bid_px_1": [10.0] * 6, "bid_sz_1": [1] * 6,
                  "ask_px_1": [10.01] * 6, "ask_sz_1": [1] * 6}).to_csv(p, index=False)
    paths = lake.LakePaths(tmp_path / "d")
    st_ = backfill(paths, read_wide(p))
    # seconds and milliseconds in one column both land on 2025-11-24; 1970 and 2100 are implausible.
    assert st_.written == 3 and st_.dates == {"2025-11-24"}
    assert dict(st_.quarantined) == {"implausible_time": 2, "unparseable_time": 1}
    assert [d.name for d in paths.dataset(lake.SNAPSHOTS).glob("date=*")] == ["date=2025-11-24"]
    again = backfill(paths, read_wide(p))  # idempotent
    assert again.written == 0 and again.duplicates == 3


def test_lobster_out_of_time_order_is_an_error(tmp_path, lobster_dir):
    import shutil

    from microstructure.recorded.lobster import read_lobster

    for f in lobster_dir.glob("*.csv"):
        shutil.copy(f, tmp_path / f.name)
    msg = next(tmp_path.glob("*_message_*.csv"))
    book = next(tmp_path.glob("*_orderbook_*.csv"))
    for f in (msg, book):
        lines = f.read_text().splitlines()
        f.write_text("\n".join(lines[:50][::-1]) + "\n")
    with pytest.raises(ValueError, match="times go backwards"):
        read_lobster(msg)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=946_684_800, max_value=1_764_000_000), st.integers(0, 999_999),
       st.sampled_from(["s", "ms", "us", "ns"]))
def test_epoch_units_are_told_apart_by_magnitude(secs, micros, unit):
    mult = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    frac = {"s": 0, "ms": micros // 1000 * 1000, "us": micros, "ns": micros}[unit]
    v = secs * mult + (frac * mult // 1_000_000)
    got = parse_ts(pd.Series([v], dtype="int64"))[0][0].as_py()
    want = dt.datetime.fromtimestamp(secs, dt.UTC) + dt.timedelta(microseconds=frac)
    assert got == want


@pytest.mark.integration  # the CLI's backfill, build-features and coverage in subprocesses
def test_backfill_cli_all_formats_then_build_and_coverage(tmp_path, deep, lobster_dir):
    d = str(tmp_path / "data")
    wide = tmp_path / "wide.parquet"
    pd.DataFrame({"symbol": ["WIDE"] * 3, "ts": [1_764_000_000 + i for i in range(3)],
                  **{f"{s}_{k}_{i}": [v] * 3 for i in range(1, 6) for s, k, v in
                     (("bid", "px", 50 - i * 0.01), ("bid", "sz", 100), ("ask", "px", 50 + i * 0.01),
                      ("ask", "sz", 100))}}).to_parquet(wide)
    res = {}
    for fmt, path in (("lobster", lobster_dir), ("wide", wide), ("iex-deep", deep)):
        res[fmt] = json.loads(cli("backfill", str(path), "--format", fmt, "--data-dir", d, "--json").stdout)[0]
    assert res["wide"]["written"] == 3 and res["iex-deep"]["symbols"] == 2 and res["lobster"]["written"] > 40
    again = json.loads(cli("backfill", str(wide), "--format", "wide", "--data-dir", d, "--json").stdout)[0]
    assert again["written"] == 0 and again["already_in_lake_or_unchanged"] == 3  # idempotent
    snaps = tmp_path / "data" / "lake" / "snapshots"
    other = str(tmp_path / "other")
    copied = json.loads(cli("backfill", str(snaps), "--format", "snapshots", "--data-dir", other, "--json").stdout)[0]
    assert copied["written"] == sum(r["written"] for r in res.values())
    builds = json.loads(cli("build-features", "--data-dir", d, "--json").stdout)
    assert all(b["published"] for b in builds) and sum(b["features"] for b in builds) > 40
    cov = json.loads(cli("coverage", "--data-dir", d, "--json").stdout)
    by = {r["source"]: r for r in cov["sources"]}
    assert by["lobster"]["l2"] == 1 and by["wide"]["l2"] == 1  # 10 and 5 levels: their true depth
    assert by["iex-deep"]["shallow"] == 1 and by["iex-deep"]["l1_only"] == 1  # ZIEXT 2 bids, AAPL 1 level
    assert cov["overall"]["none"] == 0
    bad = cli("backfill", str(deep), "--format", "nope", "--data-dir", d, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'nope' is not one of" in bad.stderr
