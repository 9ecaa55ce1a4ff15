"""The whole US market in one cycle: Polygon's snapshot-all (10,000 tickers) through the official client against a
local stand-in server, validated, written to the lake, features, checks and the online push, end to end.

python benchmarks/whole_market.py [--tickers 10000] [--cycles 30] [--online-store redis://127.0.0.1:6379/14]

Prints a table of per-stage times (median and p95 over the cycles after a warm-up), next to the anchor measured
in the same run: the bare HTTP GET + JSON parse of the same answer (what any client pays before doing anything).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from rich.console import Console
from rich.table import Table

from microstructure.jobs.poll import LiveClock, PollStats, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths


def bodies(n: int, variants: int = 8) -> list[bytes]:
    """Snapshot-all answers shaped like Polygon's (lastQuote, lastTrade, day, min, prevDay per ticker), with a
    placeholder for the quote time the server fills in per request."""
    rng = random.Random(1)
    out = []
    names = [f"T{i:05d}" for i in range(n)]
    base = [rng.uniform(2, 500) for _ in range(n)]
    for v in range(variants):
        ticks = []
        for name, b in zip(names, base, strict=True):
            bid = round(b * (1 + rng.uniform(-0.002, 0.002)) + v * 0.01, 2)
            ask = round(bid + max(0.01, round(bid * rng.uniform(0.0001, 0.002), 2)), 2)
            ticks.append({
                "ticker": name, "todaysChange": 0.1, "todaysChangePerc": 0.05, "updated": "@TS@",
                "day": {"o": b, "h": b * 1.01, "l": b * 0.99, "c": b, "v": 12345, "vw": b},
                "lastQuote": {"p": bid, "s": rng.randint(1, 50), "P": ask, "S": rng.randint(1, 50), "t": "@TS@"},
                "lastTrade": {"c": [14, 41], "i": "1", "p": bid, "s": 100, "t": "@TS@", "x": 11},
                "min": {"av": 1000, "c": b, "h": b, "l": b, "o": b, "v": 100, "vw": b, "t": 1},
                "prevDay": {"o": b, "h": b, "l": b, "c": b, "v": 99999, "vw": b}})
        out.append(json.dumps({"status": "OK", "count": n, "tickers": ticks}).replace('"@TS@"', "@TS@").encode())
    return out


def serve(payloads: list[bytes]) -> tuple[str, object]:
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Response

    state = {"i": 0}

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        body = payloads[state["i"] % len(payloads)].replace(b"@TS@", str(time.time_ns()).encode())
        state["i"] += 1
        return Response(body, content_type="application/json")(environ, start_response)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_port}", srv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tickers", type=int, default=10_000)
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--online-store", default=None, help="e.g. redis://127.0.0.1:6379/14 (default: SQLite)")
    args = ap.parse_args()
    if args.online_store:
        os.environ["MICROSTRUCTURE_ONLINE_STORE"] = args.online_store
    url, srv = serve(bodies(args.tickers))
    os.environ.update(POLYGON_API_KEY="bench", MICROSTRUCTURE_POLYGON_BASE_URL=url)

    import urllib3

    from microstructure.checks.sql import SqlChecker
    from microstructure.sources.guard import Limits
    from microstructure.sources.polygon import WholeMarketSource
    from microstructure.store.repo import clear_online, open_store

    clear_online()
    d = Path(tempfile.mkdtemp()) / "data"
    paths = LakePaths(d)
    src = WholeMarketSource(limits=Limits(timeout_s=10.0))
    pub = OnlinePublisher(paths, open_store(d), SqlChecker())

    stages: dict[str, list[float]] = {k: [] for k in
                                      ("fetch (client + JSON)", "shape", "features (SQL)", "checks + online push")}

    orig_fetch = src.fetch_body

    def fetch_body():  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = orig_fetch()
        stages["fetch (client + JSON)"].append(time.perf_counter() - t)
        return out

    src.fetch_body = fetch_body  # type: ignore[method-assign]
    orig_poll = src.poll

    starts: list[float] = []

    def poll(symbols, at):  # type: ignore[no-untyped-def]
        n0 = len(stages["fetch (client + JSON)"])
        t = time.perf_counter()
        starts.append(t)
        res = orig_poll(symbols, at)
        total = time.perf_counter() - t
        stages["shape"].append(total - sum(stages["fetch (client + JSON)"][n0:]))
        return res

    src.poll = poll  # type: ignore[method-assign]
    for name, fn_name in (("features (SQL)", "add_cycle"), ("checks + online push", "flush")):
        orig = getattr(pub, fn_name)

        def timed(*a, _orig=orig, _name=name):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            out = _orig(*a)
            stages[_name].append(time.perf_counter() - t)
            return out

        setattr(pub, fn_name, timed)

    totals: list[float] = []

    def on_cycle(i: int, stats: PollStats) -> None:
        totals.append(time.perf_counter())

    clock = LiveClock(2.0, cycles=args.cycles)
    stats = poll_cycles(paths, src, [], clock, publisher=pub, on_cycle=on_cycle, publish_every=1)
    # Per cycle: from the source call to the end of the cycle (lake written, features pushed online); the
    # live clock's sleep between cycles is not counted.
    cycle_ms = (np.array(totals) - np.array(starts)) * 1000

    # The anchor: the same GET and JSON parse with urllib3 alone.
    http = urllib3.PoolManager()
    anchor = []
    for _ in range(10):
        t = time.perf_counter()
        r = http.request("GET", url + "/v2/snapshot/locale/us/markets/stocks/tickers?apiKey=x")
        json.loads(r.data)
        anchor.append(time.perf_counter() - t)
    srv.shutdown()  # type: ignore[attr-defined]

    warm = 3
    table = Table(title=f"whole-market cycle: {args.tickers:,} tickers, {args.cycles} cycles "
                        f"({'Redis' if args.online_store else 'SQLite'} online), written {stats.written:,}",
                  title_justify="left")
    for c in ("stage", "median", "p95"):
        table.add_column(c, justify="right" if c != "stage" else "left")
    per_cycle = np.zeros(len(stages["fetch (client + JSON)"]) - warm)
    for name, xs in stages.items():
        a = np.array(xs[warm:]) * 1000
        per_cycle = per_cycle + a[: len(per_cycle)]
        table.add_row(name, f"{np.median(a):.0f} ms", f"{np.percentile(a, 95):.0f} ms")
    table.add_row("validate, lake write, outcomes (the rest)",
                  f"{np.median(cycle_ms[warm:] - per_cycle):.0f} ms", "")
    table.add_row("whole cycle, end to end", f"{np.median(cycle_ms[warm:]):.0f} ms",
                  f"{np.percentile(cycle_ms[warm:], 95):.0f} ms")
    a = np.array(anchor) * 1000
    table.add_row("anchor: urllib3 GET + json.loads", f"{np.median(a):.0f} ms", f"{np.percentile(a, 95):.0f} ms")
    Console().print(table)


if __name__ == "__main__":
    main()
