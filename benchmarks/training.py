"""Point-in-time training joins through Feast's API, next to a raw DuckDB ASOF JOIN of the same data (the anchor),
measured in the same run: python benchmarks/training.py [--sizes 100000,1000000,10000000] [--stock-max N]

* ours: ``microstructure.store.training_set`` -> Feast -> ``AsofDuckDBOfflineStore`` (feature_store.yaml default)
* stock: the same registry and data through Feast's own DuckDB offline store (skipped above --stock-max rows:
  at 10M entity rows it runs for many minutes and needs tens of GB)
* anchor: one ``ASOF LEFT JOIN`` in DuckDB, all features, TTL applied, result as a pandas frame

Prints a table; asserts only that the three agree on the row count and on the values of a sample.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from microstructure import pipeline
from microstructure.lake import LakePaths
from microstructure.sources.simulated import SimulatedSource, universe
from microstructure.store import open_store, store_yaml, training_set

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def stock_store(data_dir: Path):  # type: ignore[no-untyped-def]
    from feast import FeatureStore

    from microstructure.store import FEATURE_REPO

    cfg = yaml.safe_load(store_yaml(data_dir).read_text())
    cfg["offline_store"] = {"type": "duckdb"}
    f = data_dir / "feast" / "stock_feature_store.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=f)


def timed(fn):  # type: ignore[no-untyped-def]
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--stock-max", type=int, default=1_000_000)
    ap.add_argument("--cycles", type=int, default=900, help="lake: cycles of 150 symbols at 2 s")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp()) / "data"
    paths = LakePaths(d)
    syms = universe()
    pipeline.poll(paths, SimulatedSource(seed=1), syms, pipeline.cycle_times(T0, 2.0, args.cycles, 0))
    pipeline.build_and_publish(paths, None, None)
    store = open_store(d)
    stock = stock_store(d)
    src = f"read_parquet('{paths.glob('features')}')"
    n_feat = duckdb.sql(f"SELECT count(*) FROM {src}").fetchall()[0][0]
    lo, hi = duckdb.sql(f"SELECT min(received_ts), max(received_ts) FROM {src}").fetchall()[0]
    span = (hi - lo).total_seconds()
    feature_cols = [c for c in duckdb.sql(f"DESCRIBE SELECT * FROM {src}").df()["column_name"]
                    if c not in ("symbol", "received_ts", "date")]

    table = Table(title=f"training-set through Feast vs a raw ASOF JOIN ({n_feat:,} feature rows, "
                        f"{len(syms)} symbols, {args.cycles} cycles)", title_justify="left")
    for c in ("entity rows", "raw ASOF (anchor)", "ours via Feast", "ours / ASOF", "Feast stock", "stock / ours"):
        table.add_column(c, justify="right")
    rng = np.random.default_rng(0)
    for n in [int(s) for s in args.sizes.split(",")]:
        ents = pd.DataFrame({
            "symbol": rng.choice(syms, n),
            "event_timestamp": (pd.Timestamp(lo) + pd.to_timedelta(rng.uniform(-60, span + 60, n), unit="s")
                                ).floor("us"),
            "label": rng.integers(0, 2, n),
        })
        ents["event_timestamp"] = ents["event_timestamp"].astype("datetime64[us, UTC]")

        def anchor(ents: pd.DataFrame) -> pd.DataFrame:
            con = duckdb.connect()
            con.register("e", ents)
            sel = ", ".join(f"CASE WHEN e.event_timestamp - f.received_ts <= INTERVAL 5 MINUTE THEN f.{c} END "
                            f"AS {c}" for c in feature_cols)
            return con.sql(f"SELECT e.*, {sel} FROM e ASOF LEFT JOIN {src} f "
                           "ON e.symbol = f.symbol AND f.received_ts <= e.event_timestamp").df()

        raw, asof_s = timed(partial(anchor, ents))
        ours, ours_s = timed(partial(training_set, store, ents))
        assert len(ours) == len(raw) == n
        if n <= args.stock_max:
            want, stock_s = timed(partial(training_set, stock, ents))
            cols = [c for c in want.columns if c in ours.columns]
            pd.testing.assert_frame_equal(ours[cols], want[cols], check_dtype=False)
            stock_txt, ratio = f"{stock_s:.2f} s", f"{stock_s / ours_s:.0f}x"
        else:
            stock_txt, ratio = "not run", "-"
        table.add_row(f"{n:,}", f"{asof_s:.2f} s", f"{ours_s:.2f} s", f"{ours_s / asof_s:.2f}x", stock_txt, ratio)
    Console().print(table)


if __name__ == "__main__":
    main()
