"""DuckDB vs Spark local[2] on the same lake at growing sizes, so the cross-over is measured, not guessed:
python benchmarks/spark_vs_duckdb.py [--sizes 1000000,10000000,50000000] [--entities 100000]

For each size: a synthetic lake of 150 symbols at a 2 s cadence (5 book levels, a random-walk mid), written
as the poller writes it (one partition per day, ~1.75M rows a day); then
* the feature build (features.sql for every day, published to the lake): DuckDB vs Spark (sqlglot-transpiled)
* a point-in-time training join of N entity rows through Feast: our DuckDB ASOF store vs Feast's Spark store
Both engines run on this machine's 2 cores; Spark's session start-up is reported apart. Prints a table.
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

import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from microstructure.contract.atomic import atomic_write_parquet
from microstructure.contract.book import SNAPSHOT_SCHEMA
from microstructure.jobs import build as pipeline
from microstructure.lake.paths import SNAPSHOTS, LakePaths

T0 = dt.datetime(2026, 3, 2, 14, 30, tzinfo=dt.UTC)
SYMBOLS = 150
PER_DAY = int(6.5 * 3600 / 2)  # cycles in a session


def write_lake(paths: LakePaths, rows: int) -> None:
    rng = np.random.default_rng(0)
    mids = rng.uniform(10, 500, SYMBOLS)
    cycles = rows // SYMBOLS
    day = 0
    while cycles > 0:
        n = min(cycles, PER_DAY)
        start = T0 + dt.timedelta(days=day)
        t_us = (np.arange(n) * 2_000_000)[:, None] + int(start.timestamp() * 1e6)
        steps = rng.normal(0, 0.0002, (n, SYMBOLS)).cumsum(axis=0)
        mid = mids * np.exp(steps)
        mids = mid[-1]
        spread = np.maximum(0.01, np.round(mid * 0.0004, 2))
        bid = np.round(mid - spread / 2, 2).ravel()
        ask = np.round(bid + spread.ravel(), 2)
        ts = np.broadcast_to(t_us, (n, SYMBOLS)).ravel()
        m = n * SYMBOLS
        cols: dict[str, pa.Array] = {
            "symbol": pa.array(np.tile([f"S{i:03d}" for i in range(SYMBOLS)], n)),
            "event_ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "received_ts": pa.array(ts + 150_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "source": pa.array(np.full(m, "synthetic")),
            "book_levels": pa.array(np.full(m, 5, np.int32)),
            "halted": pa.array(np.zeros(m, bool)),
            "locked": pa.array(np.zeros(m, bool)),
        }
        for i in range(1, 11):
            for side, base, sign in (("bid", bid, -1), ("ask", ask, 1)):
                if i <= 5:
                    cols[f"{side}_px_{i}"] = pa.array(np.round(base + sign * 0.01 * (i - 1), 2))
                    cols[f"{side}_sz_{i}"] = pa.array(rng.integers(1, 500, m).astype(float))
                else:
                    cols[f"{side}_px_{i}"] = pa.nulls(m, pa.float64())
                    cols[f"{side}_sz_{i}"] = pa.nulls(m, pa.float64())
        table = pa.table({f.name: cols[f.name] for f in SNAPSHOT_SCHEMA}).cast(SNAPSHOT_SCHEMA)
        atomic_write_parquet(table, paths.partition(SNAPSHOTS, start.date()) / "part-0.parquet")
        cycles -= n
        day += 1


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000,50000000")
    ap.add_argument("--entities", type=int, default=100_000)
    args = ap.parse_args()
    from microstructure.features import spark
    from microstructure.store.repo import forget_store, open_store
    from microstructure.store.training import training_set

    _, spark_start = timed(spark.session)
    table = Table(title=f"DuckDB vs Spark local[2], 2 cores (Spark session start-up {spark_start:.1f} s, "
                        "not included)", title_justify="left")
    for c in ("snapshot rows", "build: DuckDB", "build: Spark", f"join {args.entities:,}: DuckDB ASOF",
              f"join {args.entities:,}: Spark store"):
        table.add_column(c, justify="right")
    for size in [int(s) for s in args.sizes.split(",")]:
        d = Path(tempfile.mkdtemp()) / "data"
        paths = LakePaths(d)
        write_lake(paths, size)
        _, duck_build = timed(lambda paths=paths: pipeline.build_and_publish(paths, None, None, engine="duckdb"))
        _, spark_build = timed(lambda paths=paths: pipeline.build_and_publish(paths, None, None, engine="spark"))
        rng = np.random.default_rng(1)
        days = len(paths.dates(SNAPSHOTS))
        span = days * 86400
        ents = pd.DataFrame({"symbol": rng.choice([f"S{i:03d}" for i in range(SYMBOLS)], args.entities),
                             "event_timestamp": pd.Timestamp(T0) + pd.to_timedelta(rng.uniform(0, span,
                                                                                              args.entities), "s")})
        os.environ.pop("MICROSTRUCTURE_OFFLINE_STORE", None)
        forget_store(d)
        duck, duck_join = timed(lambda d=d, ents=ents: training_set(open_store(d), ents))
        os.environ["MICROSTRUCTURE_OFFLINE_STORE"] = "spark"
        forget_store(d)
        try:
            sp, spark_join = timed(lambda d=d, ents=ents: training_set(open_store(d), ents))
            assert len(sp) == len(duck)
            spark_txt = f"{spark_join:.1f} s"
        except Exception as e:  # a benchmark reports, it does not stop
            spark_txt = f"failed: {type(e).__name__}"
        os.environ.pop("MICROSTRUCTURE_OFFLINE_STORE", None)
        forget_store(d)
        table.add_row(f"{size:,}", f"{duck_build:.1f} s", f"{spark_build:.1f} s", f"{duck_join:.1f} s", spark_txt)
        Console().print(table)


if __name__ == "__main__":
    main()
