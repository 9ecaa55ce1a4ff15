"""Benchmark: how many live MBP-10 records a second the Databento source keeps up with, and what a cycle's sample
costs. Run on demand; asserts nothing.

    python benchmarks/databento_live.py [--symbols 150] [--seconds 5]

The official SDK against the local stand-in gateway (``tests/databento_gateway.py``) streaming as fast as it can
(no pause between rounds). Both run in this one process, so the stand-in's own record building shares the CPU
and the figure is a floor: it says the source keeps up with at least that rate, and whether it falls behind
(records consumed below records sent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microstructure.sources.databento_live import GATEWAY_ENV, DatabentoLiveSource
from tests.databento_gateway import DatabentoGateway

KEY = "db-BENCHMARKkey00000"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=150)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    syms = [f"B{i:04d}" for i in range(args.symbols)]

    class Counting(DatabentoLiveSource):
        n = 0

        def _on_record(self, rec: object, client: object) -> None:
            Counting.n += 1
            super()._on_record(rec, client)

    with DatabentoGateway(KEY, syms, period_s=0.0) as gw:
        os.environ["DATABENTO_API_KEY"] = KEY
        os.environ[GATEWAY_ENV] = gw.address
        src = Counting(symbols=syms)
        time.sleep(1.0)
        n0, s0, t0 = Counting.n, len(gw.state.sent), time.monotonic()
        time.sleep(args.seconds)
        n1, s1, el = Counting.n, len(gw.state.sent), time.monotonic() - t0
        times = []
        for _ in range(200):
            t = time.perf_counter()
            got = src.fetch(syms, dt.datetime.now(dt.UTC))
            times.append(time.perf_counter() - t)
        src.close()
    times.sort()
    print(f"symbols {args.symbols}: records sent {(s1 - s0) / el:,.0f}/s, consumed {(n1 - n0) / el:,.0f}/s "
          f"(every record: {n1 - n0 >= s1 - s0 - args.symbols})")
    print(f"fetch of {len(got.quotes)} books: p50 {times[100] * 1e3:.2f} ms, p95 {times[190] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
