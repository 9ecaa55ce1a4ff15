"""The serving hot paths, each next to its anchor measured in the same run:
python benchmarks/serving.py [--readers 4] [--redis redis://127.0.0.1:6379/15]

* online read, 150 symbols, all features and the five scoring features: ours (``read_online``) vs stock
  ``get_online_features``, on SQLite and on Redis (p50 / p99 over 500 reads, GC on as in a real process, then
  with ``gc.freeze()`` after warm-up)
* many readers: N processes reading the scoring features from Redis while a poller pushes every second
* one live cycle, 150 symbols (features SQL, SQL-compiled checks, online push), against GE's own check
* the feature build (features.sql) in rows/s vs a pandas reference of the same features

Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

T0 = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)


def pct(xs: list[float]) -> str:
    a = np.array(xs) * 1000
    return f"{np.percentile(a, 50):.2f} / {np.percentile(a, 99):.2f} ms"


def lat(fn, n: int = 500) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(30):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def filled_store(d: Path, redis_url: str | None):  # type: ignore[no-untyped-def]
    """A data dir whose online store holds 150 symbols (pushed by the real online path)."""
    from microstructure.checks.sql import SqlChecker
    from microstructure.jobs.poll import cycle_times, poll_cycles
    from microstructure.jobs.publisher import OnlinePublisher
    from microstructure.lake.paths import LakePaths
    from microstructure.sources.simulated import SimulatedSource, universe
    from microstructure.store.repo import clear_online, forget_store, open_store

    if redis_url:
        os.environ["MICROSTRUCTURE_ONLINE_STORE"] = redis_url
        clear_online()
    else:
        os.environ.pop("MICROSTRUCTURE_ONLINE_STORE", None)
    forget_store(d)
    paths = LakePaths(d)
    store = open_store(d)
    pub = OnlinePublisher(paths, store, SqlChecker())
    poll_cycles(paths, SimulatedSource(seed=1), universe(), cycle_times(T0, 2.0, 20, 0), publisher=pub,
                  publish_every=1)
    return store


def reads(table: Table, label: str, store) -> None:  # type: ignore[no-untyped-def]
    from microstructure.sources.simulated import universe
    from microstructure.store.lookup import read_online

    syms = universe()
    ents = [{"symbol": s} for s in syms]
    for service in ("order_book_all", "scoring"):
        svc = store.get_feature_service(service)
        stock = lat(lambda svc=svc: store.get_online_features(features=svc, entity_rows=ents).to_dict())
        ours = lat(lambda service=service: read_online(store, syms, service=service))
        gc.freeze()
        stock_f = lat(lambda svc=svc: store.get_online_features(features=svc, entity_rows=ents).to_dict())
        ours_f = lat(lambda service=service: read_online(store, syms, service=service))
        gc.unfreeze()
        what = "all 21 features" if service == "order_book_all" else "5 scoring features"
        table.add_row(f"{label}, 150 symbols, {what}", pct(stock), pct(ours), pct(stock_f), pct(ours_f))


def reader(url: str, data_dir: str, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    os.environ["MICROSTRUCTURE_ONLINE_STORE"] = url
    from microstructure.sources.simulated import universe
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    store = open_store(Path(data_dir), apply=False)
    syms = universe()
    lat_s, errors, stale = [], 0, 0
    for _ in range(20):
        read_online(store, syms, service="scoring")
    gc.freeze()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            rows = read_online(store, syms, service="scoring")
            stale += sum(r.stale for r in rows)
        except Exception:
            errors += 1
            continue
        lat_s.append(time.perf_counter() - t)
    out.put((lat_s, errors, stale))


def many_readers(url: str, d: Path, n: int, seconds: float = 20.0) -> tuple[str, str, str]:
    """N reader processes while this process polls live (1 s cycles) and pushes every cycle."""
    from microstructure.checks.sql import SqlChecker
    from microstructure.jobs.poll import LiveClock, poll_cycles
    from microstructure.jobs.publisher import OnlinePublisher
    from microstructure.lake.paths import LakePaths
    from microstructure.sources.simulated import SimulatedSource, universe
    from microstructure.store.repo import open_store

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=reader, args=(url, str(d), seconds, q)) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(6)  # the readers import Feast (~5 s) before they start their clock
    paths = LakePaths(d / "live")
    src = SimulatedSource(seed=9)
    src.live = True
    pub = OnlinePublisher(paths, open_store(d), SqlChecker())
    stats = poll_cycles(paths, src, universe(), LiveClock(1.0, cycles=int(seconds)), publisher=pub)
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    lat_all = [x for r in results for x in r[0]]
    errors = sum(r[1] for r in results)
    return (f"{n} reader processes (Redis, scoring, 150 symbols) while pushing every 1 s",
            f"{len(lat_all):,} reads, {errors} errors, pushed {stats.online_pushed:,} rows", pct(lat_all))


def cycle(table: Table) -> None:
    from microstructure.checks.ge import Checker
    from microstructure.checks.sql import SqlChecker
    from microstructure.contract.book import validate
    from microstructure.features.compute import compute_features
    from microstructure.jobs.poll import cycle_times, poll_cycles
    from microstructure.jobs.publisher import OnlinePublisher
    from microstructure.lake.paths import LakePaths
    from microstructure.sources.simulated import SimulatedSource, universe
    from microstructure.store.repo import open_store

    os.environ.pop("MICROSTRUCTURE_ONLINE_STORE", None)
    d = Path(tempfile.mkdtemp()) / "cycle"
    paths = LakePaths(d)
    pub = OnlinePublisher(paths, open_store(d), SqlChecker())
    ends: list[float] = []
    n = 250
    stats = poll_cycles(paths, SimulatedSource(seed=1), universe(), cycle_times(T0, 2.0, n, 0),
                          publisher=pub, publish_every=1, on_cycle=lambda i, s: ends.append(time.perf_counter()))
    per = np.diff(np.array(ends))[100:] * 1000  # after the 5-minute window has filled
    src = SimulatedSource(seed=2)
    snaps = validate(src.poll(universe(), T0).raw).clean
    feats = compute_features(snaps)
    ge, sql = Checker(), SqlChecker()
    ge_t = lat(lambda: ge.check("features", feats), 30)
    sql_t = lat(lambda: sql.check("features", feats), 200)
    table.add_row("live cycle, 150 symbols: poll, validate, lake, features, checks, push",
                  f"{np.median(per):.0f} ms (p95 {np.percentile(per, 95):.0f} ms)",
                  f"{stats.cycles} cycles after a 5-min warm-up")
    table.add_row("  the feature check per cycle: SQL-compiled suite / GE validator",
                  f"{np.median(sql_t) * 1000:.1f} ms / {np.median(ge_t) * 1000:.0f} ms", "same verdicts (tested)")


def pandas_features(snap: pd.DataFrame) -> pd.DataFrame:
    """The same features in pandas (the anchor): dedup by first received, level sums, 5-min range, halts."""
    df = snap.sort_values(["received_ts", "source"]).drop_duplicates(["symbol", "event_ts"])
    df = df.sort_values(["symbol", "event_ts"]).reset_index(drop=True)
    out = df[["symbol", "event_ts", "received_ts", "source", "book_levels", "halted", "locked"]].copy()
    out["best_bid"], out["best_ask"] = df["bid_px_1"], df["ask_px_1"]
    out["bid_size"], out["ask_size"] = df["bid_sz_1"], df["ask_sz_1"]
    out["mid"] = (df["bid_px_1"] + df["ask_px_1"]) / 2
    out["spread_bps"] = (out["best_ask"] - out["best_bid"]) / out["mid"] * 10000
    bd = sum(df[f"bid_sz_{i}"].fillna(0) for i in range(1, 6))
    ad = sum(df[f"ask_sz_{i}"].fillna(0) for i in range(1, 6))
    out["bid_depth"], out["ask_depth"] = bd, ad
    s = out["bid_size"] + out["ask_size"]
    out["order_imbalance"] = np.where(s > 0, (out["bid_size"] - out["ask_size"]) / s, 0.0)
    out["depth_imbalance"] = np.where(bd + ad > 0, (bd - ad) / (bd + ad), 0.0)
    out["bid_depth_dollars"] = sum((df[f"bid_px_{i}"] * df[f"bid_sz_{i}"]).fillna(0) for i in range(1, 6))
    out["ask_depth_dollars"] = sum((df[f"ask_px_{i}"] * df[f"ask_sz_{i}"]).fillna(0) for i in range(1, 6))
    out["depth_dollars"] = out["bid_depth_dollars"] + out["ask_depth_dollars"]
    out["microprice"] = np.where(s > 0, (out["best_bid"] * out["ask_size"] + out["best_ask"] * out["bid_size"]) / s,
                                 out["mid"])
    g = out.set_index("event_ts").groupby("symbol")["mid"]
    hi = g.rolling("5min").max().to_numpy()
    lo = g.rolling("5min").min().to_numpy()
    out["gap_pct"] = (hi - lo) / lo
    halted = out.assign(h=out["halted"].fillna(False).astype(float)).set_index("event_ts").groupby("symbol")["h"]
    out["has_recent_halt"] = halted.rolling("30min").max().to_numpy() > 0
    return out


def build(table: Table) -> None:
    import pyarrow as pa

    from microstructure.contract.book import validate
    from microstructure.features.compute import compute_features
    from microstructure.jobs.poll import cycle_times
    from microstructure.sources.simulated import SimulatedSource, universe

    src = SimulatedSource(seed=1)
    tabs = [validate(src.poll(universe(), t).raw).clean for t in cycle_times(T0, 2.0, 6000, 0)]
    snaps = pa.concat_tables(tabs).combine_chunks()
    n = snaps.num_rows
    ours = lat(lambda: compute_features(snaps), 3)
    df = snaps.to_pandas()
    ref = lat(lambda: pandas_features(df), 2)
    table.add_row(f"feature build, {n:,} snapshot rows", f"{n / np.median(ours) / 1e6:.2f} M rows/s",
                  f"pandas reference {n / np.median(ref) / 1e6:.2f} M rows/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = ap.parse_args()
    con = Console()
    base = Path(tempfile.mkdtemp())

    t = Table(title="online read latency p50 / p99 (in process)", title_justify="left")
    for c in ("read", "stock Feast", "ours", "stock, gc.freeze", "ours, gc.freeze"):
        t.add_column(c, justify="right" if c != "read" else "left")
    reads(t, "SQLite", filled_store(base / "sqlite", None))
    redis_store = filled_store(base / "redis", args.redis)
    reads(t, "Redis", redis_store)
    con.print(t)

    t2 = Table(title="many readers", title_justify="left")
    for c in ("what", "volume", "p50 / p99"):
        t2.add_column(c)
    t2.add_row(*many_readers(args.redis, base / "redis", args.readers))
    con.print(t2)

    t3 = Table(title="cycle and build", title_justify="left")
    for c in ("what", "measured", "anchor / notes"):
        t3.add_column(c)
    cycle(t3)
    build(t3)
    con.print(t3)


if __name__ == "__main__":
    main()
