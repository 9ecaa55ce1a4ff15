"""Compaction: it merges a partition's files into one sorted file, and an interrupted one is recovered; beside
readers and writers, and with kill -9 at every stage of it, readers never fail, never count a row twice, never
miss one; the next compaction finishes what a crashed one began."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest

from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, table_from_quotes, validate
from microstructure.jobs import poll as pipeline
from microstructure.lake.compaction import compact, recover
from microstructure.lake.paths import SNAPSHOTS, STAGING, LakePaths, partition_files, with_retry
from microstructure.lake.views import connect, read_snapshots
from microstructure.lake.writer import PartitionWriter
from microstructure.sources.simulated import SimulatedSource, universe
from tests.conftest import book

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)
STAGES = ["after_plan", "after_merged_written", "after_commit", "during_cleanup", "before_gen_bump"]


def _fill(d: Path, cycles: int, start: dt.datetime = T0, source: SimulatedSource | None = None) -> SimulatedSource:
    src = source or SimulatedSource(seed=5)
    pipeline.poll_cycles(LakePaths(d), src, universe()[:20], pipeline.cycle_times(start, 2.0, cycles, 0))
    return src


def test_compaction_merges_sorts_and_survives_a_crash(data_dir):
    paths = LakePaths(data_dir)
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    for i in range(5):
        w.write(validate(table_from_quotes(
            [book(s, event_ts=T0 + dt.timedelta(seconds=i)) for s in ("B", "A")])).clean)
    part = paths.partition(SNAPSHOTS, T0.date())
    before = sorted(part.glob("*.parquet"))
    assert len(before) == 5
    # Simulate a crash after the commit point: merged file in place, old files not yet deleted.
    assert compact(paths, SNAPSHOTS, T0.date(), KEY, ("symbol", "event_ts")) == (5, 1)
    t = duckdb.sql(f"SELECT symbol, event_ts FROM read_parquet('{part}/*.parquet')").fetchall()
    assert len(t) == 10 and t == sorted(t)
    # An interrupted compaction before its commit point leaves the partition as it was.
    staging = part / ".compacting"
    staging.mkdir()
    (staging / "plan.json").write_text('{"merged": "compacted-x.parquet", "replaces": ["nope.parquet"]}')
    recover(part)
    assert not staging.exists() and len(list(part.glob("*.parquet"))) == 1


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("many") / "d"
    _fill(d, 80)
    return d


class Readers:
    """Reader threads the way our readers read: build-features' read_snapshots and the sql views."""

    def __init__(self, paths: LakePaths) -> None:
        self.paths = paths
        self.errors: list[str] = []
        self.counts: list[tuple[int, int]] = []  # (rows, distinct keys) per read
        self.stop = threading.Event()
        self.reads = {"build": 0, "sql": 0}  # reads done (or failed), per kind
        self.progress = threading.Condition()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in self.reads]

    def _run(self, kind: str) -> None:
        lo, hi = dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
        while not self.stop.is_set():
            try:
                if kind == "build":
                    t = read_snapshots(self.paths, lo, hi)
                    keys = set(zip(t.column("symbol").to_pylist(), t.column("event_ts").to_pylist(), strict=True))
                    self.counts.append((t.num_rows, len(keys)))
                else:
                    # What `microstructure sql` does: views over a consistent listing, listed again if a
                    # file vanished under the query.
                    self.counts.append(with_retry(lambda: connect(self.paths).sql(
                        "SELECT count(*), count(DISTINCT (symbol, event_ts, source)) FROM snapshots").fetchall()[0]))
            except Exception as e:  # every failure is a finding
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
            with self.progress:
                self.reads[kind] += 1
                self.progress.notify_all()

    def read_more(self, n: int) -> None:
        """Return once each kind of reader has read ``n`` more times (a count of reads, not a stretch of time)."""
        with self.progress:
            target = {k: v + n for k, v in self.reads.items()}
            done = self.progress.wait_for(lambda: all(self.reads[k] >= v for k, v in target.items()), timeout=120)
        assert done, f"the readers stopped reading: {self.reads}"

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _truth(paths: LakePaths) -> int:
    t = read_snapshots(paths, dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    return t.num_rows


@pytest.mark.integration  # the CLI's compaction in a subprocess, killed at each stage
@pytest.mark.parametrize("stage", STAGES)
def test_kill_minus_nine_at_every_stage_of_compaction_with_readers_running(small_files, tmp_path, stage):
    d = tmp_path / "d"
    shutil.copytree(small_files, d)
    paths = LakePaths(d)
    n = _truth(paths)
    before = len(list(paths.partition(SNAPSHOTS, T0.date()).glob("*.parquet")))
    assert before >= 60 and n > 1000
    env = {**os.environ, "MICROSTRUCTURE_CRASH_AT": stage}
    with Readers(paths) as readers:
        r = subprocess.run([sys.executable, "-m", "microstructure", "compact", "--data-dir", str(d)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == -9, (r.returncode, r.stderr)  # really killed at that stage
        # Readers go on against the crashed state: each kind reads it twice more.
        readers.read_more(2)
    assert readers.counts, "readers never read"
    assert readers.errors == []
    assert all(c == (n, n) for c in readers.counts), sorted(set(readers.counts))
    # The next compaction finishes (or discards) the crashed one: one file, every row, once.
    with Readers(paths) as readers2:
        r = subprocess.run([sys.executable, "-m", "microstructure", "compact", "--data-dir", str(d)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert readers2.errors == [] and all(c == (n, n) for c in readers2.counts)
    part = paths.partition(SNAPSHOTS, T0.date())
    assert len(partition_files(part)) == 1 and len(list(part.glob("*.parquet"))) == 1
    assert not (part / STAGING).exists()
    assert _truth(paths) == n


@pytest.mark.integration  # a poller, a rolling compactor and readers, all at once, for 300 cycles
def test_concurrent_writer_compactor_and_readers(tmp_path):
    """A poller appends, rolling compaction merges, readers read, all at once: no reader error, no row twice,
    and a reader never sees fewer rows than an earlier read (nothing vanishes, even for a moment)."""
    d = tmp_path / "d"
    src = _fill(d, 10)
    paths = LakePaths(d)
    seen: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        lo, hi = dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
        while not stop.is_set():
            try:
                t = read_snapshots(paths, lo, hi)
                keys = set(zip(t.column("symbol").to_pylist(), t.column("event_ts").to_pylist(), strict=True))
                if len(keys) != t.num_rows:
                    errors.append(f"double count: {t.num_rows} rows, {len(keys)} keys")
                seen.append(t.num_rows)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    def compact_loop() -> None:
        while not stop.is_set():
            for level in (0, 1, None):
                compact(paths, SNAPSHOTS, T0.date(), ("symbol", "event_ts", "source"),
                             ("symbol", "event_ts"), level=level, min_files=2)
                stop.wait(0.01)

    threads = [threading.Thread(target=read), threading.Thread(target=compact_loop)]
    for t in threads:
        t.start()
    try:
        for k in range(15):  # a poller's pace: bursts of cycles with pauses between them
            _fill(d, 20, T0 + dt.timedelta(seconds=20 + 40 * k), src)
            stop.wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert len(seen) > 10
    assert all(b >= a for a, b in itertools.pairwise(seen)), "a read saw fewer rows than the one before"
    assert seen[-1] <= _truth(paths)
