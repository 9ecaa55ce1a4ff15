"""Benchmark: a live poll on the wall clock, watched from outside. Run on demand; asserts nothing.

    python benchmarks/live.py [--seconds 300] [--interval 1] [--symbols 150]

Starts ``microstructure poll --interval 1`` (150 simulated symbols, online path on) as a user would, and
every second, from another process, reads all symbols from Feast's online store and the lake's newest book
per symbol. Prints the worst online age of a trading (not halted) symbol, how far the online store ever
trailed the lake, and how far the lake's newest book trailed the wall clock, after the first cycles, with the
poller's own skipped slots and RSS. The anchor is the interval itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from rich.console import Console
from rich.table import Table

from microstructure.lake.paths import SNAPSHOTS, LakePaths, with_retry
from microstructure.lake.views import connect
from microstructure.sources.simulated import universe
from microstructure.store.lookup import read_online
from microstructure.store.repo import open_store, registry_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--symbols", type=int, default=150)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp()) / "data"
    cycles = int(args.seconds / args.interval)
    proc = subprocess.Popen([sys.executable, "-m", "microstructure", "poll", "--data-dir", str(d), "--interval",
                             str(args.interval), "--cycles", str(cycles), "--symbols", str(args.symbols), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    syms = universe()[: args.symbols]
    paths = LakePaths(d)
    ages: list[float] = []
    rss: list[float] = []
    behind: list[float] = []
    lags: list[float] = []
    started = None
    while proc.poll() is None:
        time.sleep(1.0)
        if not (registry_dir(d) / "registry.db").exists() or not paths.has(SNAPSHOTS):
            continue
        started = started or time.time()
        if time.time() - started < 10:  # the poller's first cycles load Great Expectations
            continue
        try:
            with open(f"/proc/{proc.pid}/statm") as fh:
                mb = int(fh.read().split()[1]) * 4096 / 2**20
        except OSError:
            break
        if proc.poll() is not None or mb == 0:
            break
        rss.append(mb)
        t_lake = dt.datetime.now(dt.UTC)
        newest = with_retry(lambda: connect(paths).sql(
            "SELECT symbol, max(event_ts) FROM snapshots GROUP BY symbol").fetchall())
        lags.append(max((t_lake - max(t for _, t in newest)).total_seconds(), 0.0))
        store = open_store(d, apply=False)
        rows = read_online(store, syms)
        # A halted book does not change (its event_ts stays put for minutes): its age is the halt's, not ours.
        trading = [r.age_s for r in rows if r.age_s is not None and not r.features.get("halted")]
        ages.append(max(trading, default=float("nan")))
        # Online never trails what the lake holds by more than the cycle in flight.
        lake_newest = dict(newest)
        behind.append(max(((lake_newest[r.symbol] - r.event_ts).total_seconds() for r in rows
                           if r.event_ts is not None and r.symbol in lake_newest), default=0.0))
    summary = json.loads(proc.stdout.read() or "{}")
    table = Table(title=f"live poll: {args.symbols} symbols, --interval {args.interval:g}, {args.seconds} s")
    for c in ("what", "measured", "notes"):
        table.add_column(c, justify="right" if c == "measured" else "left")
    table.add_row("interval (anchor)", f"{args.interval:g} s", "target: online age and lake lag < 2 s")
    table.add_row("max online age, trading symbols", f"{np.nanmax(ages):.2f} s",
                  f"{len(ages)} samples, 1/s; p99 {np.nanpercentile(ages, 99):.2f} s")
    table.add_row("p50 of the per-sample max age", f"{np.nanmedian(ages):.2f} s", "book age (event_ts) at read time")
    table.add_row("max online lag behind the lake", f"{max(behind):.2f} s", "lake's newest event_ts - online's")
    table.add_row("max lag of the lake's newest book", f"{max(lags):.2f} s", "wall clock - newest event_ts")
    table.add_row("cycles / skipped slots", f"{summary.get('cycles')} / {summary.get('skipped_slots')}",
                  "an overrunning cycle skips slots")
    k = max(1, len(rss) // 10)
    table.add_row("poller RSS at 10% / 50% / 100%", f"{rss[k - 1]:.0f} / {rss[len(rss) // 2]:.0f} / {rss[-1]:.0f} MB",
                  f"growth {rss[-1] - rss[k - 1]:+.0f} MB over {len(rss) - k} s")
    table.add_row("online batches rejected", f"{sum(summary.get('online_rejected', {}).values())}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
