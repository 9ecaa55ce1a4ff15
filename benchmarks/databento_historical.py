"""Benchmark: ``backfill --from databento`` of a large historical answer in bounded memory. Run on demand; asserts
nothing.

    python benchmarks/databento_historical.py [--records 1000000]

Writes a zstd DBN MBP-10 answer of ``--records`` records (10 instruments, a random walk of prices, 100 µs apart),
serves it from a local TLS stand-in of ``POST /v0/timeseries.get_range`` (a self-signed certificate the CLI's
``requests`` trusts through REQUESTS_CA_BUNDLE), runs the real CLI against it in a subprocess and reports its peak
RSS (the child's ``ru_maxrss``) next to the same command on a one-record answer (the anchor), and the records per
second.
"""

from __future__ import annotations

import argparse
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dbn_files import NS, T0, level, mbp, metadata
from tests.test_databento_historical import KEY, _cert

_WRAPPER = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")


def write_answer(path: Path, records: int, chunk: int = 200_000) -> int:
    """A zstd DBN MBP-10 answer; its records are one template record's bytes with fields rewritten in numpy."""
    template = np.frombuffer(mbp(1, T0, [level(100 * NS, 1, 101 * NS, 1)] * 10), dtype=np.uint8)
    rng = np.random.default_rng(7)
    cctx = zstandard.ZstdCompressor(level=3)
    with open(path, "wb") as fh, cctx.stream_writer(fh) as w:
        w.write(metadata({f"S{i}": i + 1 for i in range(10)}))
        for off in range(0, records, chunk):
            n = min(chunk, records - off)
            buf = np.tile(template, n).reshape(n, 368)
            i = np.arange(off, off + n, dtype=np.int64)
            iid = (i % 10 + 1).astype(np.uint32)
            ts = (T0 + i * 100_000).astype(np.uint64)
            mid = (100 * NS + (np.cumsum(rng.integers(-1, 2, n)) + off) * 10_000_000).astype(np.int64)
            buf[:, 4:8] = iid.view(np.uint8).reshape(n, 4)
            buf[:, 8:16] = (ts - 1000).view(np.uint8).reshape(n, 8)
            buf[:, 32:40] = ts.view(np.uint8).reshape(n, 8)
            for k in range(10):
                o = 48 + 32 * k
                buf[:, o:o + 8] = (mid - k * 10_000_000).view(np.uint8).reshape(n, 8)
                buf[:, o + 8:o + 16] = (mid + (k + 1) * 10_000_000).view(np.uint8).reshape(n, 8)
                buf[:, o + 16:o + 20] = rng.integers(1, 5000, n, dtype=np.uint32).view(np.uint8).reshape(n, 4)
                buf[:, o + 20:o + 24] = rng.integers(1, 5000, n, dtype=np.uint32).view(np.uint8).reshape(n, 4)
            w.write(buf.tobytes())
    return path.stat().st_size


def run(url: str, crt: Path, data: Path) -> tuple[int, float, str]:
    env = {**os.environ, "DATABENTO_API_KEY": KEY, "MICROSTRUCTURE_DATABENTO_HIST_URL": url,
           "REQUESTS_CA_BUNDLE": str(crt)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "microstructure", "backfill", "--from",
                        "databento", "--dataset", "XNAS.ITCH", "--symbols", "S0", "--start", "2025-11-24T16:00",
                        "--end", "2025-11-24T17:00", "--data-dir", str(data), "--json"],
                       capture_output=True, text=True, env=env)
    dt_s = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return int(p.stderr.strip().splitlines()[-1]) * 1024, dt_s, p.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    a = ap.parse_args()
    from pytest_httpserver import HTTPServer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        crt, pem = _cert(root)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(crt, pem)
        big, small = root / "big.dbn.zst", root / "small.dbn.zst"
        size = write_answer(big, a.records)
        write_answer(small, 1)
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        s = HTTPServer(host="127.0.0.1", port=0, ssl_context=ctx)
        s.start()
        try:
            url = s.url_for("").rstrip("/")
            s.expect_request("/v0/timeseries.get_range", method="POST").respond_with_data(small.read_bytes())
            anchor, _, _ = run(url, crt, root / "d0")
            s.clear()
            s.expect_request("/v0/timeseries.get_range", method="POST").respond_with_data(big.read_bytes())
            peak, secs, out = run(url, crt, root / "d1")
        finally:
            s.stop()
    print(out)
    print(f"records {a.records:,}  answer {size / 2**20:.1f} MiB zstd, {a.records * 368 / 2**20:.0f} MiB DBN")
    print(f"peak RSS {peak / 2**20:.0f} MiB (one-record answer: {anchor / 2**20:.0f} MiB)")
    print(f"{secs:.1f} s, {a.records / secs:,.0f} records/s")
    print(f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
