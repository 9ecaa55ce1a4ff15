"""Hostile paths, file names and values never become SQL (issue 17, item 2), and a bad date never blocks
building the other dates (item 8, the pipeline half).

Every crafted file name below was checked against the lake code before this fix (file lists built with
``repr``/quotes): each one made that code run its ``COPY ... TO $$marker.csv$$`` and create the marker in the
working directory. A name must hold both quote kinds for ``repr`` to emit ``\\'``, which DuckDB (no backslash
escapes) reads as the string's end; the helper file named after the string's cut-off text (``x"\\``, ``x``)
makes the first, legitimate, half of the statement succeed, so the injected ``COPY`` runs. The readers'
placeholders (``?``) are consumed by the injected statement. Each test proves the marker never appears.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from microstructure.contract.atomic import atomic_write_parquet
from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes
from microstructure.jobs.build import build_and_publish
from microstructure.jobs.market import _has_source
from microstructure.lake.paths import (
    FEATURES,
    FEATURES_QUARANTINE,
    MERGED_PREFIX,
    SNAPSHOTS,
    LakePaths,
    partition_files,
)
from microstructure.lake.views import read_snapshots
from microstructure.lake.writer import PartitionWriter
from tests.conftest import book

START = "2026-11-23T14:30:00+00:00"
DAY = dt.date(2026, 11, 23)
MARKER = "marker.csv"

# reader -> (the crafted .parquet name, the helper files that make the injected statement's first half valid)
WRITER_NAME = "x\"']); COPY (SELECT 42) TO $$marker.csv$$; --.parquet"
CRAFTED = {
    "partition_writer_dedup_load": (WRITER_NAME, ['x"\\']),
    "partition_writer_on_disk_check": (WRITER_NAME, ['x"\\']),
    "read_snapshots": ("x\"']); COPY (SELECT ? AS a, ? AS b) TO $$marker.csv$$; --.parquet", ['x"\\']),
    "has_source": ("x\"']); COPY (SELECT ? AS a) TO $$marker.csv$$; --.parquet", ['x"\\']),
    "compact": ("x'], union_by_name=true)) TO $$a.parquet$$; COPY (SELECT 42) TO $$marker.csv$$; --.parquet", ["x"]),
}


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microstructure", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _poll(data_dir: Path, start: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("poll", "--data-dir", str(data_dir), "--cycles", "3", "--interval", "0", "--symbols", "3",
                "--start", start, "--no-online", "--json", *extra, cwd=cwd)


def _plant(part: Path, name: str, helpers: list[str], like: pa.Table) -> None:
    """A valid Parquet file (a copy of a real row) under the crafted name, and the helpers beside it."""
    part.mkdir(parents=True, exist_ok=True)
    for n in [name, *helpers]:
        pq.write_table(like, part / n)
    assert (part / name).exists()


def _rows(paths: LakePaths) -> tuple[int, int]:
    files = paths.files(SNAPSHOTS)
    return duckdb.connect().execute(
        "SELECT count(*), count(DISTINCT (symbol, event_ts, source)) FROM read_parquet(?)", [files]).fetchall()[0]


@pytest.fixture
def polled_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    p = _poll(d, START, tmp_path, "--seed", "3")
    assert p.returncode == 0, p.stderr
    return d


@pytest.mark.integration
def test_crafted_file_name_in_a_partition_cannot_run_sql_in_the_next_poll(polled_dir, tmp_path):
    paths = LakePaths(polled_dir)
    part = paths.partition(SNAPSHOTS, DAY)
    _plant(part, *CRAFTED["partition_writer_dedup_load"], pq.read_table(paths.files(SNAPSHOTS)[0]).slice(0, 1))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Later cycles of the same day: the writer loads the day's keys from the partition, crafted file included.
    p = _poll(polled_dir, "2026-11-23T15:30:00+00:00", cwd)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["written"] > 0
    assert not (cwd / MARKER).exists()
    assert not (polled_dir / MARKER).exists()


@pytest.mark.integration
def test_crafted_file_name_in_a_partition_cannot_run_sql_in_compact(polled_dir, tmp_path):
    paths = LakePaths(polled_dir)
    part = paths.partition(SNAPSHOTS, DAY)
    assert _poll(polled_dir, "2026-11-23T15:30:00+00:00", tmp_path).returncode == 0  # two files to merge
    name, helpers = CRAFTED["compact"]
    _plant(part, name, helpers, pq.read_table(paths.files(SNAPSHOTS)[0]).slice(0, 1))
    _, distinct = _rows(paths)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    p = _cli("compact", "--data-dir", str(polled_dir), "--json", cwd=cwd)
    assert p.returncode == 0, p.stderr
    assert not (cwd / MARKER).exists()
    assert not (cwd / "a.parquet").exists()
    # The crafted file was merged as the data it is (its row is a duplicate key: dropped), and is gone.
    merged = [f.name for f in partition_files(part)]
    assert len(merged) == 1 and merged[0].startswith(MERGED_PREFIX)
    assert not (part / name).exists()
    assert _rows(paths) == (distinct, distinct)


def _one_row(ts: dt.datetime) -> pa.Table:
    return table_from_quotes([book("AAA", event_ts=ts, source="simulated")]).cast(SNAPSHOT_SCHEMA)


@pytest.mark.parametrize("reader", ["partition_writer_on_disk_check", "read_snapshots", "has_source"])
def test_crafted_file_name_in_a_partition_cannot_run_sql_in_a_lake_reader(reader, tmp_path, monkeypatch):
    paths = LakePaths(tmp_path / "data")
    ts = dt.datetime(2026, 3, 2, 15, tzinfo=dt.UTC)
    part = paths.partition(SNAPSHOTS, ts.date())
    _plant(part, "part-1.parquet", [], _one_row(ts))
    name, helpers = CRAFTED[reader]
    _plant(part, name, helpers, _one_row(ts))
    monkeypatch.chdir(tmp_path)
    if reader == "partition_writer_on_disk_check":
        w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
        # Older than the dedup horizon: checked against the files on disk. Its key is there: nothing written.
        assert w.write(_one_row(ts - dt.timedelta(hours=2))).num_rows == 1
        assert w.write(_one_row(ts)).num_rows == 0
    elif reader == "read_snapshots":
        got = read_snapshots(paths, ts - dt.timedelta(hours=1), ts + dt.timedelta(hours=1))
        assert got.num_rows == 2  # part-1 and the crafted file, read as data
    else:
        assert _has_source(paths, "simulated")
    assert not (tmp_path / MARKER).exists()


@pytest.mark.integration
def test_data_dir_path_with_quotes_and_a_dollar_variable_works_end_to_end(tmp_path):
    # Feast expands $VARS in feature_store.yaml's text: the path's "${...}" must stay literal, never pull in the
    # environment's value (a key).
    secret = "sekrit-value-in-env"
    env = {**os.environ, "MS_TEST_SECRET": secret}
    d = tmp_path / "o'brien \"q\" ${MS_TEST_SECRET} $MS_TEST_SECRET" / "data"
    d.parent.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    steps = [("run", "--cycles", "20", "--symbols", "5"), ("build-features",), ("compact",), ("validate",),
             ("coverage",), ("evaluate",)]
    for step in steps:
        p = _cli(*step, "--data-dir", str(d), "--json", cwd=cwd, env=env)
        assert p.returncode == 0, (step, p.stderr[-2000:])
        assert secret not in p.stdout + p.stderr, step
    builds = json.loads(_cli("build-features", "--data-dir", str(d), "--json", cwd=cwd, env=env).stdout)
    assert builds and all(b["published"] for b in builds)
    from microstructure.store.repo import registry_dir  # the registry is derived state in the user's cache

    assert (registry_dir(d) / "registry.db").exists() and (d / "feast" / "online_store.db").exists()
    assert not any(secret in str(f) for f in tmp_path.rglob("*"))
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([d.parent.name, "cwd"])
    assert list(cwd.iterdir()) == []


def _bad_row(like: pa.Table, ts: dt.datetime) -> pa.Table:
    t = like.slice(0, 1)
    for col in ("event_ts", "received_ts"):
        t = t.set_column(t.schema.get_field_index(col), col, pa.array([ts], SNAPSHOT_SCHEMA.field(col).type))
    return t


@pytest.mark.integration
def test_year_0001_and_9999_rows_from_an_older_version_do_not_block_building_the_other_dates(polled_dir):
    paths = LakePaths(polled_dir)
    like = pq.read_table(paths.files(SNAPSHOTS)[0])
    for ts in (dt.datetime(1, 1, 1, 12, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 12, tzinfo=dt.UTC)):
        # As an older version wrote it: straight into the lake, no reader's quarantine in between.
        atomic_write_parquet(_bad_row(like, ts), paths.partition(SNAPSHOTS, ts.date()) / "part-old.parquet")
    p = _cli("build-features", "--data-dir", str(polled_dir), "--json")
    assert p.returncode == 1, p.stderr  # a date was not published
    got = {b["date"]: b for b in json.loads(p.stdout)}
    assert set(got) == {"0001-01-01", DAY.isoformat(), "9999-12-31"}
    assert got[DAY.isoformat()]["published"] and got[DAY.isoformat()]["features"] > 0
    assert (paths.partition(FEATURES, DAY) / "features.parquet").exists()
    for bad in ("0001-01-01", "9999-12-31"):
        assert not got[bad]["published"] and got[bad]["snapshots"] == 1
        assert got[bad]["reasons"] and "implausible date" in got[bad]["reasons"][0]
        assert not paths.partition(FEATURES, dt.date.fromisoformat(bad)).exists()
        # The reason is kept beside the quarantined batches, where `validate` lists them.
        recorded = list(paths.partition(FEATURES_QUARANTINE, dt.date.fromisoformat(bad)).glob("*.json"))
        assert recorded and "implausible date" in json.loads(recorded[0].read_text())["reasons"][0]
    # Only the good date asked for: it builds, and the exit code says all was published.
    p = _cli("build-features", "--data-dir", str(polled_dir), "--date", DAY.isoformat(), "--json")
    assert p.returncode == 0, p.stderr


def test_an_unreadable_partition_is_reported_for_its_date_and_the_other_dates_publish(tmp_path):
    paths = LakePaths(tmp_path / "data")
    good, bad = dt.date(2026, 3, 5), dt.date(2026, 3, 2)
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    t0 = dt.datetime.combine(good, dt.time(15), dt.UTC)
    w.write(table_from_quotes([book("AAA", event_ts=t0 + dt.timedelta(seconds=i), source="simulated")
                               for i in range(5)]))
    part = paths.partition(SNAPSHOTS, bad)
    part.mkdir(parents=True)
    (part / "part-torn.parquet").write_bytes(b"not a parquet file, a torn write by some other tool")
    res = {r.day: r for r in build_and_publish(paths)}
    assert set(res) == {good, bad}
    assert res[good].published and res[good].features == 5
    assert not res[bad].published and res[bad].reasons[0].startswith("build failed: ")
    assert (paths.partition(FEATURES, good) / "features.parquet").exists()


def test_a_quote_in_a_symbol_or_source_is_data_in_evaluate_filters(tmp_path):
    from microstructure.research import data as evaluate

    paths = LakePaths(tmp_path / "data")
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    t0 = dt.datetime(2026, 3, 2, 15, tzinfo=dt.UTC)
    w.write(table_from_quotes([book(sym, event_ts=t0 + dt.timedelta(seconds=i), source=src)
                               for i in range(4) for sym, src in (("O'B", "x' OR 'a'='a"), ("AAA", "sim"))]))
    assert all(r.published for r in build_and_publish(paths))
    _, feats, _ = evaluate.load(paths, None, ["O'B"])
    assert set(feats["symbol"]) == {"O'B"} and len(feats) == 4  # before: the quote was stripped, nothing matched
    _, feats, _ = evaluate.load(paths, "x' OR 'a'='a")
    assert set(feats["source"]) == {"x' OR 'a'='a"}
    _, feats, _ = evaluate.load(paths, "sim' OR 'a'='a")
    assert len(feats) == 0


def test_sql_checker_thresholds_are_bound_not_sql_text():
    from microstructure.checks.sql import SqlChecker
    from microstructure.checks.suites import MAX_LAG_S, MIN_LAG_S

    c = SqlChecker()
    for kind in ("snapshots", "features"):
        compiled = c._compile(kind, set())
        values = {v for v in compiled.counts_params.values() if isinstance(v, float)}
        assert values  # every suite compares against thresholds...
        if kind == "snapshots":
            assert {MAX_LAG_S, MIN_LAG_S} <= values
        for sql in (compiled.counts_sql, compiled.reasons_sql):
            assert repr(MAX_LAG_S) not in sql and repr(MIN_LAG_S) not in sql and "e+308" not in sql
            assert "expect_" not in sql  # the labels too are parameters
