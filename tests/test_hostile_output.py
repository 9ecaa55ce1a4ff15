"""Hostile data meets the outputs and the readers: Rich markup and terminal escapes in symbols and sources,
spreadsheet formulas in CSV exports, Markdown and matplotlib math text in the report, NaN and infinite options and
thresholds, an infinite feature, and rows another process writes into the online store (SQLite, Redis, Feast's
push). Everything real: the CLI as a subprocess, the lake, Feast's stores, Redis at 127.0.0.1:6379."""

from __future__ import annotations

import csv
import datetime as dt
import glob
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from microstructure.contract.text import visible

pytestmark = pytest.mark.integration  # the CLI in subprocesses, Redis; GE run on every feature twice

# Symbols a vendor, a recorded file or a colleague's export could carry. Each was a crash or a terminal
# command before: "[/x]" closes a tag nobody opened (Rich raises MarkupError), "[link=...]" makes a hyperlink,
# ESC [2J clears the screen, ESC ]0; ... BEL retitles the terminal, U+202E reverses the rest of the line, a
# leading "=" is a formula in a spreadsheet, "$\undefined$" is math text that matplotlib cannot parse.
HOSTILE = ["[/x]", "[link=http://evil]x[/link]", "\x1b[2Jclear", "\x1b]0;pwned\x07", "AB\u202eCD",
           '=HYPERLINK("http://evil","x")', "$\\undefined$"]
HOSTILE_SOURCES = ["[/src]", "$\\undefined$"]
UNSERVED = ["[/y]", "\x1b]0;title\x07"]  # asked for, never served: coverage's "no source served" line


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    return {**e, "COLUMNS": "250", **extra}  # wide: no cell is folded over two lines


def cli(*args: object, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                       timeout=600, env=env(**extra))
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


def shown_as_data(stdout: str, raw: str) -> None:
    """``raw`` appears in the output as its visible text, and no terminal control byte got through."""
    assert visible(raw) in stdout, (raw, stdout[-3000:])
    assert not any(c in stdout for c in "\x1b\x07\x9b\u202e"), stdout[-3000:]


