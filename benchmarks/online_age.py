"""Benchmark: the issue-19 check at scale, on the wall clock. Run on demand; asserts nothing.

    python benchmarks/online_age.py [--symbols 150] [--cycles 60]

Starts ``microstructure poll --interval 1`` and, from another process, reads the lake's newest book per symbol
and then every symbol's online book, about five times a second. Each online answer is compared with the lake as
it was read at least 1.5 s before the online read began: the online book must be no older. Prints how many
comparisons failed, how many would have failed had the online time been Feast's whole second (``event_ts``
floored, what the age was computed from before ``event_ts_us``), and the smallest margin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microstructure.lake.paths import SNAPSHOTS, LakePaths, with_retry
from microstructure.lake.views import connect
from microstructure.sources.simulated import universe
from microstructure.store.lookup import read_online
from microstructure.store.repo import open_store, registry_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=150)
    ap.add_argument("--cycles", type=int, default=60)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp()) / "data"
    proc = subprocess.Popen([sys.executable, "-m", "microstructure", "poll", "--data-dir", str(d), "--interval", "1",
                             "--cycles", str(args.cycles), "--symbols", str(args.symbols), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    syms = universe()[: args.symbols]
    paths = LakePaths(d)
    seen: list[tuple[float, dict]] = []  # (when the lake read finished, newest event_ts per symbol)
    reads = compared = older = older_floored = 0
    margins: list[float] = []
    while proc.poll() is None:
        time.sleep(0.2)
        if not (registry_dir(d) / "registry.db").exists() or not paths.has(SNAPSHOTS):
            continue
        newest = dict(with_retry(lambda: connect(paths).sql(
            "SELECT symbol, max(event_ts) FROM snapshots GROUP BY symbol").fetchall()))
        seen.append((time.time(), newest))
        asked = time.time()
        rows = read_online(open_store(d, apply=False), syms)
        reads += 1
        before = [held for t, held in seen if t <= asked - 1.5]
        if not before:
            continue
        held = before[-1]
        for r in rows:
            if r.symbol in held and r.event_ts is not None:
                compared += 1
                margins.append((r.event_ts - held[r.symbol]).total_seconds())
                older += margins[-1] < 0
                older_floored += r.event_ts.replace(microsecond=0) < held[r.symbol]
    print(json.dumps({"symbols": args.symbols, "cycles": args.cycles, "online_reads": reads, "compared": compared,
                      "older_than_the_lake_1_5_s_before": older, "same_with_whole_seconds": older_floored,
                      "min_margin_s": min(margins, default=None)}))


if __name__ == "__main__":
    main()
