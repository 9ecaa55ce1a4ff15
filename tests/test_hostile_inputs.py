"""Hostile recorded files: each test is an attack on `backfill` (or a reader) and proves it harmless.

Bounds refuse with one `error:` line (exit 2) in bounded memory, measured here as the peak RSS of the CLI run in
a fresh process; implausible times and absurd numbers are quarantined in every format; the quarantine keeps
every rejected row; a file that fails part-way says what the lake kept and where it stopped.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from microstructure.contract.book import BookQuote, table_from_quotes, validate
from tests.deep_pcap import NS, iextp, plu, write_pcap

T = 1_764_000_000  # 2025-11-24 16:00:00 UTC, seconds
T_MS = T * 1000
RSS_BOUND_MB = 400  # the CLI alone peaks ~150-260 MB here; a 500 MB field read into memory would not fit
YEAR_1 = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
YEAR_9999 = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LOBSTER_DAY = dt.datetime(2012, 6, 21, 4, tzinfo=dt.UTC)  # midnight in New York


def _ms(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(milliseconds=1)


# ---- running the CLI ---------------------------------------------------------------------------------------------
_MEASURE = ("import json, resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr,\n"
            "                  'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


class Run:
    def __init__(self, rc: int, out: str, err: str, rss_mb: float) -> None:
        self.returncode, self.stdout, self.stderr, self.rss_mb = rc, out, err, rss_mb

    def json(self) -> dict:
        assert self.returncode == 0, self.stderr
        return json.loads(self.stdout)[0]


def cli(*args: str) -> Run:
    """The real CLI in a fresh process whose only child it is: its peak RSS is the CLI's own."""
    p = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "microstructure", *args],
                       capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(p.stdout)
    return Run(r["rc"], r["out"], r["err"], r["rss_kb"] / 1024)


def backfill(path: Path | list[Path], fmt: str, data: Path, *extra: str) -> Run:
    files = [str(p) for p in (path if isinstance(path, list) else [path])]
    return cli("backfill", *files, "--format", fmt, "--data-dir", str(data), "--json", *extra)


