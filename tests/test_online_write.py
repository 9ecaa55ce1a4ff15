"""The columnar online write stores exactly the bytes Feast's own write stores (SQLite and a real Redis), and
never moves a key back in time."""

from __future__ import annotations

import os
import sqlite3

import pyarrow as pa
import pytest
import redis

from microstructure.contract.book import validate
from microstructure.contract.schemas import FEATURE_NAMES
from microstructure.features.compute import compute_features
from microstructure.jobs import poll as pipeline
from microstructure.jobs.publisher import latest_per_symbol
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
        f = latest_per_symbol(compute_features(validate(src.poll(syms, t).raw).clean))
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
    assert len(ours) == 20 * len(FEATURE_NAMES) and ours == feast_rows
    # Older rows never replace newer ones.
    push_online(stores["ours"][0], cycles[0])
    assert _sqlite_rows(stores["ours"][1] / "feast" / "online_store.db") == feast_rows
    syms = cycles[1].column("symbol").to_pylist()
    a = read_online(stores["ours"][0], syms, now=T0)
    assert [r.features for r in a] == [r.features for r in read_online(stores["feast"][0], syms, now=T0)]
    assert a[1].features["microprice"] is None and a[2].features["microprice"] is None


def _redis_dump(client: redis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {k: client.hgetall(k) for k in sorted(client.scan_iter(count=1000))}


@pytest.mark.integration  # a Redis server
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


