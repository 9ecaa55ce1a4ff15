"""Benchmark: our lake's append / consistent listing / compaction next to Delta Lake (``deltalake``) doing the
same, to decide whether to move the lake onto a table format. Run on demand; asserts nothing.

    pip install deltalake && python benchmarks/lake_formats.py [--cycles 600]

Per cycle, 150 simulated snapshots are appended (one file / one Delta commit), as a live poll does; then
a reader lists a consistent snapshot of the table (ours: ``partition_files``; Delta: opening the table at its
latest version) and counts it with DuckDB, and the table is compacted (ours: ``compact``; Delta:
``optimize.compact`` + ``vacuum``). Our own write path is the anchor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np
from rich.console import Console
from rich.table import Table

from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA, validate
from microstructure.lake.compaction import compact
from microstructure.lake.paths import SNAPSHOTS, LakePaths
from microstructure.lake.writer import PartitionWriter
from microstructure.sources.simulated import SimulatedSource, universe

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def cycles(n: int) -> list:
    src, syms = SimulatedSource(seed=3), universe()
    return [validate(src.poll(syms, T0 + dt.timedelta(seconds=2 * i)).raw).clean for i in range(n)]


def ms(xs: list[float]) -> str:
    return f"p50 {np.median(xs) * 1000:.1f} / p99 {np.percentile(xs, 99) * 1000:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=600)
    args = ap.parse_args()
    try:
        import deltalake
    except ImportError:
        sys.exit("pip install deltalake to compare against Delta Lake")
    data = cycles(args.cycles)
    tmp = Path(tempfile.mkdtemp())
    rows: list[tuple[str, str, str]] = []

    # ours
    paths = LakePaths(tmp / "ours")
    w = PartitionWriter(paths, SNAPSHOTS, KEY, SNAPSHOT_SCHEMA)
    t = []
    for tbl in data:
        t0 = time.perf_counter()
        w.write(tbl)
        t.append(time.perf_counter() - t0)
    rows.append(("append one cycle (ours, anchor)", ms(t), "dedup + fsync + rename"))
    t = []
    for _ in range(50):
        t0 = time.perf_counter()
        files = paths.files(SNAPSHOTS)
        duckdb.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchall()
        t.append(time.perf_counter() - t0)
    rows.append(("consistent read + count (ours)", ms(t), f"{len(files)} files"))
    t0 = time.perf_counter()
    compact(paths, SNAPSHOTS, T0.date(), KEY, ("symbol", "event_ts"))
    rows.append(("compact the day (ours)", f"{(time.perf_counter() - t0) * 1000:.0f} ms", "one file"))

    # Delta Lake
    uri = str(tmp / "delta")
    t = []
    for tbl in data:
        t0 = time.perf_counter()
        deltalake.write_deltalake(uri, tbl, mode="append")
        t.append(time.perf_counter() - t0)
    rows.append(("append one cycle (Delta)", ms(t), "one commit per cycle, no dedup"))
    t = []
    for _ in range(50):
        t0 = time.perf_counter()
        ds = deltalake.DeltaTable(uri).to_pyarrow_dataset()  # noqa: F841 - scanned by DuckDB below
        duckdb.sql("SELECT count(*) FROM ds").fetchall()
        t.append(time.perf_counter() - t0)
    rows.append(("consistent read + count (Delta)", ms(t), f"version {deltalake.DeltaTable(uri).version()}"))
    t0 = time.perf_counter()
    dtab = deltalake.DeltaTable(uri)
    dtab.optimize.compact()
    dtab.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    rows.append(("compact + vacuum (Delta)", f"{(time.perf_counter() - t0) * 1000:.0f} ms", ""))
    try:
        duckdb.sql("INSTALL delta")
        ext = "installed"
    except Exception as e:
        ext = f"not installable here ({type(e).__name__})"
    rows.append(("DuckDB CLI `delta_scan` extension", ext, "plain `duckdb` users need it for Delta"))
    shutil.rmtree(tmp, ignore_errors=True)

    table = Table(title=f"lake formats: {args.cycles} cycles x 150 symbols")
    for c in ("what", "measured", "notes"):
        table.add_column(c, justify="right" if c == "measured" else "left")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


if __name__ == "__main__":
    main()
