"""Databento DBN files (MBP-10, MBP-1; zstd and plain) into the lake: every level exact, symbols from the file's
mappings, broken books quarantined beside the good ones, bounded reads, and ``--symbol`` repeating."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import zstandard

from microstructure.jobs.ingest import backfill
from microstructure.lake import paths as lake
from microstructure.lake.paths import LakePaths
from microstructure.recorded.bounds import DECOMPRESSED_FLOOR, FileFormatError, MiB
from microstructure.recorded.dbn import UNMAPPED, read_dbn
from microstructure.recorded.registry import FORMATS
from tests.dbn_files import NS, T0, exact, level, mapping_msg, mbp, metadata, write_dbn


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "microstructure", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The command failed with exit 2 and one `error:` line (the progress display may leave a blank line)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def lake_rows(d, name=lake.SNAPSHOTS) -> list[dict]:
    files = sorted(LakePaths(d.resolve()).dataset(name).rglob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


# Prices chosen so that a float64 ``px * 1e-9`` is one unit in the last place off for some of them: the reader must
# divide exactly. Sizes up to the u32 maximum.
PRICES = [189_123_456_789, 1_111_381_949_381, 8_581_747_781_261, 5_587_329_086_266, 1, 999_999_999_999_999_999]
assert any(p * 1e-9 != exact(p) for p in PRICES)  # the test can fail


def _book(i: int) -> list:
    """Ten levels, bids below asks, prices from PRICES-like awkward values."""
    base = 1_111_381_949_381 + i * 1_000_003
    return [level(base - k * 10_000_001, 100 + k, base + (k + 1) * 10_000_001, 4_294_967_295 - k) for k in range(10)]


@pytest.mark.parametrize("depth10", [True, False], ids=["mbp-10", "mbp-1"])
@pytest.mark.parametrize("zstd", [True, False], ids=["zstd", "plain"])
def test_every_level_round_trips_exactly_price_and_size(tmp_path, depth10, zstd):
    books = [_book(i) for i in range(5)]
    recs = [mbp(42, T0 + i * NS, b, depth10=depth10) for i, b in enumerate(books)]
    f = write_dbn(tmp_path / ("a.dbn.zst" if zstd else "a.dbn"), {"AAPL": 42}, recs,
                  schema="mbp-10" if depth10 else "mbp-1", zstd=zstd)
    d = tmp_path / "data"
    st = backfill(LakePaths(d.resolve()), FORMATS["dbn"]([f], 1.0, []))
    assert st.written == 5 and not st.quarantined
    rows = sorted(lake_rows(d), key=lambda r: r["received_ts"])
    n = 10 if depth10 else 1
    for i, (r, b) in enumerate(zip(rows, books, strict=True)):
        assert r["symbol"] == "AAPL" and r["source"] == "databento" and r["book_levels"] == n
        # received_ts = ts_recv, event_ts = ts_event (1 µs before it here), in µs
        assert r["received_ts"].timestamp() * 1e6 == pytest.approx((T0 + i * NS) // 1000)
        assert (T0 + i * NS) // 1000 - 1 == int(r["event_ts"].timestamp() * 1e6)
        for k in range(10):
            want = (exact(b[k].bid_px), float(b[k].bid_sz), exact(b[k].ask_px), float(b[k].ask_sz)) if k < n \
                else (None, None, None, None)
            got = (r[f"bid_px_{k + 1}"], r[f"bid_sz_{k + 1}"], r[f"ask_px_{k + 1}"], r[f"ask_sz_{k + 1}"])
            assert got == want, (i, k)


def test_extreme_fixed_point_prices_are_the_nearest_float():
    from microstructure.recorded.dbn import fixed_price

    assert [fixed_price(p) for p in PRICES] == [exact(p) for p in PRICES]


def test_symbols_come_from_the_mappings_and_symbol_mapping_records_unmapped_quarantined(tmp_path):
    recs = [mbp(1, T0, _book(0)), mbp(2, T0 + 1, _book(1)),
            mapping_msg(3, "TSLA", T0 + 2), mbp(3, T0 + 3, _book(2)),
            mbp(4, T0 + 4, _book(3)), mbp(4, T0 + 5 * NS, _book(3))]  # 4: no mapping names it
    f = write_dbn(tmp_path / "m.dbn.zst", {"AAPL": 1, "MSFT": 2}, recs)
    batches = list(read_dbn([f], 1.0))
    got = sorted(r["symbol"] for b in batches for r in b.raw.to_pylist())
    assert got == ["AAPL", "MSFT", "TSLA"]
    rej = [r for b in batches for r in b.rejected.to_pylist()]
    assert [(r["symbol"], r["reason"], r["origin"]) for r in rej] == [
        ("instrument_id=4", UNMAPPED, "m.dbn.zst record 5")]  # once, not once per record


def test_only_the_last_complete_event_of_each_slot_is_sampled(tmp_path):
    recs = [mbp(1, T0 + 100, _book(0)),
            mbp(1, T0 + 200, _book(1)),
            mbp(1, T0 + 300, [level(5, 1, 4, 1)], flags=0),  # mid-event (no F_LAST), crossed: never sampled
            mbp(1, T0 + NS + 5, _book(2))]
    f = write_dbn(tmp_path / "s.dbn", {"AAPL": 1}, recs, zstd=False)
    rows = [r for b in read_dbn([f], 1.0) for r in b.raw.to_pylist()]
    assert [r["bid_px_1"] for r in rows] == [exact(_book(1)[0].bid_px), exact(_book(2)[0].bid_px)]


def test_one_sided_and_undefined_price_books_are_quarantined_with_reason_good_rows_kept(tmp_path):
    good = _book(0)
    recs = [mbp(1, T0, good),
            mbp(1, T0 + 1 * NS, [level(ask_px=190 * NS, ask_sz=5)]),  # no bids: UNDEF_PRICE on every bid level
            mbp(1, T0 + 2 * NS, [level()]),  # nothing at all
            mbp(1, T0 + 3 * NS, [level(bid_sz=7, ask_px=190 * NS, ask_sz=5)]),  # a size at UNDEF_PRICE
            mbp(1, T0 + 4 * NS, [level(), level(189 * NS, 3, 190 * NS, 5)]),  # an empty level before a set one
            mbp(1, T0 + 5 * NS, good)]
    f = write_dbn(tmp_path / "q.dbn.zst", {"AAPL": 1}, recs)
    d = tmp_path / "data"
    st = backfill(LakePaths(d.resolve()), read_dbn([f], 1.0))
    assert st.written == 2
    assert dict(st.quarantined) == {"one_sided_book": 1, "empty_book": 1, "nan_or_inf": 2}
    q = {r["origin"]: r["reason"] for r in lake_rows(d, lake.QUARANTINE)}
    assert q == {"q.dbn.zst record 2": "one_sided_book", "q.dbn.zst record 3": "empty_book",
                 "q.dbn.zst record 4": "nan_or_inf", "q.dbn.zst record 5": "nan_or_inf"}
    assert all(r["bid_px_1"] == exact(good[0].bid_px) for r in lake_rows(d))


def test_implausible_times_are_quarantined_never_sampled(tmp_path):
    f = write_dbn(tmp_path / "t.dbn", {"AAPL": 1}, [mbp(1, T0, _book(0), ts_event=5), mbp(1, T0 + NS, _book(1))],
                  zstd=False)
    batches = list(read_dbn([f], 1.0))
    assert [r["reason"] for b in batches for r in b.rejected.to_pylist()] == ["implausible_time"]
    assert sum(b.raw.num_rows for b in batches) == 1


@pytest.mark.integration  # the real CLI in a subprocess
def test_a_truncated_or_garbage_dbn_file_is_one_error_line_exit_2(tmp_path):
    whole = metadata({"AAPL": 1}) + b"".join(mbp(1, T0 + i * NS, _book(i)) for i in range(3))
    cut = tmp_path / "cut.dbn"
    cut.write_bytes(whole[:-100])
    r = cli("backfill", cut, "--format", "dbn", "--data-dir", tmp_path / "d", check=False)
    err = one_error_line(r)
    assert "cut.dbn after record 2: the file is cut short" in err and "the lake kept the 2 rows before it" in err
    assert len(lake_rows(tmp_path / "d")) == 2  # the good books before the break are kept
    junk = tmp_path / "junk.dbn.zst"
    junk.write_bytes(zstandard.ZstdCompressor().compress(b"\x00garbage, not DBN" * 100))
    r = cli("backfill", junk, "--format", "dbn", "--data-dir", tmp_path / "d", check=False)
    assert "junk.dbn.zst: not a DBN file this reader knows" in one_error_line(r)


def test_a_zstd_decompression_bomb_dbn_is_refused_at_its_bound(tmp_path):
    # ~100 MB of identical records compresses to a few KB: 200 x its size is far below the 64 MiB floor.
    rec = mbp(1, T0, _book(0))
    bomb = tmp_path / "bomb.dbn.zst"
    cctx = zstandard.ZstdCompressor(level=19)
    with open(bomb, "wb") as fh, cctx.stream_writer(fh) as w:
        w.write(metadata({"AAPL": 1}))
        block = rec * (MiB // len(rec))
        for _ in range(100):
            w.write(block)
    assert bomb.stat().st_size < MiB
    with pytest.raises(FileFormatError, match="compression bomb") as e:
        for _ in read_dbn([bomb], 1.0):
            pass
    assert f"more than {DECOMPRESSED_FLOOR:,} bytes" in str(e.value)


def test_a_dbn_of_another_schema_is_refused(tmp_path):
    f = write_dbn(tmp_path / "o.dbn", {"AAPL": 1}, [], schema="trades", zstd=False)
    with pytest.raises(FileFormatError, match="DBN schema 'trades'; backfill --format dbn reads mbp-10 and mbp-1"):
        list(read_dbn([f], 1.0))


@pytest.mark.integration  # the real CLI in a subprocess
def test_symbol_repeats_dbn_keeps_each_given_wide_renames_file_by_file_one_stream_refuses_two(tmp_path):
    recs = [mbp(i, T0 + i, _book(i)) for i in (1, 2, 3)]
    f = write_dbn(tmp_path / "r.dbn.zst", {"AAPL": 1, "MSFT": 2, "TSLA": 3}, recs)
    d = tmp_path / "d"
    cli("backfill", f, "--format", "dbn", "--symbol", "AAPL", "--symbol", "TSLA", "--data-dir", d)
    assert sorted(r["symbol"] for r in lake_rows(d)) == ["AAPL", "TSLA"]
    w1, w2 = tmp_path / "w1.csv", tmp_path / "w2.csv"
    for w, t in ((w1, 1_764_000_000), (w2, 1_764_000_001)):
        w.write_text(f"symbol,ts,bid_px_1,bid_sz_1,ask_px_1,ask_sz_1\nX,{t},10,1,11,1\n")
    d2 = tmp_path / "d2"
    cli("backfill", w1, w2, "--format", "wide", "--symbol", "ONE", "--symbol", "TWO", "--data-dir", d2)
    assert sorted((r["symbol"], int(r["event_ts"].timestamp())) for r in lake_rows(d2)) == [
        ("ONE", 1_764_000_000), ("TWO", 1_764_000_001)]
    r = cli("backfill", w1, "--format", "wide", "--symbol", "A", "--symbol", "B", "--data-dir", d2, check=False)
    assert "2 --symbol values for 1 files" in one_error_line(r)
    r = cli("backfill", w1, "--format", "binance-depth", "--symbol", "A", "--symbol", "B", "--data-dir", d2,
            check=False)
    assert "give at most one --symbol (got 2)" in one_error_line(r)


def test_an_instrument_id_reused_on_another_day_takes_that_days_symbol(tmp_path):
    import datetime as dt
    from types import SimpleNamespace as NS_

    import databento_dbn as dbn

    from tests.dbn_files import DAY

    def iv(day, iid):
        return NS_(start_date=day, end_date=day + dt.timedelta(1), symbol=str(iid))

    nxt = DAY + dt.timedelta(1)
    md = dbn.Metadata(dataset="XNAS.ITCH", start=T0, end=T0 + 2 * 86_400 * NS, stype_in=dbn.SType.RAW_SYMBOL,
                      stype_out=dbn.SType.INSTRUMENT_ID, schema=dbn.Schema.MBP_10, symbols=["AAPL", "MSFT"],
                      mappings=[NS_(raw_symbol="AAPL", intervals=[iv(DAY, 7)]),
                                NS_(raw_symbol="MSFT", intervals=[iv(nxt, 7)])])
    f = tmp_path / "days.dbn"
    f.write_bytes(md.encode() + mbp(7, T0, _book(0)) + mbp(7, T0 + 86_400 * NS, _book(1)))
    rows = [r for b in read_dbn([f], 1.0) for r in b.raw.to_pylist()]
    assert [(r["symbol"], r["received_ts"].date()) for r in rows] == [("AAPL", DAY), ("MSFT", nxt)]


def test_a_parent_subscriptions_mapping_records_label_each_contract_by_its_raw_symbol(tmp_path):
    """A live capture of ES.FUT (parent) sends one SymbolMappingMsg per contract: in ES.FUT, out ESZ5 / ESH6. The
    reader used the input symbol, so every contract's book went into the lake as one symbol, ES.FUT. Databento's
    SDK takes the output symbol (unless it is an instrument id)."""
    recs = [mapping_msg(3, "ES.FUT", T0, raw="ESZ5"), mapping_msg(4, "ES.FUT", T0, raw="ESH6"),
            mbp(3, T0 + 1, _book(0)), mbp(4, T0 + 2, _book(1))]
    f = write_dbn(tmp_path / "live.dbn", {}, recs, zstd=False)
    rows = [r for b in read_dbn([f], 1.0) for r in b.raw.to_pylist()]
    assert sorted(r["symbol"] for r in rows) == ["ESH6", "ESZ5"]


def test_a_parent_symbol_naming_two_contracts_on_one_date_is_quarantined_not_mixed(tmp_path):
    """A historical file requested with stype_in=parent maps ES.FUT to every contract's instrument id: read as a
    symbol, ESZ5's and ESH6's books became one interleaved ES.FUT series. A contract that is ES.FUT's only
    instrument on another date (a continuous symbol's roll) is still named."""
    import datetime as dt
    from types import SimpleNamespace as NS_

    import databento_dbn as dbn

    from tests.dbn_files import DAY

    AMBIGUOUS = "ambiguous_symbol"
    nxt = DAY + dt.timedelta(1)
    md = dbn.Metadata(dataset="GLBX.MDP3", start=T0, end=T0 + 2 * 86_400 * NS, stype_in=dbn.SType.PARENT,
                      stype_out=dbn.SType.INSTRUMENT_ID, schema=dbn.Schema.MBP_10, symbols=["ES.FUT", "NQZ5"],
                      mappings=[NS_(raw_symbol="ES.FUT", intervals=[NS_(start_date=DAY, end_date=nxt, symbol="3"),
                                                                    NS_(start_date=DAY, end_date=nxt, symbol="4")]),
                                NS_(raw_symbol="ES.C.0", intervals=[NS_(start_date=DAY, end_date=nxt, symbol="5"),
                                                                    NS_(start_date=nxt, end_date=nxt + dt.timedelta(1),
                                                                        symbol="6")]),
                                NS_(raw_symbol="NQZ5", intervals=[NS_(start_date=DAY, end_date=nxt, symbol="1")])])
    f = tmp_path / "parent.dbn"
    f.write_bytes(md.encode() + b"".join(mbp(i, T0 + i, _book(i)) for i in (1, 3, 4, 5))
                  + mbp(3, T0 + NS, _book(0)) + mbp(6, T0 + 86_400 * NS, _book(6)))
    batches = list(read_dbn([f], 1.0))
    assert sorted(r["symbol"] for b in batches for r in b.raw.to_pylist()) == ["ES.C.0", "ES.C.0", "NQZ5"]
    rej = sorted((r["symbol"], r["reason"], r["origin"]) for b in batches for r in b.rejected.to_pylist())
    assert rej == [("ES.FUT", AMBIGUOUS, "parent.dbn record 2"), ("ES.FUT", AMBIGUOUS, "parent.dbn record 3")]


def test_two_files_of_one_capture_give_one_snapshot_per_slot_across_the_boundary(tmp_path):
    """A capture split into files (hourly, say) cuts a cadence slot in two: each file's pending sample was emitted
    at its end, so the slot at the boundary held two snapshots of one symbol instead of its last one."""
    a = write_dbn(tmp_path / "a.dbn", {"AAPL": 1}, [mbp(1, T0 + 100, _book(0)), mbp(1, T0 + 200, _book(1))],
                  zstd=False)
    b = write_dbn(tmp_path / "b.dbn", {"AAPL": 1}, [mbp(1, T0 + 300, _book(2)), mbp(1, T0 + NS, _book(3))],
                  zstd=False)
    rows = [r for bt in read_dbn([a, b], 1.0) for r in bt.raw.to_pylist()]
    assert [r["bid_px_1"] for r in rows] == [exact(_book(2)[0].bid_px), exact(_book(3)[0].bid_px)]


def test_records_flagged_maybe_bad_book_or_bad_ts_recv_are_quarantined_not_books(tmp_path):
    """Databento flags a record whose book may be wrong after an unrecoverable gap (F_MAYBE_BAD_BOOK) or whose
    ts_recv is inaccurate (F_BAD_TS_RECV): stored as books, they were a wrong book and an untrue received_ts."""
    import databento_dbn as dbn

    recs = [mbp(1, T0, _book(0)),
            mbp(1, T0 + NS, _book(1), flags=dbn.F_LAST | dbn.F_MAYBE_BAD_BOOK),
            mbp(1, T0 + 2 * NS, _book(2), flags=dbn.F_LAST | dbn.F_BAD_TS_RECV),
            mbp(1, T0 + 3 * NS, _book(3))]
    f = write_dbn(tmp_path / "flags.dbn", {"AAPL": 1}, recs, zstd=False)
    batches = list(read_dbn([f], 1.0))
    assert [r["bid_px_1"] for b in batches for r in b.raw.to_pylist()] == [exact(_book(0)[0].bid_px),
                                                                        exact(_book(3)[0].bid_px)]
    assert sorted((r["reason"], r["origin"]) for b in batches for r in b.rejected.to_pylist()) == [
        ("bad_ts_recv", "flags.dbn record 3"), ("maybe_bad_book", "flags.dbn record 2")]


def _with_iid(rec: bytes, iid: int) -> bytes:
    """``rec`` with another instrument id (the record header's u32 at offset 4)."""
    import struct

    return rec[:4] + struct.pack("<I", iid) + rec[8:]


@pytest.mark.parametrize("kind", ["symbol_mapping_records", "unmapped_instruments"])
def test_endless_distinct_instruments_are_bounded_good_books_before_kept(tmp_path, kind):
    """Every SymbolMappingMsg and every unmapped instrument id was remembered without a bound: a file of a few
    hundred MB of distinct ids (the decompressed bound allows 64 GiB) grew the reader's memory to many GB."""
    from microstructure.recorded.dbn import MAX_INSTRUMENTS

    one = mapping_msg(1, "X", T0) if kind == "symbol_mapping_records" else mbp(9, T0 + NS, [level(1, 1, 2, 1)],
                                                                               depth10=False)
    many = b"".join(_with_iid(one, 1000 + i) for i in range(MAX_INSTRUMENTS + 1))
    f = tmp_path / "many.dbn.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress(metadata({"AAPL": 1}, schema="mbp-1")
                                                      + mbp(1, T0, _book(0), depth10=False) + many))
    got = []
    with pytest.raises(FileFormatError, match=f"more than {MAX_INSTRUMENTS:,} instruments"):
        for b in read_dbn([f], 1.0):
            got += b.raw.to_pylist()
    assert [r["symbol"] for r in got] == ["AAPL"]


