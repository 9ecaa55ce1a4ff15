"""What a poll leaves in the lake: every row once, only complete files, and a re-write of the same snapshots
(a re-run, a new process) adds nothing."""

from __future__ import annotations

import duckdb
import pytest

from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes, validate
from microstructure.lake.paths import SNAPSHOTS, LakePaths
from microstructure.lake.views import connect
from microstructure.lake.writer import PartitionWriter
from tests.conftest import book


@pytest.mark.integration  # shares the `polled` run: 200 cycles x 20 symbols through GE and Feast
def test_lake_has_no_duplicates_and_only_complete_files(polled):
    paths = polled["paths"]
    con = connect(paths)
    n, distinct = con.sql("SELECT count(*), count(DISTINCT (symbol, event_ts, source)) FROM snapshots").fetchall()[0]
    assert n == distinct == polled["stats"].written
    assert not list(paths.root.rglob("*.tmp"))
    q = con.sql("SELECT reason, count(*) FROM quarantine GROUP BY ALL").fetchall()
    assert sum(c for _, c in q) == sum(polled["stats"].quarantined.values())


def test_rewriting_the_same_snapshots_adds_nothing(data_dir):
    paths = LakePaths(data_dir)
    clean = validate(table_from_quotes([book("A"), book("B")])).clean
    assert PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA).write(clean).num_rows == 2
    # A fresh writer (a re-run, a new process) reads the keys back from the lake.
    again = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    assert again.write(clean).num_rows == 0
    assert duckdb.sql("SELECT count(*) FROM read_parquet(?)", params=[paths.glob("snapshots")]).fetchall()[0][0] == 2