def _snapshot_rows(d: Path) -> tuple[pa.Schema, list[dict]]:
    # Any file holding MEGA01's books (after the backfill a partition also holds files of hostile symbols only).
    for f in sorted(glob.glob(str(d / "lake" / "snapshots" / "date=*" / "*.parquet"))):
        t = pq.read_table(f)
        if "date" in t.schema.names:
            t = t.drop_columns(["date"])
        rows = t.filter(pc.equal(t.column("symbol"), "MEGA01")).to_pylist()
        if rows:
            return t.schema, rows
    raise AssertionError("no MEGA01 books in the lake")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run, then MEGA01's books copied under every hostile symbol and source (backfilled, features built),
    and a poll that asks for symbols no source serves."""
    root = tmp_path_factory.mktemp("hostile")
    d = root / "data"
    cli("run", "--data-dir", d, "--cycles", 20, "--symbols", 5, "--json")
    schema, rows = _snapshot_rows(d)
    crafted = [{**r, "symbol": s} for s in HOSTILE for r in rows]
    crafted += [{**r, "symbol": f"SRC{i}", "source": s} for i, s in enumerate(HOSTILE_SOURCES) for r in rows]
    f = root / "hostile.parquet"
    pq.write_table(pa.Table.from_pylist(crafted, schema=schema), f)
    cli("backfill", f, "--format", "snapshots", "--data-dir", d, "--json")
    cli("build-features", "--data-dir", d, "--json")
    p = cli("poll", "--data-dir", d, "--cycles", 1, "--interval", 0, *[a for s in UNSERVED for a in ("--symbol", s)],
            "--no-online", "--json", check=False)
    # none served: exit 1. A piped poll logs a text summary line on stderr first (jobs/logs.py); the verdict is last.
    assert p.returncode == 1 and p.stderr.splitlines()[-1].startswith("not found: "), p.stderr
    assert "\x1b" not in p.stderr and "\x07" not in p.stderr  # the symbols named escaped
    return d


# ---- markup and control characters ---------------------------------------------------------------------------
def test_markup_and_escape_sequences_in_symbols_print_as_text_in_sql(lake):
    p = cli("sql", "SELECT symbol, source, count(*) AS n FROM snapshots GROUP BY ALL ORDER BY 1", "--data-dir", lake)
    for s in [*HOSTILE, *HOSTILE_SOURCES]:
        shown_as_data(p.stdout, s)


def test_a_query_column_named_with_markup_or_escapes_prints_as_text(lake):
    p = cli("sql", 'SELECT 1 AS "[/x]", 2 AS "[link=http://evil]y[/link]", 3 AS "\x1b[2J"', "--data-dir", lake)
    for name in ("[/x]", "[link=http://evil]y[/link]", "\x1b[2J"):
        shown_as_data(p.stdout, name)


def test_hostile_sources_and_unserved_symbols_print_as_text_in_coverage(lake):
    p = cli("coverage", "--data-dir", lake)
    for s in HOSTILE_SOURCES:
        shown_as_data(p.stdout, s)
    line = next(x for x in p.stdout.splitlines() if x.startswith("no source served: "))
    for s in UNSERVED:
        shown_as_data(line, s)


def test_hostile_sources_and_symbols_neither_crash_evaluate_nor_leak_into_the_report(lake, tmp_path):
    p = cli("evaluate", "--data-dir", lake, "--out", tmp_path / "report")
    shown_as_data(p.stdout, "[/src]")
    assert "real [/src]: 1 symbols" in p.stdout  # printed as itself, not swallowed as a closing tag
    md = (tmp_path / "report" / "report.md").read_text()
    # Markdown: the source names are escaped text (no link, no math), control characters visible.
    assert r"\[/src\]" in md and r"\$\\undefined\$" in md
    assert "\x1b" not in md
    assert all((tmp_path / "report" / png).exists() for png in ("coverage.png", "bad_fills_by_tier.png"))


def test_hostile_symbols_print_as_text_in_online(lake):
    p = cli("online", *HOSTILE, "--data-dir", lake, check=False)
    assert p.returncode == 1 and "\x1b" not in p.stderr and "\u202e" not in p.stderr, p.stderr  # offline only
    for s in HOSTILE:
        shown_as_data(p.stdout, s)


def test_hostile_symbols_print_as_text_in_picks(lake, tmp_path):
    f = tmp_path / "picks.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["symbol", "side", "score", "mode"])
        w.writerows([[s, "buy", 0.5, "SAFE"] for s in HOSTILE] + [["MEGA01", "buy", 0.5, "SAFE"]])
    p = cli("picks", "--in", f, "--data-dir", lake, check=False)
    assert p.returncode == 1 and "\x1b" not in p.stderr, p.stderr  # no online book for them: exit 1
    for s in HOSTILE:
        shown_as_data(p.stdout, s)
    rows = json.loads(cli("picks", "--in", f, "--data-dir", lake, "--json", check=False).stdout)["picks"]
    assert [r["symbol"] for r in rows] == [*HOSTILE, "MEGA01"]  # strict JSON carries the raw text


def test_an_escape_sequence_in_an_error_line_is_shown_escaped(tmp_path):
    p = cli("backfill", tmp_path / "\x1b[2Jgone.csv", "--format", "wide", "--data-dir", tmp_path / "d", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "\x1b" not in p.stderr and "\\x1b[2Jgone.csv" in p.stderr


# ---- CSV formula injection ------------------------------------------------------------------------------------
def test_sql_csv_guards_formula_cells_and_keeps_negative_numbers(lake):
    p = cli("sql", "SELECT -1.5 AS neg, '-2+3' AS minus, '@SUM(A1)' AS at, '+1' AS plus, chr(9) || 'x' AS tab, "
                   "'plain' AS ok, 1 AS \"=col\"", "--data-dir", lake, "--csv")
    header, row = list(csv.reader(io.StringIO(p.stdout)))
    assert header == ["neg", "minus", "at", "plus", "tab", "ok", "'=col"]
    assert row == ["-1.5", "'-2+3", "'@SUM(A1)", "'+1", "'\tx", "plain", "1"]
    p = cli("sql", "SELECT DISTINCT symbol FROM snapshots WHERE symbol LIKE '=%'", "--data-dir", lake, "--csv")
    assert p.stdout.splitlines()[1:] == ['"\'=HYPERLINK(""http://evil"",""x"")"']


def test_training_set_csv_guards_a_formula_symbol(lake, tmp_path):
    ts = json.loads(cli("sql", "SELECT max(received_ts) AS t FROM features", "--data-dir", lake, "--json").stdout)
    ents = tmp_path / "e.csv"
    with ents.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["symbol", "event_timestamp", "label"])
        w.writerows([['=HYPERLINK("http://evil","x")', ts[0]["t"], -1], ["MEGA01", ts[0]["t"], -2]])
    out = tmp_path / "o.csv"
    cli("training-set", "--entities", ents, "--out", out, "--data-dir", lake)
    rows = list(csv.DictReader(out.open()))
    assert [r["symbol"] for r in rows] == ["'=HYPERLINK(\"http://evil\",\"x\")", "MEGA01"]
    assert [r["label"] for r in rows] == ["-1", "-2"]  # numbers stay numbers
    assert rows[0]["spread_bps"] not in ("", None)  # the guard is on the output only: the row still joined


# ---- NaN, infinite and out-of-range options and thresholds ----------------------------------------------------
@pytest.mark.parametrize("args", [
    ["online", "MEGA01", "--freshness", "nan"], ["online", "MEGA01", "--freshness", "inf"],
    ["online", "MEGA01", "--freshness", "-1"], ["run", "--step", "nan"], ["poll", "--interval", "inf"],
    ["backfill", "x.csv", "--format", "lobster", "--cadence", "nan"], ["evaluate", "--order-notional", "-inf"],
])
def test_freshness_nan_and_other_non_finite_options_are_refused_at_parse_time(lake, args):
    p = cli(*args, "--data-dir", lake, check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: Invalid value for '--") and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.parametrize("toml", ["[thresholds]\nfreshness_s = nan\n", "[thresholds]\nsafe_max_spread_bps = inf\n",
                                  "[thresholds]\nrisky_imbalance = 2.0\n", "[thresholds]\nmax_gap_pct = -0.1\n",
                                  "[thresholds]\nsafe_min_depth_usd = true\n",
                                  "[profiles.crypto]\nsafe_min_depth_usd = -inf\n", "[thresholds\n"])
def test_a_nan_threshold_in_toml_is_refused(lake, tmp_path, toml):
    (tmp_path / "m.toml").write_text(toml)
    picks = tmp_path / "p.csv"
    picks.write_text("symbol,side,score,mode\nMEGA01,buy,0.5,SAFE\n")
    p = cli("picks", "--in", picks, "--config", tmp_path / "m.toml", "--data-dir", lake, check=False)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


def test_a_nan_threshold_in_the_environment_is_refused(lake, tmp_path):
    picks = tmp_path / "p.csv"
    picks.write_text("symbol,side,score,mode\nMEGA01,buy,0.5,SAFE\n")
    p = cli("picks", "--in", picks, "--data-dir", lake, check=False, MICROSTRUCTURE_FRESHNESS_S="nan")
    assert p.returncode == 2 and "MICROSTRUCTURE_FRESHNESS_S" in p.stderr and p.stderr.count("\n") == 1


# ---- infinite features ----------------------------------------------------------------------------------------
def test_an_infinite_feature_fails_ge_and_the_sql_check_alike():
    """The suite's finiteness (GE ranges with finite bounds) and its SQL compilation agree, feature by feature."""
    from microstructure.checks.ge import Checker
    from microstructure.checks.sql import SqlChecker
    from microstructure.checks.suites import FLOAT_FEATURES
    from microstructure.contract.book import validate
    from microstructure.features.compute import compute_features
    from microstructure.jobs import poll as pipeline
    from microstructure.sources.simulated import SimulatedSource, universe
    from tests.conftest import T0

    src = SimulatedSource(seed=5)
    feats = compute_features(pa.concat_tables(
        [validate(src.poll(universe()[:6], t).raw).clean for t in pipeline.cycle_times(T0, 2.0, 2, 0)]))
    ge, sql = Checker(), SqlChecker()
    assert ge.check("features", feats).success and sql.check("features", feats).success
    for col in FLOAT_FEATURES:
        for v in (float("inf"), float("-inf")):
            vals = feats.column(col).to_pylist()
            vals[2] = v
            t = feats.set_column(feats.schema.get_field_index(col), col, pa.array(vals, pa.float64()))
            a, b = ge.check("features", t), sql.check("features", t)
            assert not a.success and (a.success, sorted(a.failures)) == (b.success, sorted(b.failures)), (col, v)
            _, good, bad = sql.split("features", t)
            assert bad.num_rows == 1 and good.num_rows == t.num_rows - 1, (col, v)