def test_a_capture_of_mbp_10_and_mbp_1_together_samples_the_deep_book_not_a_flip_to_one_level(tmp_path):
    """A live capture subscribed to mbp-10 and mbp-1 (metadata schema: none) has both records of each event, each
    F_LAST: the slot's snapshot was whichever came last, so a symbol's series flipped between 10 levels and 1. A
    symbol with only MBP-1 keeps its one level."""
    recs = [mbp(1, T0 + 100, _book(0)), mbp(1, T0 + 100, _book(0), depth10=False),
            mbp(2, T0 + 150, _book(5), depth10=False),
            mbp(1, T0 + NS, _book(1), depth10=False), mbp(1, T0 + NS, _book(1))]
    f = write_dbn(tmp_path / "mixed.dbn", {"AAPL": 1, "MSFT": 2}, recs, schema=None, zstd=False)
    rows = sorted((r for b in read_dbn([f], 1.0) for r in b.raw.to_pylist()), key=lambda r: r["received_ts"])
    depth = [(r["symbol"], sum(r[f"bid_px_{k}"] is not None for k in range(1, 11))) for r in rows]
    assert depth == [("AAPL", 10), ("MSFT", 1), ("AAPL", 10)]


@pytest.mark.integration  # the real CLI in a subprocess
def test_a_record_shorter_than_its_type_or_a_symbol_not_utf8_is_one_error_line_exit_2(tmp_path):
    """A record whose length byte is shorter than its type made databento_dbn's Rust code panic (a
    PanicException, a BaseException: a traceback, exit 1, and Rust's panic lines on stderr); a SymbolMappingMsg
    whose symbol is not UTF-8 raised DBNError on reading the symbol (exit 1). Both are a broken file: one
    `error:` line, exit 2, the books before the break kept."""
    good = mbp(1, T0, _book(0)) + mbp(1, T0 + NS, _book(1))
    short = bytes([9]) + mbp(1, T0 + 2 * NS, _book(2))[1:36]  # length 9 words = 36 bytes, an MBP-10 needs 368
    bad_utf8 = mapping_msg(3, "TSLA", T0).replace(b"TSLA", b"\xff\xfeLA")
    for name, tail, says in (("short.dbn", short, "short.dbn after record 2: a record of 36 bytes"),
                             ("utf8.dbn", bad_utf8, "utf8.dbn record 3: ")):
        f = tmp_path / name
        f.write_bytes(metadata({"AAPL": 1}) + good + tail + mbp(1, T0 + 3 * NS, _book(3)))
        d = tmp_path / f"d-{name}"
        r = cli("backfill", f, "--format", "dbn", "--data-dir", d, check=False)
        err = one_error_line(r)
        assert says in err and "the lake kept the 2 rows before it" in err, err
        assert len(lake_rows(d)) == 2


