"""Hostile ``event_ts_us`` rows, on SQLite and on a real Redis server: any process that reaches the online store can
write a row's values (a Redis client, SQLite, ``feast serve``'s push). Whatever is stored as a book's exact time,
the online read (``store.lookup``, fast and through Feast) and Feast's own ``freshness`` view (what ``feast serve``
answers) never give a bad row an age: it is reported bad and stale, never fresh, and neither reader crashes."""

from __future__ import annotations

import datetime as dt
import math
import os
import sqlite3

import pytest
from feast.protos.feast.types.Value_pb2 import Int64List, Value

from microstructure.checks.sql import SqlChecker
from microstructure.contract.book import table_from_quotes, validate
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths
from microstructure.store.lookup import read_online
from microstructure.store.repo import forget_store, open_store
from tests.conftest import book

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
REDIS_DB = 12 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)  # this module's own database
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


def _us(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.integration)])
def online(request, data_dir, monkeypatch):
    """A store holding one real, fresh book for AAA (pushed by our publisher) and a function that overwrites one
    of its stored values as another process would: (store, the book's time, forge(feature, Value))."""
    client = None
    if request.param == "redis":
        import redis

        client = redis.Redis(db=REDIS_DB)
        client.flushdb()
        monkeypatch.setenv("MICROSTRUCTURE_ONLINE_STORE", REDIS_URL)
    store = open_store(data_dir)
    # A book a quarter second old by the real clock: Feast's freshness view reads the real clock.
    ev = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=250)
    pub = OnlinePublisher(LakePaths(data_dir), store, SqlChecker())
    pub.add_cycle(validate(table_from_quotes([book("AAA", event_ts=ev, received_ts=ev)])).clean)
    pub.flush()
    assert pub.pushed == 1

    def forge(feature: str, value: Value) -> None:
        if client is not None:
            from feast.infra.online_stores.helpers import _mmh3

            (key,) = list(client.scan_iter(count=100))
            client.hset(key, _mmh3(f"order_book:{feature}"), value.SerializeToString())
            return
        from feast.infra.online_stores.sqlite import _table_id

        fv = store.get_feature_view("order_book")
        table = _table_id(store.config.project, fv, store.config.registry.enable_online_feature_view_versioning)
        with sqlite3.connect(store.config.online_store.path) as con:
            n = con.execute(f'UPDATE "{table}" SET value = ? WHERE feature_name = ?',
                            [value.SerializeToString(), feature]).rowcount
            assert n == 1

    yield store, ev, forge
    forget_store(data_dir)
    if client is not None:
        client.flushdb()


def _feast_live(store) -> tuple[float | None, bool]:
    """Feast's own answer for ``order_book_live`` (its freshness view, as `feast serve` runs it)."""
    got = store.get_online_features(features=store.get_feature_service("order_book_live"),
                                    entity_rows=[{"symbol": "AAA"}]).to_dict()
    age = got["age_s"][0]
    return (None if age is None or age != age else age), got["stale"][0]


def _assert_bad(store, why: str) -> None:
    for fast in (True, False):
        (r,) = read_online(store, ["AAA"], freshness_s=3600, fast=fast)
        assert not r.found and r.stale and r.age_s is None and r.event_ts is None, (fast, r)
        assert r.error is not None and why in r.error, (fast, r.error)
    assert _feast_live(store) == (None, True)


def test_the_real_book_is_fresh_and_exact(online):
    store, ev, _ = online
    for fast in (True, False):
        (r,) = read_online(store, ["AAA"], fast=fast)
        assert r.found and not r.stale and r.event_ts == ev and r.features["event_ts_us"] == _us(ev)
    age, stale = _feast_live(store)
    assert age is not None and 0.25 <= age < 60 and stale is False


def test_a_forged_far_future_book_is_never_fresh(online):
    # Both times forged and consistent, ten years ahead: its age would be negative, i.e. fresh for ten years.
    store, ev, forge = online
    future = ev.replace(year=ev.year + 10)
    forge("event_ts", Value(unix_timestamp_val=int(future.timestamp())))
    forge("event_ts_us", Value(int64_val=_us(future)))
    _assert_bad(store, "impossible")


def test_an_event_ts_us_without_event_ts_is_bad(online):
    # The exact time alone, nothing to check it against: the online read took it as the book's time.
    store, _, forge = online
    forge("event_ts", Value())
    _assert_bad(store, "event_ts_us without event_ts")


@pytest.mark.parametrize("name", ["overflow", "negative", "bool", "string", "float", "list", "next_second"])
def test_a_forged_event_ts_us_gives_no_age(online, name):
    # Feast's freshness view read an unreadable event_ts_us as missing and aged the row from event_ts instead.
    store, ev, forge = online
    floor_us = _us(ev.replace(microsecond=0))
    value = {"overflow": Value(int64_val=2**63 - 1), "negative": Value(int64_val=-5), "bool": Value(bool_val=True),
             "string": Value(string_val=str(_us(ev))),  # the book's own digits, as text
             "float": Value(double_val=_us(ev) + 0.5),  # the book's own µs plus half a µs
             "list": Value(int64_list_val=Int64List(val=[1, 2])),
             "next_second": Value(int64_val=floor_us + 1_000_000),  # younger than event_ts's second allows
             }[name]
    forge("event_ts_us", value)
    _assert_bad(store, "event_ts_us")


def test_a_nan_event_ts_us_never_makes_a_book_younger(online):
    # Feast gives this view an int column with nulls as float64, so NaN is null there: the age falls back to
    # event_ts (floored, so it errs old), never younger than the book; the online read reports the row bad.
    store, ev, forge = online
    forge("event_ts_us", Value(double_val=math.nan))
    for fast in (True, False):
        (r,) = read_online(store, ["AAA"], fast=fast)
        assert not r.found and r.stale and r.error is not None and "event_ts_us" in r.error
    age, _ = _feast_live(store)
    assert age is None or age >= (dt.datetime.now(dt.UTC) - ev).total_seconds()


def test_a_book_on_a_whole_second_is_exact(online):
    # Exactly on a second boundary: event_ts_us equals Feast's floored event_ts, and is the book's time.
    store, ev, forge = online
    on = ev.replace(microsecond=0)
    forge("event_ts", Value(unix_timestamp_val=int(on.timestamp())))
    forge("event_ts_us", Value(int64_val=_us(on)))
    for fast in (True, False):
        (r,) = read_online(store, ["AAA"], fast=fast)
        assert r.found and r.error is None and r.event_ts == on
    age, stale = _feast_live(store)
    assert age is not None and age >= (ev - on).total_seconds() and stale is False
