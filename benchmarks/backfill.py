"""Benchmark: streaming backfill of a large wide file in bounded memory. Run on demand; asserts nothing.

    python benchmarks/backfill.py [--rows 10000000]

Writes a wide Parquet file of ``--rows`` 5-level books (150 symbols, one row per symbol every second), then
runs ``microstructure backfill --format wide`` on it in a subprocess and reports its peak RSS (the kernel's
``ru_maxrss`` of the child), next to the peak RSS of a process that only imports the CLI's modules (the
anchor), and the rows per second.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

T0 = 1_764_000_000  # 2025-11-24 16:00 UTC


def write_file(path: Path, rows: int, symbols: int = 150, chunk: int = 1_000_000) -> None:
    rng = np.random.default_rng(1)
    writer = None
    for off in range(0, rows, chunk):
        n = min(chunk, rows - off)
        i = np.arange(off, off + n)
        sym = np.array([f"S{k:03d}" for k in range(symbols)])[i % symbols]
        mid = 100 + (i % symbols) + np.sin(i / 1e5)
        cols = {"symbol": sym, "ts": T0 + i // symbols}
        for lv in range(1, 6):
            cols[f"bid_px_{lv}"] = np.round(mid - 0.01 * lv, 2)
            cols[f"bid_sz_{lv}"] = rng.integers(1, 500, n).astype(float)
            cols[f"ask_px_{lv}"] = np.round(mid + 0.01 * lv, 2)
            cols[f"ask_sz_{lv}"] = rng.integers(1, 500, n).astype(float)
        t = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, t.schema, compression="zstd")
        writer.write_table(t, row_group_size=250_000)
    assert writer is not None
    writer.close()


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024, took, r  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    f = tmp / "wide.parquet"
    write_file(f, args.rows)
    anchor, _, _ = peak_rss_mb([sys.executable, "-c", "import microstructure.cli.main, microstructure.jobs.ingest, "
                                "microstructure.recorded.wide, duckdb, pandas"])
    peak, took, r = peak_rss_mb([sys.executable, "-m", "microstructure", "backfill", str(f), "--format", "wide",
                                 "--data-dir", str(tmp / "data"), "--json"])
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
    table = Table(title=f"streaming backfill: {args.rows:,}-row wide Parquet ({f.stat().st_size / 2**20:.0f} MB)")
    for c in ("what", "measured", "notes"):
        table.add_column(c, justify="right" if c == "measured" else "left")
    table.add_row("peak RSS, importing the modules (anchor)", f"{anchor:.0f} MB", "")
    table.add_row("peak RSS, backfill", f"{peak:.0f} MB", "target < 1.5 GB")
    table.add_row("wall time", f"{took:.0f} s", f"{args.rows / took:,.0f} rows/s")
    table.add_row("result", r.stdout.strip()[:200].replace("\n", " "), "")
    Console().print(table)


if __name__ == "__main__":
    main()
