"""Online age to the microsecond (issue 19): Feast keeps a timestamp feature online to the whole second, so the
book's time is served a second time as ``event_ts_us`` (epoch microseconds, declared in features.sql) and every
online read computes the age from it. Online answers carry microseconds and equal the lake's ``event_ts``
exactly; a row written before the feature existed falls back to the floored ``event_ts``, and says so (its
``event_ts_us`` is null); a row whose two times disagree is reported bad. Live, with a 1 s poll, an online answer
never shows a book older than one the lake already held 1.5 s earlier."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pytest

from microstructure.checks.sql import SqlChecker
from microstructure.contract.book import table_from_quotes, validate
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths
from microstructure.lake.views import read_snapshots
from microstructure.store.lookup import read_online
from microstructure.store.repo import open_store
from tests.conftest import T0, book

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _us(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)


def _lake_features(paths: LakePaths) -> list[dict]:
    return duckdb.sql("SELECT * FROM read_parquet(?) ORDER BY symbol, received_ts",
                      params=[paths.glob("features")]).arrow().read_all().to_pylist()


@pytest.mark.integration  # shares the `polled` run: 200 cycles x 20 symbols through GE and Feast
def test_online_times_are_the_lakes_to_the_microsecond(polled):
    paths = polled["paths"]
    lake = _lake_features(paths)
    # The offline build writes event_ts_us as the same instant as event_ts, on every row.
    assert lake and all(r["event_ts_us"] == _us(r["event_ts"]) for r in lake)
    latest = {r["symbol"]: r for r in lake}  # ordered by received_ts: the last one per symbol is what is served
    now = max(r["event_ts"] for r in latest.values()) + dt.timedelta(seconds=3)
    store = open_store(paths.data_dir)
    syms = sorted(latest)
    for fast in (True, False):
        rows = read_online(store, syms, freshness_s=10, now=now, fast=fast)
        for r in rows:
            exp = latest[r.symbol]
            assert r.found and r.features["event_ts_us"] == exp["event_ts_us"], r
            assert r.event_ts == exp["event_ts"]  # exact: not floored to the second
            assert r.age_s == (now - exp["event_ts"]).total_seconds()
            assert r.as_dict()["event_ts"] == exp["event_ts"].isoformat()
        # Microseconds, not whole seconds (the simulated books are sampled 5-250 ms before each poll).
        assert all(r.event_ts is not None and r.event_ts.microsecond for r in rows)
    # The scoring service holds only the five model features; its age is exact all the same.
    scoring = read_online(store, syms, freshness_s=10, now=now, service="scoring")
    assert [r.event_ts for r in scoring] == [latest[s]["event_ts"] for s in syms]
    assert "event_ts_us" not in scoring[0].features
    # Why: Feast's own answer for event_ts is floored to the second.
    got = store.get_online_features(features=["order_book:event_ts", "order_book:event_ts_us"],
                                     entity_rows=[{"symbol": s} for s in syms]).to_dict()
    for s, ev, us in zip(syms, got["event_ts"], got["event_ts_us"], strict=True):
        assert ev == latest[s]["event_ts"].replace(microsecond=0) < latest[s]["event_ts"]
        assert us == latest[s]["event_ts_us"]


def _feast_age(store, symbol: str) -> tuple[float | None, bool, dt.datetime, dt.datetime]:
    """Feast's own answer for ``order_book_live`` (its freshness view, as `feast serve` runs it): age_s, stale,
    and the wall-clock times around the call."""
    asked = dt.datetime.now(dt.UTC)
    got = store.get_online_features(features=store.get_feature_service("order_book_live"),
                                    entity_rows=[{"symbol": symbol}]).to_dict()
    answered = dt.datetime.now(dt.UTC)
    age = got["age_s"][0]
    return (None if age is None or age != age else age), got["stale"][0], asked, answered


def _pushed(data_dir, event_ts: dt.datetime) -> tuple[object, OnlinePublisher]:
    store = open_store(data_dir)
    pub = OnlinePublisher(LakePaths(data_dir), store, SqlChecker())
    pub.add_cycle(validate(table_from_quotes([book("AAA", event_ts=event_ts)])).clean)
    pub.flush()
    assert pub.pushed == 1
    return store, pub


def test_a_row_from_before_event_ts_us_falls_back_to_the_second_and_says_so(data_dir):
    ev = T0 + dt.timedelta(seconds=1, microseconds=750_000)
    store, _ = _pushed(data_dir, ev)
    now = ev + dt.timedelta(seconds=2)
    (r,) = read_online(store, ["AAA"], now=now)
    assert r.event_ts == ev and r.age_s == 2.0 and r.features["event_ts_us"] == _us(ev)
    age, stale, asked, answered = _feast_age(store, "AAA")  # Feast's freshness view: from the exact time too
    assert age is not None and (asked - ev).total_seconds() <= age <= (answered - ev).total_seconds() and stale
    # What a version before the feature wrote: every feature but event_ts_us.
    from feast.infra.online_stores.sqlite import _table_id

    fv = store.get_feature_view("order_book")
    table = _table_id(store.config.project, fv, store.config.registry.enable_online_feature_view_versioning)
    with sqlite3.connect(store.config.online_store.path) as con:
        assert con.execute(f'DELETE FROM "{table}" WHERE feature_name = ?', ["event_ts_us"]).rowcount == 1
    for fast in (True, False):
        (old,) = read_online(store, ["AAA"], now=now, fast=fast)
        assert old.found and not old.stale and old.error is None
        assert old.event_ts == ev.replace(microsecond=0)  # Feast's second: the age errs old, by 0.75 s here
        assert old.age_s == 2.75
        assert old.as_dict()["event_ts_us"] is None  # the answer says its age is to the second
    age, _, asked, answered = _feast_age(store, "AAA")
    floor = ev.replace(microsecond=0)
    assert age is not None and (asked - floor).total_seconds() <= age <= (answered - floor).total_seconds()


def test_a_pushed_row_claiming_a_younger_book_than_its_event_ts_is_bad(data_dir):
    # Anyone reaching the store can push (feast serve's /push): an exact time that is not event_ts's instant
    # would make a stale book look fresh. The row is reported bad for its symbol, never served.
    ev = T0 + dt.timedelta(microseconds=250_000)
    store, pub = _pushed(data_dir, ev)
    assert pub.last_pushed is not None
    forged = pub.last_pushed.to_pandas()
    forged["event_ts_us"] += 5_000_000
    forged["received_ts"] += dt.timedelta(seconds=1)
    store.push("order_book_push", forged)
    for fast in (True, False):
        (r,) = read_online(store, ["AAA"], now=ev + dt.timedelta(seconds=6), freshness_s=10, fast=fast)
        assert not r.found and r.stale and r.age_s is None
        assert r.error is not None and "event_ts_us" in r.error, r.error
    age, stale, _, _ = _feast_age(store, "AAA")  # Feast's freshness view gives it no age: stale
    assert age is None and stale is True


def test_the_online_age_metric_is_exact(data_dir):
    from microstructure.jobs.metrics import PollMetrics
    from microstructure.jobs.poll import PollStats

    ev = T0 + dt.timedelta(microseconds=123_456)
    _, pub = _pushed(data_dir, ev)
    assert pub.last_pushed is not None and pub.last_pushed.column("event_ts_us").to_pylist() == [_us(ev)]
    m = PollMetrics()
    now = ev + dt.timedelta(seconds=2, microseconds=500_000)
    m.observe(PollStats(), None, online=pub.last_pushed, now=_us(now) / 1e6)
    assert m.registry.get_sample_value("microstructure_online_age_seconds", {"stat": "max"}) == pytest.approx(
        2.5, abs=1e-6)


@pytest.mark.integration  # a live poll in a subprocess, on the wall clock: about 20 s
def test_live_online_never_shows_a_book_older_than_the_lake_held_1_5_s_before(tmp_path):
    d = tmp_path / "data"
    paths = LakePaths(d)
    syms = ["MEGA01", "LRG01", "MID01", "SML01", "ILQ01"]
    proc = subprocess.Popen([sys.executable, "-m", "microstructure", "poll", "--data-dir", str(d), "--interval", "1",
                             "--cycles", "15", "--symbols", "5", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lake_seen: list[tuple[float, dict[str, dt.datetime]]] = []  # (time the read finished, newest book per symbol)
    checked = 0
    store = None
    try:
        while proc.poll() is None:
            now = dt.datetime.now(dt.UTC)
            snaps = read_snapshots(paths, now - dt.timedelta(hours=1), now + dt.timedelta(minutes=1)).to_pylist()
            newest: dict[str, dt.datetime] = {}
            for s in snaps:
                newest[s["symbol"]] = max(newest.get(s["symbol"], s["event_ts"]), s["event_ts"])
            lake_seen.append((time.time(), newest))
            if store is None:
                if not newest:
                    time.sleep(0.1)
                    continue
                store = open_store(d)  # once the poller has created the data dir and its store
            asked = time.time()
            online = {r.symbol: r for r in read_online(store, syms, freshness_s=3600)}
            before = [held for t, held in lake_seen if t <= asked - 1.5]
            if before:
                held = before[-1]
                for sym, ev in held.items():
                    r = online[sym]
                    assert r.found and r.event_ts is not None, r
                    assert r.event_ts >= ev, (sym, r.event_ts, ev)
                    checked += 1
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out)["online_pushed"] > 0
    assert checked >= 5 * 10, checked  # compared through most of the run, not once at its end
    # After the last cycle: each symbol's online book is the lake's newest, to the microsecond.
    assert store is not None
    now = dt.datetime.now(dt.UTC)
    final = read_snapshots(paths, now - dt.timedelta(hours=1), now + dt.timedelta(minutes=1)).to_pylist()
    newest = {s: max(r["event_ts"] for r in final if r["symbol"] == s) for s in syms}
    for r in read_online(store, syms, freshness_s=3600):
        assert r.event_ts == newest[r.symbol], r
        assert r.features["event_ts_us"] == _us(r.event_ts)
    assert any(r.event_ts is not None and r.event_ts.microsecond for r in read_online(store, syms))


def test_event_ts_us_is_declared_and_typed():
    from microstructure.contract.schemas import DECLARATION, FEATURES_SCHEMA

    col = next(c for c in DECLARATION.features if c.name == "event_ts_us")
    assert col.type == pa.int64() and col.unit == "µs" and col.not_null
    assert FEATURES_SCHEMA.field("event_ts_us").type == pa.int64()
