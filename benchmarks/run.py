"""Benchmarks, run on demand: python benchmarks/run.py [--quick]. Prints a table; asserts nothing.

* poll cycle for 150 symbols (simulate + validate + write the lake), and the online path per cycle
  (features SQL over the trailing buffer + Feast push)
* feature transform throughput (snapshot rows / s) on a 30-minute, 150-symbol lake
* online lookup latency: 150-symbol batch and single symbol, p50 / p99
* training-set through Feast for 100k and 1M entity rows, next to a plain DuckDB ASOF JOIN
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from microstructure.features.compute import compute_features
from microstructure.jobs.build import build_and_publish
from microstructure.jobs.poll import cycle_times, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths
from microstructure.sources.simulated import SimulatedSource, universe
from microstructure.store.lookup import read_online
from microstructure.store.repo import open_store
from microstructure.store.training import training_set

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (training-set 100k only)")
    args = ap.parse_args()
    rows: list[tuple[str, str, str]] = []
    d = Path(tempfile.mkdtemp()) / "data"
    paths = LakePaths(d)
    syms = universe()

    # 1. Poll cycles without the online path, then with it.
    src = SimulatedSource(seed=1)
    n_cycles = 900  # 30 simulated minutes at 2 s
    stats = poll_cycles(paths, src, syms, cycle_times(T0, 2.0, n_cycles, 0))
    rows.append(("poll cycle, 150 symbols (simulate+validate+write)", f"{stats.seconds / n_cycles * 1000:.1f} ms",
                 f"{n_cycles} cycles, {stats.written:,} snapshots"))
    store = open_store(d)
    from microstructure.checks.sql import SqlChecker

    pub = OnlinePublisher(paths, store, SqlChecker())
    src2 = SimulatedSource(seed=2)
    times = cycle_times(T0 + dt.timedelta(hours=1), 2.0, 60, 0)
    s2 = poll_cycles(paths, src2, syms, times, publisher=pub, publish_every=1)
    rows.append(("poll cycle + online path (SQL, checks, online push)", f"{s2.seconds / 60 * 1000:.0f} ms",
                 "per cycle, checked and pushed every cycle (live mode)"))

    # 2. Transform throughput.
    snaps = duckdb.execute("SELECT * FROM read_parquet(?)", [paths.glob("snapshots")]).to_arrow_table()
    t = time.perf_counter()
    feats = compute_features(snaps)
    el = time.perf_counter() - t
    rows.append(("feature transform (features.sql)", f"{snaps.num_rows / el:,.0f} rows/s",
                 f"{snaps.num_rows:,} rows in {el:.2f} s"))
    build_and_publish(paths, None, None)

    # 3. Online lookups.
    lat150, lat1 = [], []
    for _ in range(50):
        t = time.perf_counter()
        read_online(store, syms)
        lat150.append(time.perf_counter() - t)
        t = time.perf_counter()
        read_online(store, ["MEGA01"])
        lat1.append(time.perf_counter() - t)
    for label, lat in (("online lookup, 150 symbols", lat150), ("online lookup, 1 symbol", lat1)):
        rows.append((label, f"p50 {pct(lat, 50):.1f} ms / p99 {pct(lat, 99):.1f} ms", "50 runs"))

    # 4. Training set vs ASOF JOIN.
    rng = np.random.default_rng(0)
    fts = feats.column("received_ts").to_pandas()
    lo, hi = fts.min(), fts.max()
    for n in ([100_000] if args.quick else [100_000, 1_000_000]):
        ents = pd.DataFrame({
            "symbol": rng.choice(syms, n),
            "event_timestamp": lo + pd.to_timedelta(rng.uniform(0, (hi - lo).total_seconds(), n), unit="s"),
            "label": rng.integers(0, 2, n),
        })
        t = time.perf_counter()
        out = training_set(store, ents)
        feast_s = time.perf_counter() - t
        con = duckdb.connect()
        ents_n = ents.assign(event_timestamp=ents["event_timestamp"].dt.floor("us"))
        con.register("e", ents_n)
        t = time.perf_counter()
        asof = con.execute("SELECT e.*, f.* EXCLUDE (symbol) FROM e ASOF LEFT JOIN read_parquet(?) f "
                           "ON e.symbol = f.symbol AND f.received_ts <= e.event_timestamp",
                           [paths.glob("features")]).df()
        asof_s = time.perf_counter() - t
        assert len(out) == len(asof) == n
        rows.append((f"training-set, {n:,} entity rows", f"Feast (ASOF store) {feast_s:.2f} s / raw ASOF "
                     f"{asof_s:.2f} s", f"ratio {feast_s / asof_s:.2f}x (benchmarks/training.py: vs stock)"))

    rows.append(chain_cycle())

    t = Table(title="microstructure benchmarks", title_justify="left")
    for c in ("what", "measured", "notes"):
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def chain_cycle() -> tuple[str, str, str]:
    """The fallback chain over real HTTP (official clients) against a local server: 130 stocks served by
    Polygon's snapshot call, 20 crypto books by Alpaca's orderbooks call, into the lake."""
    import logging
    import os

    from pytest_httpserver import HTTPServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise

    from microstructure.sources.chain_config import build_chain
    from tests.vendor_server import ALPACA_CRYPTO, POLY_STOCKS, alpaca_books, poly_quote, poly_snapshot

    stocks = [f"S{i:03d}" for i in range(130)]
    crypto = [f"C{i:02d}/USD" for i in range(20)]
    srv = HTTPServer(threaded=True)
    srv.start()
    srv.expect_request(POLY_STOCKS).respond_with_json(poly_snapshot(*[poly_quote(s, 10.0, 10.01) for s in stocks]))
    srv.expect_request(ALPACA_CRYPTO).respond_with_json(alpaca_books(
        {c: ([(100 - i * 0.01, 1.0) for i in range(10)], [(100.01 + i * 0.01, 1.0) for i in range(10)])
         for c in crypto}))
    os.environ.update(POLYGON_API_KEY="bench", APCA_API_KEY_ID="bench", APCA_API_SECRET_KEY="bench",
                      MICROSTRUCTURE_POLYGON_BASE_URL=srv.url_for("/").rstrip("/"),
                      MICROSTRUCTURE_ALPACA_DATA_URL=srv.url_for("/").rstrip("/"))
    chain = build_chain(None, [*stocks, *crypto])
    for k in chain.sources.values():
        k.guard.bucket.rate = k.guard.bucket.burst = k.guard.bucket.tokens = 1e6
    paths = LakePaths(Path(tempfile.mkdtemp()) / "chain")
    n = 50
    st = poll_cycles(paths, chain, [*stocks, *crypto], cycle_times(T0, 2.0, n, 0))
    chain.close()
    srv.stop()
    return ("chain poll cycle, 150 symbols over local HTTP (fetch+validate+write+outcomes)",
            f"{st.seconds / n * 1000:.1f} ms", f"{n} cycles; {dict(st.served_by)}")


if __name__ == "__main__":
    main()