def assert_one_line_refusal(r: Run, *needles: str) -> None:
    """Exit 2, exactly one `error:` line, no traceback, no exception class name, and the words asked for."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not re.search(r"\b\w*(Error|Exception)\b|struct\.error", r.stderr), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def lake_rows(data: Path, dataset: str) -> pa.Table:
    files = sorted((data / "lake" / dataset).glob("date=*/*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") if files else pa.table({})


# ---- file builders -------------------------------------------------------------------------------------------
WIDE_HEAD = "symbol,ts,bid_px_1,bid_sz_1,ask_px_1,ask_sz_1\n"


def wide_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(WIDE_HEAD + "".join(r + "\n" for r in rows))
    return path


def lobster_pair(folder: Path, times: list[str], book_row: str = "5860000,100,5850000,200") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    msg = folder / "AAPL_2012-06-21_34200000_57600000_message_1.csv"
    msg.write_text("".join(f"{t},1,{i + 1},100,5850000,1\n" for i, t in enumerate(times)))
    (folder / "AAPL_2012-06-21_34200000_57600000_orderbook_1.csv").write_text(f"{book_row}\n" * len(times))
    return msg


def gz_lines(path: Path, lines: list[tuple[int, object]]) -> Path:
    with gzip.open(path, "wt") as f:
        for ns, msg in lines:
            f.write(f"{ns} {msg if isinstance(msg, str) else json.dumps(msg)}\n")
    return path


def depth_diff(first: int, last: int, e_ms: int, bids=(), asks=()) -> dict:
    return {"stream": "abcusdt@depth@100ms", "data": {"e": "depthUpdate", "E": e_ms, "s": "ABCUSDT", "U": first,
                                                        "u": last, "b": list(bids), "a": list(asks)}}


SNAP = {"lastUpdateId": 100, "bids": [["10.0", "1"]], "asks": [["10.2", "1"]]}


def l2book(e_ms: int, bid: str = "100", ask: str = "101") -> dict:
    levels = [[{"px": bid, "sz": "1", "n": 1}], [{"px": ask, "sz": "1", "n": 1}]]
    return {"channel": "l2Book", "data": {"coin": "BTC", "time": e_ms, "levels": levels}}


def deep_book(ts: int, sym: str = "ZIEXT") -> list[bytes]:
    return [plu("8", ts, sym, 10.00, 100), plu("5", ts, sym, 10.02, 200)]


# ---- grid emission --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_far_future_message_in_a_tiny_pcap_is_quarantined_not_sampled_to_the_end_of_time(tmp_path):
    pcap = write_pcap(tmp_path / "ff.pcap", [(T * NS, iextp([plu("8", 2**62, "ZIEXT", 10.0, 100)], 1, T * NS))])
    assert pcap.stat().st_size < 210
    r = backfill(pcap, "iex-deep", tmp_path / "d")
    got = r.json()
    assert got["written"] == 0 and got["quarantined"] == {"implausible_time": 1}
    assert r.rss_mb < RSS_BOUND_MB
    q = lake_rows(tmp_path / "d", "quarantine").to_pylist()
    assert [(x["reason"], x["event_ts"], x["origin"]) for x in q] == [("implausible_time", None,
                                                                       "ff.pcap packet 1 message 1")]


@pytest.mark.integration
def test_two_plausible_times_decades_apart_in_a_pcap_are_refused_before_the_grid_is_built(tmp_path):
    early = 800_000_000 * NS  # 1995
    pcap = write_pcap(tmp_path / "span.pcap", [(T * NS, iextp([*deep_book(early), *deep_book(T * NS)], 1, T * NS))])
    r = backfill(pcap, "iex-deep", tmp_path / "d")
    assert_one_line_refusal(r, "MAX_GRID_POINTS", "span.pcap packet 1 message 3", "--cadence", "nothing was loaded")
    assert r.rss_mb < RSS_BOUND_MB
    assert not (tmp_path / "d" / "lake" / "snapshots").exists() or lake_rows(tmp_path / "d", "snapshots").num_rows == 0


@pytest.mark.integration
def test_lobster_sample_at_cadence_2e_7_is_refused_before_reading(tmp_path, lobster_dir):
    r = backfill(lobster_dir, "lobster", tmp_path / "d", "--cadence", "2e-7")
    assert_one_line_refusal(r, "--cadence 2e-07", "MIN_CADENCE_S")
    assert not (tmp_path / "d" / "lake" / "snapshots").exists()


@pytest.mark.integration
def test_lobster_day_at_one_millisecond_is_refused_by_the_grid_cap_before_allocating(tmp_path):
    msg = lobster_pair(tmp_path / "lob", ["1.0", "86399.0"])  # 86.4 M grid times at 1 ms
    r = backfill(msg, "lobster", tmp_path / "d", "--cadence", "0.001")
    assert_one_line_refusal(r, "MAX_GRID_POINTS", "row 2", "nothing was loaded")
    assert r.rss_mb < RSS_BOUND_MB


@pytest.mark.integration
def test_a_million_lobster_messages_with_one_timestamp_are_refused(tmp_path):
    msg = lobster_pair(tmp_path / "lob", ["34200.5"] * 1_000_001)
    r = backfill(msg, "lobster", tmp_path / "d")
    assert_one_line_refusal(r, "MAX_MESSAGES_PER_INSTANT", "row 1000001")
    assert r.rss_mb < RSS_BOUND_MB


def test_iex_messages_with_one_timestamp_past_the_bound_are_refused(tmp_path, monkeypatch):
    from microstructure.recorded import bounds
    from microstructure.recorded.iex_deep import read_iex_deep

    monkeypatch.setattr(bounds, "MAX_MESSAGES_PER_INSTANT", 5)  # our own bound, lowered to keep the capture small
    pcap = write_pcap(tmp_path / "burst.pcap",
                      [(T * NS, iextp([plu("8", T * NS, "ZIEXT", 10 - i / 100, 1) for i in range(6)], 1, T * NS))])
    with pytest.raises(bounds.FileFormatError, match=r"burst.pcap packet 1 message 6: more than 5 messages"):
        read_iex_deep(pcap)


# ---- line, field and decompressed size ------------------------------------------------------------------------
def _gzip_member_repeated(line: bytes, times: int) -> bytes:
    """A gzip bomb built cheaply: one compressed member, concatenated (a valid multi-member gzip stream)."""
    return gzip.compress(line, compresslevel=9) * times


@pytest.mark.integration
def test_gzip_csv_with_one_500_mb_field_is_refused_without_reading_it_into_memory(tmp_path):
    p = tmp_path / "long.csv.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(WIDE_HEAD.encode() + b"AAA,")
        chunk = b"9" * 2**20
        for _ in range(500):
            f.write(chunk)
        f.write(b",10,1,10.1,1\n")
    r = backfill(p, "wide", tmp_path / "d")
    assert_one_line_refusal(r, "long.csv.gz line 2", "MAX_LINE_BYTES")
    assert r.rss_mb < RSS_BOUND_MB


@pytest.mark.integration
def test_csv_field_longer_than_the_field_bound_is_refused_with_its_line(tmp_path):
    p = wide_csv(tmp_path / "field.csv", [f"AAA,{T},10,1,10.1,1", f"{'A' * 5000},{T},10,1,10.1,1"])
    r = backfill(p, "wide", tmp_path / "d")
    assert_one_line_refusal(r, "field.csv line 3", "'symbol'", "MAX_FIELD_BYTES")


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_compression_bomb_is_refused_after_the_ratio_bound_in_bounded_memory(tmp_path, codec):
    # 1 GiB of valid, ignored messages (trades) in ~1 MB: decompression stops at 200x the file's size.
    line = b'1 {"stream":"abcusdt@trade","data":{"p":"' + b"1" * (2**20 - 50) + b'"}}\n'
    member = gzip.compress(line, 9) if codec == "gzip" else pa.compress(line, "zstd", asbytes=True)
    p = tmp_path / f"bomb.{codec}"
    p.write_bytes(member * 1024)
    assert p.stat().st_size < 2**22
    r = backfill(p, "binance-depth", tmp_path / "d")
    assert_one_line_refusal(r, "bomb.", "MAX_COMPRESSION_RATIO", "decompresses to more than")
    assert r.rss_mb < RSS_BOUND_MB


@pytest.mark.integration
def test_json_line_without_end_is_refused_at_the_line_bound(tmp_path):
    p = tmp_path / "noend.gz"
    p.write_bytes(_gzip_member_repeated(b"1" * 2**20, 40))  # 40 MiB, not one newline
    r = backfill(p, "hyperliquid-l2", tmp_path / "d")
    assert_one_line_refusal(r, "noend.gz line 1", "MAX_LINE_BYTES")
    assert r.rss_mb < RSS_BOUND_MB


def test_parquet_row_group_beyond_the_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from microstructure.recorded import bounds, streams, wide

    p = tmp_path / "wide.parquet"
    n = 1000
    pq.write_table(pa.table({"symbol": ["A"] * n, "ts": [T + i for i in range(n)],
                             "bid_px_1": [1.0 + i for i in range(n)], "bid_sz_1": [1.0] * n,
                             "ask_px_1": [2.0 + i for i in range(n)], "ask_sz_1": [1.0] * n}), p)
    monkeypatch.setattr(streams, "MAX_ROW_GROUP_BYTES", 1000)  # our own bound, lowered: a real 1 GiB file is slow
    with pytest.raises(bounds.FileFormatError, match=r"row group 0 .* \(MAX_ROW_GROUP_BYTES\)"):
        list(wide.read_wide(p))


# ---- implausible times, in every recorded format ---------------------------------------------------------------
def _wide(tmp: Path) -> tuple[list[Path], str, int]:
    return [wide_csv(tmp / "w.csv", ["AAA,2025-11-24T16:00:00Z,10,1,10.1,1", "AAA,0001-01-01T00:00:00Z,10,1,10.1,1",
                                     "AAA,9999-12-31T23:59:59Z,10,1,10.1,1"])], "wide", 1


def _snapshots(tmp: Path) -> tuple[list[Path], str, int]:
    good = dt.datetime.fromtimestamp(T, dt.UTC)
    quotes = [BookQuote("AAA", t, t, "test", ((10.0, 1.0),), ((10.1, 1.0),)) for t in (good, YEAR_1, YEAR_9999)]
    p = tmp / "snaps.parquet"
    pq.write_table(table_from_quotes(quotes), p)
    return [p], "snapshots", 1


def _lobster(tmp: Path) -> tuple[list[Path], str, int]:
    secs = [(t - LOBSTER_DAY).total_seconds() for t in (YEAR_1, YEAR_9999)]
    return [lobster_pair(tmp / "lob", ["34200.5", repr(secs[0]), "34201.5", repr(secs[1]), "34202.5"])], "lobster", 2


def _binance(tmp: Path) -> tuple[list[Path], str, int]:
    ns = T_MS * 1_000_000
    p = gz_lines(tmp / "abc.gz", [(ns, SNAP), (ns, depth_diff(101, 101, T_MS, bids=[["10.05", "1"]])),
                                  (ns, depth_diff(102, 102, _ms(YEAR_1), bids=[["10.06", "1"]])),
                                  (ns, depth_diff(103, 103, _ms(YEAR_9999), bids=[["10.07", "1"]])),
                                  (ns, depth_diff(104, 104, T_MS + 2000, bids=[["10.08", "1"]]))])
    return [p], "binance-depth", 2


def _hyperliquid(tmp: Path) -> tuple[list[Path], str, int]:
    ns = T_MS * 1_000_000
    p = gz_lines(tmp / "hl.gz", [(ns, l2book(T_MS)), (ns, l2book(_ms(YEAR_1))), (ns, l2book(_ms(YEAR_9999))),
                                 (ns, l2book(T_MS + 2000))])
    return [p], "hyperliquid-l2", 2


def _iex(tmp: Path) -> tuple[list[Path], str, int]:
    # DEEP times are int64 ns: 1677 and 2262 are the earliest and latest it can say (year 1 and 9999 do not fit).
    msgs = [*deep_book(T * NS), *deep_book(-(2**63)), *deep_book(2**63 - 1), *deep_book(T * NS + NS // 2)]
    return [write_pcap(tmp / "t.pcap", [(T * NS, iextp(msgs, 1, T * NS))])], "iex-deep", 2


@pytest.mark.integration
@pytest.mark.parametrize("build", [_wide, _snapshots, _lobster, _binance, _hyperliquid, _iex],
                         ids=["wide", "snapshots", "lobster", "binance-depth", "hyperliquid-l2", "iex-deep"])
def test_year_0001_and_year_9999_rows_are_quarantined_as_implausible_time(tmp_path, build):
    files, fmt, good = build(tmp_path)
    data = tmp_path / "d"
    got = backfill(files, fmt, data).json()
    n_bad = 4 if fmt == "iex-deep" else 2  # two messages (bid and ask) per implausible IEX book
    assert got["quarantined"] == {"implausible_time": n_bad} and got["written"] == good, got
    q = lake_rows(data, "quarantine")
    assert q.num_rows == n_bad and set(q.column("reason").to_pylist()) == {"implausible_time"}
    assert q.column("event_ts").null_count == n_bad  # no row makes a year-0001 or year-9999 partition
    assert all(o and files[0].name in o for o in q.column("origin").to_pylist())
    parts = {d.name for ds in ("snapshots", "quarantine") for d in (data / "lake" / ds).glob("date=*")}
    assert all("1990-01-01" <= p.split("=")[1] <= f"{dt.date.today().year + 1}" for p in parts), parts
    again = backfill(files, fmt, data).json()  # a re-run adds no quarantine row
    assert again["written"] == 0 and lake_rows(data, "quarantine").num_rows == n_bad


@pytest.mark.integration
def test_year_0001_snapshot_row_never_blocks_building_the_good_dates(tmp_path):
    files, fmt, _ = _snapshots(tmp_path)
    data = tmp_path / "d"
    backfill(files, fmt, data).json()
    p = subprocess.run([sys.executable, "-m", "microstructure", "build-features", "--data-dir", str(data), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert [b["date"] for b in json.loads(p.stdout)] == ["2025-11-24"]


def test_validate_quarantines_implausible_times_from_any_source():
    good = dt.datetime.fromtimestamp(T, dt.UTC)
    quotes = [BookQuote("AAA", t, r, "live", ((10.0, 1.0),), ((10.1, 1.0),))
              for t, r in ((good, good), (YEAR_1, good), (good, YEAR_9999), (dt.datetime(1989, 12, 31, tzinfo=dt.UTC),
                                                                               good))]
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    v = validate(table_from_quotes(quotes), fallback_ts=at)
    assert v.clean.num_rows == 1
    q = v.quarantine.to_pylist()
    assert [x["reason"] for x in q] == ["implausible_time"] * 3
    assert {x["received_ts"] for x in q} == {at} and all(x["event_ts"] is None for x in q)
    assert "event_ts=-62135596800000000" in q[0]["detail"]


# ---- the quarantine keeps every rejected row ---------------------------------------------------------------------
@pytest.mark.integration
def test_three_unparseable_and_four_implausible_wide_rows_are_all_stored(tmp_path):
    rows = [f"AAA,{T},10,1,10.1,1",
            "AAA,garbage,10,1,10.1,1", "AAA,garbage,10,1,10.1,1", "AAA,not a time,10,1,10.1,1",
            "AAA,1970-01-01T00:00:05Z,10,1,10.1,1", "AAA,1970-01-01T00:00:05Z,10,1,10.1,1",
            f"AAA,{4_102_444_800},10,1,10.1,1", "AAA,9999-01-01,10,1,10.1,1"]
    p = wide_csv(tmp_path / "seven.csv", rows)
    data = tmp_path / "d"
    got = backfill(p, "wide", data).json()
    assert got["quarantined"] == {"unparseable_time": 3, "implausible_time": 4}
    q = lake_rows(data, "quarantine")
    assert q.num_rows == 7 == sum(got["quarantined"].values())  # what the summary counts is what is stored
    assert sorted(q.column("origin").to_pylist()) == sorted(f"seven.csv line {i}" for i in range(3, 10))
    backfill(p, "wide", data).json()
    assert lake_rows(data, "quarantine").num_rows == 7  # a re-run of the same file duplicates nothing


@pytest.mark.integration
def test_rows_failing_validation_with_one_time_are_all_stored(tmp_path):
    # Three crossed books for one symbol at one instant: three rejected rows, three stored.
    p = wide_csv(tmp_path / "crossed.csv", [f"AAA,{T},10.2,1,10.1,1"] * 3 + [f"AAA,{T + 1},10,1,10.1,1"])
    data = tmp_path / "d"
    got = backfill(p, "wide", data).json()
    assert got["quarantined"] == {"crossed_book": 3} and got["written"] == 1
    assert lake_rows(data, "quarantine").num_rows == 3


@pytest.mark.integration
def test_quarantine_partition_written_before_origin_existed_still_takes_new_rows(tmp_path):
    from microstructure.contract.book import QUARANTINE_SCHEMA

    data = tmp_path / "d"
    p = wide_csv(tmp_path / "old.csv", ["AAA,garbage,10,1,10.1,1"])
    from microstructure.recorded.batch import file_time

    day = file_time(p).date()
    legacy = pa.Table.from_pylist([{"symbol": "ZZZ", "received_ts": file_time(p), "source": "wide",
                                    "reason": "unparseable_time", "detail": "ts='x'"}],
                                  schema=QUARANTINE_SCHEMA.remove(QUARANTINE_SCHEMA.get_field_index("origin")))
    part = data / "lake" / "quarantine" / f"date={day}"
    part.mkdir(parents=True)
    pq.write_table(legacy, part / "part-legacy.parquet")
    got = backfill(p, "wide", data).json()
    assert got["quarantined"] == {"unparseable_time": 1}
    assert lake_rows(data, "quarantine").num_rows == 2


# ---- absurd numbers ----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_1e308_price_is_quarantined_and_never_gives_an_infinite_mid(tmp_path):
    p = wide_csv(tmp_path / "huge.csv", [f"AAA,{T},1e308,1,1.5e308,1", f"BBB,{T},10,1e300,10.1,1",
                                         f"CCC,{T},1e-300,1,1e-299,1", f"OK,{T},10,1,10.1,1"])
    data = tmp_path / "d"
    got = backfill(p, "wide", data).json()
    assert got["quarantined"] == {"price_out_of_range": 2, "size_out_of_range": 1} and got["written"] == 1
    s = lake_rows(data, "snapshots")
    assert s.column("symbol").to_pylist() == ["OK"]


def test_real_extreme_prices_and_sizes_pass():
    # Berkshire A, BTC in IDR, a meme token at 1e-8 with a trillion-token level: all real, all clean.
    books = [("BRK.A", (700_000.0, 1.0), (700_100.0, 2.0)), ("BTCIDR", (1.6e9, 0.5), (1.61e9, 0.2)),
             ("MEME", (1e-8, 1e12), (1.1e-8, 5e11))]
    v = validate(table_from_quotes([BookQuote(s, dt.datetime.fromtimestamp(T, dt.UTC),
                                              dt.datetime.fromtimestamp(T, dt.UTC), "t", (b,), (a,))
                                    for s, b, a in books]))
    assert v.quarantine.num_rows == 0 and v.clean.num_rows == 3


@pytest.mark.integration
def test_1e308_price_in_a_binance_diff_is_quarantined(tmp_path):
    ns = T_MS * 1_000_000
    p = gz_lines(tmp_path / "abc.gz", [(ns, SNAP), (ns, depth_diff(101, 101, T_MS, asks=[["1e308", "1"]]))])
    got = backfill(p, "binance-depth", tmp_path / "d").json()
    assert got["quarantined"] == {"price_out_of_range": 1} and got["written"] == 0


# ---- malformed messages: one line, exit 2, with the position ---------------------------------------------------
def _bin(tmp: Path, bad: object) -> list[Path]:
    ns = T_MS * 1_000_000
    return [gz_lines(tmp / "bad.gz", [(ns, SNAP), (ns, depth_diff(101, 101, T_MS)), (ns, bad)])]


def _hl(tmp: Path, bad: object) -> list[Path]:
    ns = T_MS * 1_000_000
    return [gz_lines(tmp / "bad.gz", [(ns, l2book(T_MS)), (ns, l2book(T_MS + 1000)), (ns, bad)])]


def _truncated_pcap(tmp: Path) -> list[Path]:
    p = write_pcap(tmp / "cut.pcap", [(T * NS, iextp(deep_book(T * NS), 1, T * NS)),
                                      (T * NS + 1, iextp(deep_book(T * NS + 1), 2, T * NS + 1))])
    p.write_bytes(p.read_bytes()[:-7])
    return [p]


def _huge_record_pcap(tmp: Path) -> list[Path]:
    p = write_pcap(tmp / "huge.pcap", [(T * NS, iextp(deep_book(T * NS), 1, T * NS))])
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, 24 + 8, 2**32 - 1)  # the record's captured length: 4 GiB
    p.write_bytes(bytes(b))
    return [p]


def _cut_message_pcap(tmp: Path) -> list[Path]:
    payload = iextp(deep_book(T * NS), 1, T * NS)
    payload = payload[:40] + struct.pack("<H", 500) + payload[42:]  # the first message claims 500 bytes
    return [write_pcap(tmp / "msg.pcap", [(T * NS, payload)])]


MALFORMED = {
    "binance not json": (lambda t: _bin(t, "{not json"), "binance-depth", "bad.gz line 3"),
    "binance json array": (lambda t: _bin(t, [1, 2]), "binance-depth", "bad.gz line 3"),
    "binance diff without U": (lambda t: _bin(t, {"stream": "abcusdt@depth", "data": {"E": T_MS, "s": "ABCUSDT",
                                                                                       "u": 102}}),
                               "binance-depth", "bad.gz line 3"),
    "binance levels not pairs": (lambda t: _bin(t, depth_diff(102, 102, T_MS, bids=[{"p": 1}])), "binance-depth",
                                 "bad.gz line 3"),
    "binance price not a number": (lambda t: _bin(t, depth_diff(102, 102, T_MS, bids=[["abc", "1"]])),
                                   "binance-depth", "bad.gz line 3"),
    "binance stream not text": (lambda t: _bin(t, {"stream": 5, "data": {}}), "binance-depth", "bad.gz line 3"),
    "binance json nested a million deep": (lambda t: _bin(t, "[" * 1_000_000), "binance-depth", "bad.gz line 3"),
    "binance receive time not a number": (lambda t: [_bad_stamp(t)], "binance-depth", "bad.gz line 1"),
    "hyperliquid levels not a pair": (lambda t: _hl(t, {"channel": "l2Book", "data": {"coin": "BTC", "time": T_MS,
                                                                                       "levels": 5}}),
                                      "hyperliquid-l2", "bad.gz line 3"),
    "hyperliquid level without px": (lambda t: _hl(t, {"channel": "l2Book", "data": {
        "coin": "BTC", "time": T_MS, "levels": [[{"sz": "1"}], []]}}), "hyperliquid-l2", "bad.gz line 3"),
    "hyperliquid time not a number": (lambda t: _hl(t, {"channel": "l2Book", "data": {
        "coin": "BTC", "time": "soon", "levels": [[], []]}}), "hyperliquid-l2", "bad.gz line 3"),
    "lobster word in a row": (lambda t: [lobster_pair(t / "lob", ["34200.5", "34201.x", "34202"])], "lobster",
                              "row 2"),
    "lobster short row": (lambda t: [_short_lobster_row(t)], "lobster", "row 2"),
    "lobster orderbook shorter": (lambda t: [_short_orderbook(t)], "lobster", "more rows"),
    "iex truncated pcap": (_truncated_pcap, "iex-deep", "cut.pcap packet 2"),
    "iex 4 GiB record": (_huge_record_pcap, "iex-deep", "MAX_PACKET_BYTES"),
    "iex message past its packet": (_cut_message_pcap, "iex-deep", "msg.pcap packet 1"),
    "wide row with too few fields": (lambda t: [wide_csv(t / "w.csv", [f"AAA,{T},10,1,10.1,1", "AAA,1"])], "wide",
                                     "w.csv line 3"),
    "wide row not utf-8": (lambda t: [_latin1_csv(t)], "wide", "w.csv line 2"),
    "gzip cut short": (lambda t: [_cut_gzip(t)], "binance-depth", "cut.gz"),
}


def _bad_stamp(tmp: Path) -> Path:
    p = tmp / "bad.gz"
    p.write_bytes(gzip.compress(b"12x {}\n"))
    return p


def _short_lobster_row(tmp: Path) -> Path:
    msg = lobster_pair(tmp / "lob", ["34200.5", "34201", "34202"])
    lines = msg.read_text().splitlines()
    lines[1] = "34201,1,2"
    msg.write_text("\n".join(lines) + "\n")
    return msg


def _short_orderbook(tmp: Path) -> Path:
    msg = lobster_pair(tmp / "lob", ["34200.5", "34201", "34202"])
    book = next((tmp / "lob").glob("*_orderbook_*"))
    book.write_text("5860000,100,5850000,200\n")
    return msg


def _latin1_csv(tmp: Path) -> Path:
    p = tmp / "w.csv"
    p.write_bytes(WIDE_HEAD.encode() + f"\xc5AA,{T},10,1,10.1,1\n".encode("latin-1"))
    return p


def _cut_gzip(tmp: Path) -> Path:
    ns = T_MS * 1_000_000
    data = gzip.compress("".join(f"{ns} {json.dumps(depth_diff(i, i, T_MS))}\n" for i in range(1, 2000)).encode())
    p = tmp / "cut.gz"
    p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.integration
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_is_one_error_line_with_its_position(tmp_path, case):
    build, fmt, where = MALFORMED[case]
    r = backfill(build(tmp_path), fmt, tmp_path / "d")
    assert_one_line_refusal(r, where)


# ---- a file that fails part-way --------------------------------------------------------------------------------
@pytest.mark.integration
def test_mid_file_failure_reports_the_rows_kept_and_the_line_it_stopped_at(tmp_path):
    n = 100_000  # one batch (bounds.BATCH_ROWS) is committed before the bad line is read
    good = [f"AAA,{T + i},10,1,10.1,1" for i in range(n + 10)]
    p = wide_csv(tmp_path / "big.csv", [*good[:n], "AAA,1,2", *good[n:]])
    data = tmp_path / "d"
    r = backfill(p, "wide", data)
    assert_one_line_refusal(r, f"big.csv line {n + 2}: 3 fields where the header has 6",
                            f"the lake kept the {n:,} rows before it ({n:,} new snapshots")
    assert lake_rows(data, "snapshots").num_rows == n  # exactly what the message says
    wide_csv(p, good)  # fixed: the re-run loads the rest and nothing twice
    again = backfill(p, "wide", data).json()
    assert again["written"] == 10 and again["already_in_lake_or_unchanged"] == n
    assert lake_rows(data, "snapshots").num_rows == n + 10