def test_a_1e308_price_never_publishes_an_infinite_feature(lake, tmp_path):
    """mid = (1e308 + 1e308) / 2 overflows to inf: the batch fails the finite check (or the row never gets past
    ingestion), and no published feature is infinite."""
    schema, rows = _snapshot_rows(lake)
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)
    shift = dt.datetime.combine(day, dt.time(12), dt.UTC) - rows[0]["event_ts"]
    huge = [{**r, "symbol": "HUGE1", "event_ts": r["event_ts"] + shift, "received_ts": r["received_ts"] + shift,
             "bid_px_1": 1e308, "ask_px_1": 1e308} for r in rows]
    f = tmp_path / "huge.parquet"
    pq.write_table(pa.Table.from_pylist(huge, schema=schema), f)
    loaded = cli("backfill", f, "--format", "snapshots", "--data-dir", lake, "--json", check=False)
    written = json.loads(loaded.stdout)[0]["written"] if loaded.returncode == 0 else 0
    if written:  # in the lake: the feature build computes mid = inf, and the finite check refuses the batch
        p = cli("build-features", "--data-dir", lake, "--date", day.isoformat(), "--json", check=False)
        batch = json.loads(p.stdout)[0]
        assert p.returncode == 1 and not batch["published"], p.stdout
        assert "expect_column_values_to_be_between(mid)" in "; ".join(batch["reasons"])
    n = json.loads(cli("sql", "SELECT count(*) AS n FROM features WHERE symbol = 'HUGE1' OR isinf(mid) "
                              "OR isinf(depth_dollars)", "--data-dir", lake, "--json").stdout)
    assert n == [{"n": 0}]


