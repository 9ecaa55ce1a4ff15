"""``microstructure coverage`` per source and per poll cycle: how many symbols each source served with L2 in each
cycle of the window (min, median, last), failed calls with the symbols they failed for, and a source that only
failed still shown. Outcomes are written to a real lake (Parquet) and read back through DuckDB."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa

from microstructure.contract.outcomes import OUTCOMES_SCHEMA
from microstructure.jobs.ingest import Ingestor
from microstructure.lake.coverage import coverage as lake_coverage
from microstructure.lake.coverage import cycle_coverage
from microstructure.lake.paths import LakePaths

T0 = dt.datetime(2026, 3, 2, 15, 0, tzinfo=dt.UTC)
# Per cycle: symbol -> (serving source or None, levels). "dead" is tried first for every symbol and always times out.
CYCLES = [
    {"A": ("deep", 10), "B": ("deep", 10), "C": ("deep", 10)},  # deep: 3 with L2
    {"A": ("deep", 10), "B": ("deep", 3), "C": (None, 0)},  # deep: 1 (B thin, C unserved)
    {"A": ("top", 1), "B": ("top", 1), "C": ("top", 1)},  # deep: 0 (fell back to an L1 source)
    {"A": ("deep", 10), "B": ("deep", 10), "C": (None, 0)},  # deep: 2
]


def _outcomes(i: int) -> pa.Table:
    rows = []
    for sym, (src, lv) in CYCLES[i].items():
        tried = "dead: timeout; " + (f"{src}: ok" if src else "deep: unavailable")
        rows.append({"cycle_ts": T0 + dt.timedelta(seconds=2 * i), "symbol": sym, "source": src, "book_levels": lv,
                     "latency_ms": 1.0, "error_class": None if src else "unavailable", "detail": tried})
    return pa.Table.from_pylist(rows, schema=OUTCOMES_SCHEMA)


def _lake(tmp_path) -> LakePaths:
    paths = LakePaths(tmp_path / "data")
    ing = Ingestor(paths)
    for i in range(len(CYCLES)):
        ing.record(_outcomes(i))
    return paths


def test_coverage_gives_each_source_its_l2_symbols_per_cycle(tmp_path):
    cov = lake_coverage(_lake(tmp_path))
    by = {r["source"]: r for r in cov["sources"]}
    per = ("cycles", "l2_cycle_min", "l2_cycle_median", "l2_cycle_last")
    # deep: 3, 1, 0, 2 -> min 0, median (the lower middle of 0 1 2 3) 1, last 2; top: 0, 0, 0, 0.
    assert [by["deep"][k] for k in per] == [4, 0, 1, 2]
    assert [by["top"][k] for k in per] == [4, 0, 0, 0]
    # All sources together: 3, 1, 0, 2 (top's books are L1).
    assert [cov["all_sources_per_cycle"][k] for k in per] == [4, 0, 1, 2]


def test_a_source_that_only_failed_has_a_row_with_its_failed_symbols(tmp_path):
    cov = lake_coverage(_lake(tmp_path))
    by = {r["source"]: r for r in cov["sources"]}
    assert by["dead"]["failed_calls"] == 12 and by["dead"]["failed_symbols"] == 3
    assert [by["dead"][k] for k in ("cycles", "l2_cycle_min", "l2_cycle_last")] == [4, 0, 0]
    assert by["deep"]["failed_calls"] == 2 and by["deep"]["failed_symbols"] == 1  # C, twice unavailable


def test_the_window_selects_cycles(tmp_path):
    cov = lake_coverage(_lake(tmp_path), since=T0 + dt.timedelta(seconds=3))  # the last two cycles
    by = {r["source"]: r for r in cov["sources"]}
    assert [by["deep"][k] for k in ("cycles", "l2_cycle_min", "l2_cycle_median", "l2_cycle_last")] == [2, 0, 0, 2]


def test_one_cycles_coverage_by_source():
    assert cycle_coverage(_outcomes(1)) == {"deep": {"l2": 1, "shallow": 1, "l1_only": 0, "none": 0},
                                            "none": {"l2": 0, "shallow": 0, "l1_only": 0, "none": 1}}


def test_the_cli_prints_and_emits_the_per_cycle_figures(tmp_path):
    from typer.testing import CliRunner

    from microstructure.cli.main import app

    paths = _lake(tmp_path)
    r = CliRunner().invoke(app, ["coverage", "--data-dir", str(paths.data_dir), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert {s["source"]: s["l2_cycle_last"] for s in got["sources"]} == {"dead": 0, "deep": 2, "top": 0}
    r = CliRunner().invoke(app, ["coverage", "--data-dir", str(paths.data_dir)])
    assert r.exit_code == 0 and "symbols with L2 per poll cycle" in r.stdout and "all sources" in r.stdout


def test_a_vendor_error_text_naming_fake_sources_adds_no_source_to_coverage(tmp_path):
    """The vendor's own words follow " | " in an outcome's detail; "reason: forbidden" or "upstream: timeout" in
    them is no source of ours: only the list of sources tried (before " | ") is counted, as metrics.failed_calls
    counts it."""
    paths = LakePaths(tmp_path / "data")
    body = 'HTTP 403 {"reason: forbidden", "upstream: timeout"} see https: docs'
    rows = [{"cycle_ts": T0, "symbol": s, "source": None, "book_levels": 0, "latency_ms": 1.0,
             "error_class": "forbidden", "detail": f"dead: forbidden | {body}"} for s in ("A", "B")]
    Ingestor(paths).record(pa.Table.from_pylist(rows, schema=OUTCOMES_SCHEMA))
    cov = lake_coverage(paths)
    assert [r["source"] for r in cov["sources"]] == ["dead"]
    assert cov["sources"][0]["failed_calls"] == 2 and cov["sources"][0]["failed_symbols"] == 2
