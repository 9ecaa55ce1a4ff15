"""A replay (``poll --interval 0``) compacts as a live poll does: every date partition stays at or under the bound
(``PARTITION_FILES_MAX``) however long the replay, and every acknowledged row is in the lake exactly once."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from microstructure.contract.book import KEY
from microstructure.jobs.build import DATASETS, PARTITION_FILES_MAX, RollingCompactor
from microstructure.jobs.poll import PollStats
from microstructure.jobs.runner import run_poll
from microstructure.lake.paths import LEVEL_PREFIX, OUTCOMES, SNAPSHOTS, LakePaths, partition_files

START = dt.datetime(2026, 11, 24, 14, 30, tzinfo=dt.UTC)  # the whole replay falls on one UTC date

# Hundreds of cycles through the real writer, DuckDB merges on the compaction thread: seconds.
pytestmark = pytest.mark.integration


def _most_files(paths: LakePaths) -> int:
    return max((len(partition_files(p)) for name, _, _ in DATASETS if paths.dataset(name).exists()
                for p in paths.dataset(name).glob("date=*")), default=0)


def _replay(data_dir: Path, cycles: int, symbols: int) -> tuple[PollStats, int]:
    """A replay through the same entry point as the CLI; the most files any partition held, sampled every cycle."""
    paths = LakePaths(data_dir)
    most = [0]

    def watch(i: int, s: PollStats) -> None:
        most[0] = max(most[0], _most_files(paths))

    stats = run_poll(data_dir, cycles, 0, 2.0, symbols, seed=5, fresh=False, online=False, start=START,
                     on_cycle=watch)
    return stats, max(most[0], _most_files(paths))


def _rows(paths: LakePaths, name: str, key: tuple[str, ...]) -> tuple[int, int]:
    """(rows, distinct keys) of a dataset, read from its consistent file list."""
    files = paths.files(name)
    cols = ", ".join(key)
    n, distinct = duckdb.connect().execute(f"SELECT count(*), count(DISTINCT ({cols})) FROM read_parquet($f)",
                                           {"f": files}).fetchall()[0]
    return n, distinct


def test_a_replay_crossing_the_bound_five_times_stays_under_it_and_keeps_every_row_once(data_dir):
    cycles, symbols = 1000, 2
    stats, most = _replay(data_dir, cycles, symbols)
    paths = LakePaths(data_dir)
    # Without compaction a replay leaves a file per cycle: the outcomes partition alone would hold 1000.
    assert cycles >= 5 * PARTITION_FILES_MAX
    assert stats.cycles == cycles and len(stats.dates) == 1
    assert most <= PARTITION_FILES_MAX
    # The bounded levels did the work (no end-of-day merge ran here): level-1 and level-2 files exist.
    names = [Path(f).name for f in paths.files(OUTCOMES)]
    assert any(n.startswith(LEVEL_PREFIX[2]) for n in names)
    # Every acknowledged snapshot once, and one outcome per cycle and symbol: what the writer acknowledged
    # without any compaction.
    assert _rows(paths, SNAPSHOTS, KEY) == (stats.written, stats.written)
    assert _rows(paths, OUTCOMES, ("symbol", "cycle_ts")) == (cycles * symbols, cycles * symbols)


def test_a_replay_longer_than_the_levels_can_hold_merges_the_date_and_keeps_the_bound(data_dir, monkeypatch):
    # The same rule at a small scale: with levels of 4 and 2 files and a bound of 12, level-2 files alone would
    # pass the bound after ~100 cycles; the compactor then merges the whole date once and the bound holds.
    monkeypatch.setattr(RollingCompactor, "SMALL_MAX", 4)
    monkeypatch.setattr(RollingCompactor, "LEVEL1_MAX", 2)
    monkeypatch.setattr(RollingCompactor, "FILES_MAX", 12)
    monkeypatch.setattr("microstructure.jobs.runner.COMPACT_EVERY", 1)
    cycles, symbols = 300, 1
    stats, most = _replay(data_dir, cycles, symbols)
    paths = LakePaths(data_dir)
    assert most <= 12
    assert _rows(paths, SNAPSHOTS, KEY) == (stats.written, stats.written)
    assert _rows(paths, OUTCOMES, ("symbol", "cycle_ts")) == (cycles * symbols, cycles * symbols)


def test_the_cli_replay_compacts(tmp_path):
    d = tmp_path / "data"
    p = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--interval", "0", "--cycles", "450",
                        "--symbols", "1", "--data-dir", str(d), "--no-online"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    paths = LakePaths(d)
    assert _most_files(paths) <= PARTITION_FILES_MAX
    # 450 cycles leave 450 outcome files uncompacted; the replay's compactor merged them in levels.
    assert sum(len(partition_files(q)) for q in paths.dataset(OUTCOMES).glob("date=*")) < 200