# ---- bad rows in the online store -----------------------------------------------------------------------------
def _bad_value_rows() -> dict[str, tuple[str, bytes | str]]:
    from feast.protos.feast.types.Value_pb2 import Value

    return {
        "MEGA01": ("spread_bps", b"\xff\xff\xff"),  # not a protobuf
        "LRG01": ("event_ts", Value(unix_timestamp_val=2**62).SerializeToString()),  # past the year 9999
        "MID01": ("spread_bps", Value(string_val="[/x]\x1b[2J").SerializeToString()),  # a string for a float
        "ILQ01": ("book_levels", "text"),  # TEXT where Feast keeps a BLOB
    }


@pytest.fixture(scope="module")
def bad_sqlite(lake, tmp_path_factory) -> Path:
    """A copy of the lake whose SQLite online store holds a bad row for four of its five symbols, written the
    way another process could: straight into Feast's table."""
    d = tmp_path_factory.mktemp("bad_sqlite") / "data"
    shutil.copytree(lake, d)
    con = sqlite3.connect(d / "feast" / "online_store.db")
    keys = [k for (k,) in con.execute("SELECT DISTINCT entity_key FROM microstructure_order_book")]
    for sym, (name, value) in _bad_value_rows().items():
        key = next(k for k in keys if k.endswith(sym.encode()))
        n = con.execute("UPDATE microstructure_order_book SET value = ? WHERE entity_key = ? AND feature_name = ?",
                        [value, key, name]).rowcount
        assert n == 1
    con.commit()
    con.close()
    return d


def test_a_bad_row_in_the_sqlite_online_store_is_reported_for_its_symbol_only(bad_sqlite):
    p = cli("online", "MEGA01", "LRG01", "MID01", "ILQ01", "SML01", "--data-dir", bad_sqlite, "--freshness", 86400,
            "--json", check=False)
    assert p.returncode == 1, p.stderr  # a row that cannot be served is no row: exit 1 (docs/cli.md "Exit codes")
    rows = json.loads(p.stdout)
    by = {r["symbol"]: r for r in rows}
    for sym in _bad_value_rows():
        assert by[sym]["found"] is False and by[sym]["stale"] is True, by[sym]
        assert by[sym]["error"].startswith("bad online row: ") and by[sym]["spread_bps"] is None
    assert by["SML01"]["found"] is True and by["SML01"]["spread_bps"] > 0 and "error" not in by["SML01"]
    p = cli("online", "MEGA01", "SML01", "MID01", "--data-dir", bad_sqlite, check=False)
    assert "bad online row" in p.stdout and "\x1b" not in p.stdout


