"""Point-in-time training joins through Feast's API, next to a raw DuckDB ASOF JOIN of the same data (the anchor),
measured in the same run, and the peak memory of a 10M-row ``training-set``:

    python benchmarks/training.py [--sizes 100000,1000000] [--repeat 3] [--stock-max N] [--rss-rows 10000000]

For each size, twice (median of ``--repeat`` runs, anchor and ours interleaved, so a busy machine slows both):

* frame: ``microstructure.store.training.training_set`` (entity DataFrame -> Feast -> ``AsofDuckDBOfflineStore``
  -> DataFrame)
  against one ``ASOF LEFT JOIN`` in DuckDB selecting the same columns with the same TTL (5 min), result as a frame;
* file: ``write_training_set`` (entity Parquet -> batches through Feast -> Parquet, what the CLI runs) against the
  same ASOF JOIN reading the entity Parquet and writing Parquet (zstd) from DuckDB.

``stock``: the same registry and data through Feast's own DuckDB offline store (frame only, up to --stock-max rows:
at 10M entity rows it runs for many minutes and needs tens of GB).

``--rss-rows``: writes an entity Parquet of that many rows and runs ``microstructure training-set`` on it in a
subprocess; its peak RSS comes from ``getrusage(RUSAGE_CHILDREN)`` of a wrapper whose only child it is.

Asserts that ours, the anchor and stock agree on the row count, and ours and stock on every value.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from rich.console import Console
from rich.table import Table

from microstructure.jobs.build import build_and_publish
from microstructure.jobs.poll import cycle_times, poll_cycles
from microstructure.lake.paths import LakePaths
from microstructure.sources.simulated import SimulatedSource, universe
from microstructure.store.repo import open_store, store_yaml
from microstructure.store.training import training_set, write_training_set

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)

_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "stderr": p.stderr[-2000:], "s": time.perf_counter() - t,
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def stock_store(data_dir: Path):  # type: ignore[no-untyped-def]
    from feast import FeatureStore

    from microstructure.store.repo import FEATURE_REPO

    cfg = yaml.safe_load(store_yaml(data_dir).read_text())
    cfg["offline_store"] = {"type": "duckdb"}
    f = data_dir / "feast" / "stock_feature_store.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=f)


def timed(fn, *args):  # type: ignore[no-untyped-def]
    gc.collect()
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def entities(rng: np.random.Generator, syms: list[str], lo: Any, span: float, n: int) -> pd.DataFrame:
    ents = pd.DataFrame({
        "symbol": rng.choice(syms, n),
        "event_timestamp": (pd.Timestamp(lo) + pd.to_timedelta(rng.uniform(-60, span + 60, n), unit="s")
                            ).floor("us"),
        "label": rng.integers(0, 2, n),
    })
    ents["event_timestamp"] = ents["event_timestamp"].astype("datetime64[us, UTC]")
    return ents


class Anchor:
    """The raw join: every feature column of the lake (the view's 21), TTL 5 min, no tie rule, no order."""

    def __init__(self, features_glob: str, feature_cols: list[str]) -> None:
        self.src = features_glob
        # Our own lake's column names (constants of the schema), quoted; paths are bound parameters.
        sel = ", ".join(f'CASE WHEN e.event_timestamp - f.received_ts <= INTERVAL 5 MINUTE THEN f."{c}" END AS "{c}"'
                        for c in feature_cols)
        self.tail = (f"SELECT e.*, {sel} FROM {{e}} e ASOF LEFT JOIN read_parquet($src) f "
                     "ON e.symbol = f.symbol AND f.received_ts <= e.event_timestamp")

    def frame(self, ents: pd.DataFrame) -> pd.DataFrame:
        con = duckdb.connect()
        con.register("ents", ents)
        return con.sql(self.tail.format(e="ents"), params={"src": self.src}).df()

    def file(self, ents_path: Path, out: Path) -> None:
        con = duckdb.connect()
        con.sql(self.tail.format(e="read_parquet($ents)"), params={"src": self.src, "ents": str(ents_path)}) \
           .to_parquet(str(out), compression="zstd")


def peak_rss(ents_path: Path, data_dir: Path, out: Path) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "microstructure", "training-set",
                        "--entities", str(ents_path), "--out", str(out), "--data-dir", str(data_dir)],
                       capture_output=True, text=True, check=True)
    r = json.loads(p.stdout)
    if r["rc"] != 0:
        raise SystemExit(f"training-set failed: {r['stderr']}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is shown)")
    ap.add_argument("--stock-max", type=int, default=1_000_000)
    ap.add_argument("--rss-rows", type=int, default=10_000_000, help="0: skip the peak-RSS run")
    ap.add_argument("--cycles", type=int, default=900, help="lake: cycles of 150 symbols at 2 s")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # ~1 GB of entity and output files at 10M rows
        run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    d = root / "data"
    paths = LakePaths(d)
    syms = universe()
    poll_cycles(paths, SimulatedSource(seed=1), syms, cycle_times(T0, 2.0, args.cycles, 0))
    build_and_publish(paths, None, None)
    store = open_store(d)
    stock = stock_store(d)
    src = paths.glob("features")
    con = duckdb.connect()
    n_feat, lo, hi = con.execute("SELECT count(*), min(received_ts), max(received_ts) FROM read_parquet(?)",
                                 [src]).fetchall()[0]
    span = (hi - lo).total_seconds()
    feature_cols = [c for c in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [src]).df()["column_name"]
                    if c not in ("symbol", "received_ts", "date")]
    anchor = Anchor(src, feature_cols)

    table = Table(title=f"training-set through Feast vs a raw ASOF JOIN ({n_feat:,} feature rows, {len(syms)} "
                        f"symbols, {args.cycles} cycles; median of {args.repeat})", title_justify="left")
    for c in ("entity rows", "path", "raw ASOF (anchor)", "ours via Feast", "ours / ASOF", "Feast stock",
              "stock / ours"):
        table.add_column(c, justify="right")
    rng = np.random.default_rng(0)
    for n in [int(s) for s in args.sizes.split(",")]:
        ents = entities(rng, syms, lo, span, n)
        ents_path = root / f"entities-{n}.parquet"
        ents.to_parquet(ents_path)
        a_s, o_s, af_s, of_s = [], [], [], []
        for _ in range(args.repeat):
            raw, s = timed(anchor.frame, ents)
            a_s.append(s)
            ours, s = timed(training_set, store, ents)
            o_s.append(s)
            assert len(ours) == len(raw) == n
            del raw
            _, s = timed(anchor.file, ents_path, root / "anchor.parquet")
            af_s.append(s)
            _, s = timed(write_training_set, store, ents_path, root / "ours.parquet")
            of_s.append(s)
            assert pq.ParquetFile(root / "ours.parquet").metadata.num_rows == n
            assert pq.ParquetFile(root / "anchor.parquet").metadata.num_rows == n
        stock_txt, ratio = "not run", "-"
        if n <= args.stock_max:
            want, stock_s = timed(training_set, stock, ents)
            pd.testing.assert_frame_equal(ours, want, check_dtype=False)
            stock_txt, ratio = f"{stock_s:.2f} s", f"{stock_s / statistics.median(o_s):.0f}x"
            del want
        from_file = pd.read_parquet(root / "ours.parquet")
        pd.testing.assert_frame_equal(from_file, ours, check_dtype=False)
        del ours, from_file
        a, o, af, of = map(statistics.median, (a_s, o_s, af_s, of_s))
        table.add_row(f"{n:,}", "frame", f"{a:.2f} s", f"{o:.2f} s", f"{o / a:.2f}x", stock_txt, ratio)
        table.add_row("", "file", f"{af:.2f} s", f"{of:.2f} s", f"{of / af:.2f}x", "", "")
    Console().print(table)

    if args.rss_rows:
        big = root / "entities-rss.parquet"
        with pq.ParquetWriter(big, pa.Schema.from_pandas(entities(rng, syms, lo, span, 1), preserve_index=False)) \
                as w:
            for i in range(0, args.rss_rows, 1_000_000):
                w.write_table(pa.Table.from_pandas(entities(rng, syms, lo, span, min(1_000_000, args.rss_rows - i)),
                                                   preserve_index=False))
        r = peak_rss(big, d, root / "rss.parquet")
        _, a10 = timed(anchor.file, big, root / "anchor.parquet")
        Console().print(f"training-set, {args.rss_rows:,} entity rows (Parquet in and out, CLI): peak RSS "
                        f"{r['peak'] / 2**30:.2f} GiB, {r['s']:.1f} s (process start included); the raw ASOF "
                        f"JOIN file to file: {a10:.1f} s")


if __name__ == "__main__":
    main()
