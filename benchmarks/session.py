"""Benchmark: a whole trading session in bounded memory and files. Run on demand; asserts nothing.

    python benchmarks/session.py [--cycles 11700] [--symbols 150]

Replays a full session (11,700 cycles x 2 s = 6.5 h of market time, 150 symbols) with the online path on
(features per cycle, GE checks and Feast pushes every 30 cycles, as a replay does) and the rolling
compaction a live poll runs. Every simulated minute it samples the process's RSS and the files in the
day's partitions. Prints RSS at 10% / 50% / 100% of the session (the 10% figure, after warm-up, is the
anchor the growth is measured from), the most files a partition held, and rows acknowledged vs in the lake.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from microstructure.checks.ge import Checker
from microstructure.jobs.poll import COMPACT_EVERY, PollStats, cycle_times, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import OUTCOMES, QUARANTINE, SNAPSHOTS, LakePaths, with_retry
from microstructure.lake.views import connect
from microstructure.sources.simulated import SimulatedSource, universe
from microstructure.store.repo import open_store

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=11_700)
    ap.add_argument("--symbols", type=int, default=150)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp()) / "data"
    paths = LakePaths(d)
    syms = universe()[: args.symbols]
    pub = OnlinePublisher(paths, open_store(d), Checker())
    samples: list[tuple[int, float, dict[str, int]]] = []
    max_files = dict.fromkeys((SNAPSHOTS, OUTCOMES, QUARANTINE), 0)

    def on_cycle(i: int, stats: PollStats) -> None:
        if (i + 1) % 30 and i + 1 != args.cycles:  # one sample per simulated minute
            return
        files = {}
        for name in max_files:
            part = paths.partition(name, T0.date())
            n = len(list(part.glob("*.parquet"))) if part.exists() else 0
            files[name] = n
            max_files[name] = max(max_files[name], n)
        samples.append((i + 1, rss_mb(), files))
        if (i + 1) % 1170 == 0:
            print(f"{(i + 1) / args.cycles:4.0%}  cycle {i + 1:>6}  rss {samples[-1][1]:7.1f} MB  files {files}",
                  file=sys.stderr)

    t0 = time.perf_counter()
    stats = poll_cycles(paths, SimulatedSource(seed=7), syms, cycle_times(T0, 2.0, args.cycles, 0),
                          publisher=pub, publish_every=30, on_cycle=on_cycle, compact_every=COMPACT_EVERY)
    wall = time.perf_counter() - t0
    in_lake = with_retry(lambda: connect(paths).sql("SELECT count(*) FROM snapshots").fetchall()[0][0])

    def at(frac: float) -> tuple[int, float]:
        k = max(0, min(len(samples) - 1, round(frac * len(samples)) - 1))
        return samples[k][0], samples[k][1]

    table = Table(title=f"session benchmark: {args.cycles:,} cycles x {len(syms)} symbols (replay, online on)")
    for c in ("what", "measured", "notes"):
        table.add_column(c, justify="right" if c == "measured" else "left")
    c10, r10 = at(0.10)
    c50, r50 = at(0.50)
    c100, r100 = at(1.0)
    table.add_row("RSS at 10% (anchor)", f"{r10:.0f} MB", f"cycle {c10:,}")
    table.add_row("RSS at 50%", f"{r50:.0f} MB", f"cycle {c50:,}")
    table.add_row("RSS at 100%", f"{r100:.0f} MB", f"cycle {c100:,}")
    table.add_row("RSS growth 10% -> 100%", f"{r100 - r10:+.0f} MB", "target < 100 MB")
    for name, n in max_files.items():
        table.add_row(f"max files in the day's {name}", f"{n}", "target <= 200, sampled every minute")
    table.add_row("rows acknowledged", f"{stats.written:,}", f"duplicates skipped {stats.duplicates:,}")
    table.add_row("rows in the lake", f"{in_lake:,}", "equal = nothing lost, nothing twice")
    table.add_row("wall time", f"{wall:.0f} s", f"{wall / args.cycles * 1000:.1f} ms per cycle")
    Console().print(table)


if __name__ == "__main__":
    main()