def test_more_symbols_pending_than_max_instruments_keeps_the_books_before_the_refusal(tmp_path):
    """Past MAX_INSTRUMENTS symbols pending a sample the read stops: it raised at once, and every book still
    pending (most of the file's last slot) was lost with it. Good rows are never lost with a bad one."""
    import databento_dbn as dbn

    from microstructure.recorded.dbn import MAX_INSTRUMENTS

    rec = mbp(9, T0 + 1, [level(1, 1, 2, 1)], depth10=False)
    maps = b"".join(bytes(dbn.SymbolMappingMsg(
        publisher_id=1, instrument_id=1000 + i, ts_event=T0, stype_in=dbn.SType.RAW_SYMBOL, stype_in_symbol=f"S{i}",
        stype_out=dbn.SType.INSTRUMENT_ID, stype_out_symbol=str(1000 + i), start_ts=T0, end_ts=T0 + 86_400 * NS))
        for i in range(MAX_INSTRUMENTS))
    books = b"".join(_with_iid(rec, 1000 + i) for i in range(MAX_INSTRUMENTS))
    f = tmp_path / "wide.dbn.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress(metadata({"AAPL": 1}, schema="mbp-1")
                                                      + mbp(1, T0, _book(0), depth10=False) + maps + books))
    got = []
    with pytest.raises(FileFormatError, match=f"more than {MAX_INSTRUMENTS:,} instruments at once"):
        for b in read_dbn([f], 1.0):
            got += b.raw.to_pylist()
    assert "AAPL" in {r["symbol"] for r in got} and len(got) == MAX_INSTRUMENTS
