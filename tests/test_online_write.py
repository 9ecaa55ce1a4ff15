"""The columnar online write stores exactly the bytes Feast's own write stores (SQLite and a real Redis), and
never moves a key back in time."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3

import pyarrow as pa
import pytest
import redis

from microstructure.contract.book import validate
from microstructure.features.compute import compute_features
from microstructure.jobs import poll as pipeline
from microstructure.sources.simulated import SimulatedSource, universe
from microstructure.store.lookup import read_online
from microstructure.store.repo import forget_store, open_store, push_online
from tests.conftest import T0

REDIS_DB = 12 + 2 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)  # and REDIS_DB + 1


@pytest.fixture(scope="module")
def cycles():
    """Two cycles of features for 20 symbols, with the awkward values a feed gives: a one-sided book (null
    prices), an unknown halt flag (null), a NaN."""
    src = SimulatedSource(seed=5)
    syms = universe()[:20]
    out = []
    for t in pipeline.cycle_times(T0, 2.0, 2, 0):
        f = pipeline.latest_per_symbol(compute_features(validate(src.poll(syms, t).raw).clean))
        out.append(f)
    f = out[1]
    f = f.set_column(f.schema.get_field_index("halted"), "halted",
                     pa.array([None if i % 3 == 0 else v for i, v in enumerate(f.column("halted").to_pylist())],
                              pa.bool_()))
    f = f.set_column(f.schema.get_field_index("microprice"), "microprice",
                     pa.array([None if i == 1 else (float("nan") if i == 2 else v)
                               for i, v in enumerate(f.column("microprice").to_pylist())], pa.float64()))
    out[1] = f
    return out


def _sqlite_rows(path) -> list[tuple]:
    con = sqlite3.connect(path)
    (table,) = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return con.execute(f'SELECT * FROM "{table}" ORDER BY entity_key, feature_name').fetchall()


def test_sqlite_bytes_equal_feasts_write(tmp_path, cycles):
    stores = {}
    for name, fast in (("feast", False), ("ours", True)):
        d = tmp_path / name
        store = open_store(d)
        for c in cycles:
            push_online(store, c, fast=fast)
        stores[name] = (store, d)
    feast_rows = _sqlite_rows(stores["feast"][1] / "feast" / "online_store.db")
    ours = _sqlite_rows(stores["ours"][1] / "feast" / "online_store.db")
    assert len(ours) == 20 * 21 and ours == feast_rows
    # Older rows never replace newer ones.
    push_online(stores["ours"][0], cycles[0])
    assert _sqlite_rows(stores["ours"][1] / "feast" / "online_store.db") == feast_rows
    syms = cycles[1].column("symbol").to_pylist()
    a = read_online(stores["ours"][0], syms, now=T0)
    assert [r.features for r in a] == [r.features for r in read_online(stores["feast"][0], syms, now=T0)]
    assert a[1].features["microprice"] is None and a[2].features["microprice"] is None


def _redis_dump(client: redis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {k: client.hgetall(k) for k in sorted(client.scan_iter(count=1000))}


def test_redis_bytes_equal_feasts_write(tmp_path, cycles, monkeypatch):
    dumps = {}
    for name, fast, db in (("feast", False, REDIS_DB), ("ours", True, REDIS_DB + 1)):
        client = redis.Redis(db=db)
        client.flushdb()
        monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", f"redis://127.0.0.1:6379/{db}?key_ttl_seconds=600")
        d = tmp_path / name
        store = open_store(d)
        assert store.config.online_store.type == "redis"
        for c in cycles:
            push_online(store, c, fast=fast)
        if fast:
            push_online(store, cycles[0], fast=True)  # older: skipped
        dumps[name] = _redis_dump(client)
        assert all(0 < client.ttl(k) <= 600 for k in dumps[name])
        forget_store(d)
        client.flushdb()
    assert len(dumps["ours"]) == 20 and dumps["ours"] == dumps["feast"]


def test_whole_market_source_shapes_every_ticker(server, monkeypatch):
    """Polygon's snapshot-all without a filter, through the official client: every quoted ticker becomes an L1
    row; a ticker without a quote is quarantined, not dropped."""
    from microstructure.sources.polygon import WholeMarketSource
    from tests.vendor_server import POLY_STOCKS, poly_quote, poly_snapshot

    ticks = [poly_quote(f"T{i:04d}", 10.0 + i / 100, 10.01 + i / 100, t=1_764_000_000_000_000_000 + i)
             for i in range(2500)]
    ticks.append({"ticker": "NOQ", "updated": 0})
    server.expect_request(POLY_STOCKS).respond_with_json(poly_snapshot(*ticks))
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    monkeypatch.setenv("MICROSTRUCTURE_POLYGON_BASE_URL", server.url_for("/").rstrip("/"))
    res = WholeMarketSource().poll([], dt.datetime.now(dt.UTC))
    v = validate(res.raw)
    assert v.clean.num_rows == 2500 and set(v.clean.column("book_levels").to_pylist()) == {1}
    assert v.clean.column("event_ts")[7].as_py() == dt.datetime.fromtimestamp(1_764_000_000, dt.UTC)
    assert v.clean.column("bid_px_1")[7].as_py() == 10.07
    assert res.rejected.column("symbol").to_pylist() == ["NOQ"]
    assert "tickers=" not in server.log[0][0].url  # one unfiltered call


def test_poll_the_whole_market_from_the_cli(server, tmp_path):
    """`poll --source polygon-market`: every ticker of one unfiltered snapshot call, live, into the lake and
    online (the real CLI in a subprocess, the official client against the local server)."""
    import json
    import os
    import subprocess
    import sys
    import time

    from tests.vendor_server import POLY_STOCKS, poly_quote, poly_snapshot

    def answer(_request):  # type: ignore[no-untyped-def]
        from werkzeug.wrappers import Response

        now = time.time_ns()
        body = poly_snapshot(*[poly_quote(f"T{i:04d}", 20 + i / 100, 20.02 + i / 100, t=now) for i in range(1500)])
        return Response(json.dumps(body), content_type="application/json")

    server.expect_request(POLY_STOCKS).respond_with_handler(answer)
    env = {**os.environ, "POLYGON_API_KEY": "k", "MICROSTRUCTURE_POLYGON_BASE_URL": server.url_for("/").rstrip("/")}
    env.pop("MICROSTRUCTURE_ONLINE_STORE", None)
    d = tmp_path / "data"
    p = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--source", "polygon-market", "--cycles", "2",
                        "--interval", "1", "--data-dir", str(d), "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)
    assert stats["written"] == 3000 and stats["online_pushed"] == 3000
    p = subprocess.run([sys.executable, "-m", "microstructure", "online", "T0007", "T1499", "--data-dir", str(d),
                        "--json"], capture_output=True, text=True, env=env, timeout=120)
    rows = json.loads(p.stdout)
    assert [r["best_bid"] for r in rows] == [20.07, 34.99] and all(r["book_levels"] == 1 for r in rows)