def test_a_bad_online_row_never_crashes_picks_for_the_other_symbols(bad_sqlite, tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("symbol,side,score,mode\nMEGA01,buy,0.5,SAFE\nLRG01,sell,0.5,AGGRESSIVE\nMID01,buy,0.5,SAFE\n"
                 "ILQ01,buy,0.5,AGGRESSIVE\nSML01,buy,0.5,AGGRESSIVE\n")
    p = cli("picks", "--in", f, "--data-dir", bad_sqlite, "--json", check=False)
    assert p.returncode == 1, p.stderr  # the bad rows leave their picks without data: exit 1
    out = json.loads(p.stdout)
    assert [r["symbol"] for r in out["picks"]] == ["MEGA01", "LRG01", "MID01", "ILQ01", "SML01"]
    assert all(r["status"] in ("kept", "dropped") for r in out["picks"])  # a verdict for each: none is an error


def test_an_impossible_event_time_pushed_through_feast_is_reported_bad(bad_sqlite, monkeypatch):
    """Feast's push (what ``feast serve``'s /push endpoint calls) accepts a book stamped 9999-12-31: it would be
    "fresh" for ever and, online writes never going back in time, never replaced."""
    import pandas as pd
    from feast.data_source import PushMode

    from microstructure.store.repo import forget_store, open_store

    monkeypatch.delenv("MICROSTRUCTURE_ONLINE_STORE", raising=False)
    feats = pq.read_table(glob.glob(str(bad_sqlite / "lake" / "features" / "date=*" / "*.parquet"))[0]).to_pandas()
    row = feats[feats["symbol"] == "SML01"].tail(1).drop(columns=["date"], errors="ignore")
    row["event_ts"] = pd.Series([dt.datetime(9999, 12, 31, tzinfo=dt.UTC)], index=row.index,
                                dtype="datetime64[us, UTC]")
    row["received_ts"] = pd.Timestamp.now(tz="UTC")
    store = open_store(bad_sqlite)
    try:
        store.push("order_book_push", row, to=PushMode.ONLINE)
    finally:
        forget_store(bad_sqlite)
    rows = {r["symbol"]: r for r in json.loads(cli("online", "SML01", "NOPE", "--data-dir", bad_sqlite,
                                                   "--json", check=False).stdout)}
    assert rows["SML01"]["found"] is False and "9999-12-31" in rows["SML01"]["error"]
    assert rows["NOPE"]["found"] is False and "error" not in rows["NOPE"]


REDIS_DB = 10 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)  # this module's own database
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(scope="module")
def redis_run(tmp_path_factory):
    import redis

    client = redis.Redis(db=REDIS_DB)
    client.flushdb()
    d = tmp_path_factory.mktemp("bad_redis") / "data"
    cli("run", "--data-dir", d, "--cycles", 8, "--symbols", 3, "--json", MICROSTRUCTURE_ONLINE_STORE=REDIS_URL)
    yield d, client
    client.flushdb()


def test_a_bad_row_in_redis_is_reported_for_its_symbol_only(redis_run):
    """Feast's Redis layout: one hash per entity (serialized key + project), a field per feature named by
    mmh3("<view>:<feature>"), the value a serialized Feast Value."""
    from feast.infra.online_stores.helpers import _mmh3

    d, client = redis_run
    keys = list(client.scan_iter(count=1000))
    mega = next(k for k in keys if b"MEGA01" in k)
    lrg = next(k for k in keys if b"LRG01" in k)
    client.hset(mega, _mmh3("order_book:spread_bps"), b"\xff\xff\xff")
    from feast.protos.feast.types.Value_pb2 import Value

    client.hset(lrg, _mmh3("order_book:event_ts"), Value(unix_timestamp_val=2**62).SerializeToString())
    rows = {r["symbol"]: r for r in json.loads(cli("online", "MEGA01", "LRG01", "MID01", "--data-dir", d,
                                                   "--freshness", 86400, "--json", check=False,
                                                   MICROSTRUCTURE_ONLINE_STORE=REDIS_URL).stdout)}
    assert rows["MEGA01"]["found"] is False and "spread_bps" in rows["MEGA01"]["error"]
    assert rows["LRG01"]["found"] is False and "event_ts" in rows["LRG01"]["error"]
    assert rows["MID01"]["found"] is True and rows["MID01"]["spread_bps"] > 0
