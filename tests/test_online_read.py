"""The direct online read equals Feast's get_online_features, on SQLite and on a real Redis server; Redis is
chosen by configuration alone, expires its keys, never goes back in time, and a fresh market clears it."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from feast.protos.feast.types.Value_pb2 import Value
from hypothesis import given
from hypothesis import strategies as st

from microstructure.store.lookup import read_online
from microstructure.store.online_read import decode
from microstructure.store.repo import forget_store, open_store

# This module's own database on the shared server, one per xdist worker: the module fixture runs once per worker,
# and one worker's flush must not wipe another's keys mid-test.
REDIS_DB = 8 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


def _same(fast, slow) -> None:
    assert [r.symbol for r in fast] == [r.symbol for r in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a.found == b.found, a.symbol
        assert a.features == b.features, a.symbol
        if "event_ts" in b.features:  # through Feast, a service without event_ts gives no age at all
            assert a.event_ts == b.event_ts and a.stale == b.stale and a.age_s == b.age_s


@given(st.one_of(
    st.floats(allow_nan=False).map(lambda x: Value(double_val=x)),
    st.integers(-(2**63), 2**63 - 1).map(lambda x: Value(int64_val=x)),
    st.integers(-(2**31), 2**31 - 1).map(lambda x: Value(int32_val=x)),
    st.booleans().map(lambda x: Value(bool_val=x)),
    st.text().map(lambda x: Value(string_val=x)),
    st.integers(0, 2**33).map(lambda x: Value(unix_timestamp_val=x)),
))
def test_decode_reads_back_what_feast_stores(v):
    kind = v.WhichOneof("val")
    want = getattr(v, kind)
    if kind == "unix_timestamp_val":
        want = dt.datetime.fromtimestamp(want, dt.UTC)
    assert decode(v.SerializeToString()) == want


def test_decode_of_an_unset_value_is_none():
    assert decode(b"") is None and decode(None) is None and decode(Value().SerializeToString()) is None


@pytest.mark.integration  # shares the `polled` run: 200 cycles x 20 symbols through GE and Feast
def test_sqlite_read_equals_get_online_features(polled):
    store = open_store(polled["paths"].data_dir)
    syms = [*sorted({r for t in polled["online"] for r in t.column("symbol").to_pylist()}), "NOPE"]
    now = dt.datetime(2026, 3, 2, 15, tzinfo=dt.UTC)
    for service in ("order_book_all", "scoring"):
        fast = read_online(store, syms, now=now, service=service)
        slow = read_online(store, syms, now=now, service=service, fast=False)
        _same(fast, slow)
        assert sum(r.found for r in fast) == len(syms) - 1 and not fast[-1].found
    # The scoring read carries each book's age too, though the service holds only the five features.
    scoring = read_online(store, syms[:3], now=now, service="scoring")
    assert all(r.age_s is not None for r in scoring) and set(scoring[0].features) == {
        "order_imbalance", "bid_depth", "ask_depth", "spread_bps", "depth_imbalance"}


@pytest.fixture(scope="module")
def redis_run(tmp_path_factory):
    client = redis.Redis(db=REDIS_DB)
    client.flushdb()
    d = tmp_path_factory.mktemp("redis") / "data"
    env = {**os.environ, "MICROSTRUCTURE_ONLINE_STORE": REDIS_URL + "?key_ttl_seconds=3600"}
    p = subprocess.run([sys.executable, "-m", "microstructure", "run", "--data-dir", str(d), "--cycles", "15",
                        "--symbols", "12", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    yield d, client
    client.flushdb()


@pytest.mark.integration  # a Redis server, and the CLI's run in a subprocess
def test_run_serves_online_from_redis(redis_run, monkeypatch):
    d, client = redis_run
    keys = list(client.scan_iter(count=1000))
    assert len(keys) == 12  # one hash per symbol
    assert all(0 < client.ttl(k) <= 3600 for k in keys)  # expired rows leave
    assert not (d / "feast" / "online_store.db").exists()
    assert "redis" in (d / "feast" / "feature_store.yaml").read_text()
    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", REDIS_URL + "?key_ttl_seconds=3600")
    forget_store(d)
    store = open_store(d)
    assert store.config.online_store.type == "redis"
    from microstructure.sources.simulated import universe

    syms = [*universe()[:12], "NOPE"]
    now = dt.datetime.now(dt.UTC)
    for service in ("order_book_all", "scoring"):
        _same(read_online(store, syms, now=now, service=service),
              read_online(store, syms, now=now, service=service, fast=False))
    before = {r.symbol: r.event_ts for r in read_online(store, syms[:12])}
    # Feast's materialize writes the newest *offline* rows; online must not move back in time.
    store.materialize(dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime.now(dt.UTC))
    after = {r.symbol: r.event_ts for r in read_online(store, syms[:12])}
    assert all(after[s] >= before[s] for s in before)
    forget_store(d)


@pytest.mark.integration  # a Redis server, and the CLI's run in a subprocess
def test_a_fresh_market_clears_redis(redis_run, monkeypatch):
    _, client = redis_run
    client.set(b"unrelated-key", b"1")
    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", REDIS_URL)
    from microstructure.store.repo import clear_online

    assert clear_online() == 12
    assert client.get(b"unrelated-key") == b"1" and client.dbsize() == 1


def test_a_password_never_reaches_the_yaml(tmp_path, monkeypatch):
    from microstructure.store.repo import REDIS_PASSWORD_ENV, store_yaml

    monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", "redis://:s3cret-pw@127.0.0.1:6379/3")
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    text = store_yaml(tmp_path).read_text()
    assert "s3cret-pw" not in text and "${MICROSTRUCTURE_REDIS_PASSWORD}" in text and "db=3" in text
    assert os.environ[REDIS_PASSWORD_ENV] == "s3cret-pw"


@pytest.mark.integration
def test_a_bad_online_store_url_is_one_line(tmp_path):
    env = {**os.environ, "MICROSTRUCTURE_ONLINE_STORE": "mysql://x"}
    p = subprocess.run([sys.executable, "-m", "microstructure", "run", "--cycles", "1", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "redis://" in p.stderr, p.stderr


@pytest.mark.integration  # shares the `polled` run: 200 cycles x 20 symbols through GE and Feast
def test_fast_read_used_for_one_view_services_only(polled):
    from microstructure.store.lookup import _read_plan

    store = open_store(Path(polled["paths"].data_dir))
    assert _read_plan(store, "scoring") is not None
    assert _read_plan(store, "order_book_live") is None  # holds an on-demand view: Feast computes it
