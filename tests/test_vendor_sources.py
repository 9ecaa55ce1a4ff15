"""Vendor sources through their official clients, over real HTTP, against a local server.

Nothing here patches a client: the sources are pointed at the server with the documented base-URL
variables, and the server answers in each vendor's JSON shape, or fails the way vendors fail: a fault falls
back to the next vendor, a slow or rate-limited vendor cannot stall the cycle, a bad symbol in a batch call
never blacks out the healthy ones, and the outcomes land in the lake with their coverage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc
import pytest
from werkzeug import Request, Response

from microstructure.contract.book import validate
from microstructure.jobs import poll as pipeline
from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect
from microstructure.sources.chain import AuthRejected
from microstructure.sources.chain_config import build_chain
from microstructure.sources.vendor import ConfigError
from tests.vendor_server import (
    ALPACA_STOCKS,
    AT,
    POLY_STOCKS,
    SECRET_POLY,
    Hang,
    alpaca_quotes,
    chain_file,
    good_alpaca,
    outcome,
    poly_crypto_book,
    poly_crypto_path,
    poly_quote,
    poly_snapshot,
    respond,
)


# ---- normal answers ------------------------------------------------------------------------------
def test_polygon_nbbo_is_one_level_and_alpaca_crypto_is_real_l2(env, tmp_path):
    env.expect_request(POLY_STOCKS, query_string={"tickers": "AAPL,MSFT", "include_otc": "false"}).respond_with_json(
        poly_snapshot(poly_quote("AAPL", 189.50, 189.52), poly_quote("MSFT", 410.0, 410.05, 1, 4)))
    good_alpaca(env)
    chain = build_chain(chain_file(tmp_path))
    res = chain.poll(["AAPL", "MSFT", "BTC/USD"], AT)
    raw = {r["symbol"]: r for r in res.raw.to_pylist()}
    assert raw["AAPL"]["source"] == "polygon" and raw["AAPL"]["bid_px_1"] == 189.50 and raw["AAPL"]["ask_sz_1"] == 2
    assert raw["AAPL"]["bid_px_2"] is None  # NBBO only: no invented depth
    assert raw["AAPL"]["book_levels"] == 1
    assert raw["AAPL"]["event_ts"] == dt.datetime(2025, 11, 24, 16, tzinfo=dt.UTC)
    btc = raw["BTC/USD"]
    assert btc["source"] == "alpaca_crypto" and btc["book_levels"] == 10
    # The vendor's unsorted 12 levels become the best ten a side, best first.
    assert btc["bid_px_1"] == 95000.0 and btc["bid_px_10"] == 94991.0 and btc["ask_px_1"] == 95001.0
    assert outcome(res, "AAPL")["detail"] == "polygon: ok" and outcome(res, "AAPL")["book_levels"] == 1
    # The key went to the vendor in the way it documents (the Authorization header).
    # (Found by path and query: the stand-in lives for the session, and a call an earlier test gave up on may land
    # in this test's log.)
    polys = [r for r, _ in env.log if r.path == POLY_STOCKS and r.args.get("tickers") == "AAPL,MSFT"]
    assert polys and all(r.headers["Authorization"] == f"Bearer {SECRET_POLY}" for r in polys)
    chain.close()


def test_polygon_crypto_book_and_deprecated_empty_answer(env, tmp_path):
    env.expect_request(poly_crypto_path("X:BTCUSD")).respond_with_json(
        poly_crypto_book("X:BTCUSD", [(95000.0, 1.0), (94999.0, 2.0)], [(95001.0, 0.5)]))
    env.expect_request(poly_crypto_path("X:ETHUSD")).respond_with_json({"status": "OK", "data": {}})
    chain = build_chain(chain_file(tmp_path), ["ETH/USD"], only="polygon")
    res = chain.poll(["BTC/USD", "ETH/USD"], AT)
    btc = res.raw.to_pylist()[0]
    assert btc["symbol"] == "BTC/USD" and btc["bid_sz_1"] == 1.0 and btc["book_levels"] == 2
    assert (btc["bid_px_2"], btc["bid_sz_2"]) == (94999.0, 2.0)
    eth = outcome(res, "ETH/USD")
    assert eth["source"] is None and eth["error_class"] == "unavailable"  # not an empty book
    assert res.rejected.num_rows == 0
    chain.close()


# ---- faults -> fallback --------------------------------------------------------------------------
@pytest.mark.parametrize("fault, expected", [
    ("500", "server_error"),
    ("malformed", "malformed"),
    ("401", "auth"),
    ("crossed", "invalid_book"),
    ("empty", "unknown_symbol"),
])
def test_primary_fault_falls_back_to_alpaca(env, tmp_path, fault, expected):
    if fault == "500":
        env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=500))
    elif fault == "malformed":
        env.expect_request(POLY_STOCKS).respond_with_handler(respond(raw='{"status": "OK", "tickers": [{"tic'))
    elif fault == "401":
        env.expect_request(POLY_STOCKS).respond_with_handler(
            respond({"status": "ERROR", "request_id": "x", "error": "Unknown API Key"}, status=401))
    elif fault == "crossed":
        env.expect_request(POLY_STOCKS).respond_with_json(
            poly_snapshot(poly_quote("AAPL", 189.60, 189.52), poly_quote("MSFT", 410.10, 410.05)))
    else:
        env.expect_request(POLY_STOCKS).respond_with_json(poly_snapshot())
    good_alpaca(env)
    chain = build_chain(chain_file(tmp_path))
    res = chain.poll(["AAPL", "MSFT"], AT)
    for s in ("AAPL", "MSFT"):
        o = outcome(res, s)
        assert o["source"] == "alpaca" and o["error_class"] is None
        assert o["detail"].startswith(f"polygon: {expected}") and o["detail"].endswith("alpaca: ok")
    assert set(pc.unique(res.raw.column("source")).to_pylist()) == {"alpaca"}
    if fault == "crossed":  # the vendor's bad book is kept in quarantine with its reason
        assert res.rejected.column("reason").to_pylist() == ["crossed_book", "crossed_book"]
        assert set(res.rejected.column("source").to_pylist()) == {"polygon"}
    chain.close()


def test_every_source_refusing_the_key_is_one_clear_error(env, tmp_path):
    env.expect_request(POLY_STOCKS).respond_with_handler(
        respond({"status": "ERROR", "error": "Unknown API Key"}, status=401))
    env.expect_request(ALPACA_STOCKS).respond_with_handler(respond({"message": "forbidden."}, status=403))
    chain = build_chain(chain_file(tmp_path))
    with pytest.raises(AuthRejected, match="refused"):
        chain.poll(["AAPL"], AT)
    chain.close()


def test_missing_key_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("POLYGON_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="POLYGON_API_KEY is not set"):
        build_chain(chain_file(tmp_path), only="polygon")


@pytest.mark.parametrize("fault", ["429", "hang"])
def test_slow_or_rate_limited_primary_cannot_stall_the_cycle(env, tmp_path, fault):
    hang = Hang()
    if fault == "429":
        # Polygon's client would sleep Retry-After between its retries: 30 s would stall a naive poller (and
        # the call would then end in our timeout, not as rate_limited).
        env.expect_request(POLY_STOCKS).respond_with_handler(
            respond({"status": "ERROR"}, status=429, headers={"Retry-After": "30"}))
    else:
        # Polygon stops answering: it would answer with a valid AAPL book, but only after the cycle gave up on it.
        env.expect_request(POLY_STOCKS).respond_with_handler(
            respond(poly_snapshot(poly_quote("AAPL", 1, 2)), hang=hang))
    good_alpaca(env)
    chain = build_chain(chain_file(tmp_path, deadline=2.0))
    try:
        res = chain.poll(["AAPL", "MSFT"], AT)
    finally:
        hang.release()
    o = outcome(res, "AAPL")
    # The cycle did not wait for Polygon: a cycle that had would hold Polygon's book (or none), not Alpaca's.
    assert o["source"] == "alpaca"
    expected = "rate_limited" if fault == "429" else "timeout"  # the vendor's 429 vs our per-call timeout
    assert o["detail"].startswith(f"polygon: {expected}")
    if fault == "429":
        # Retry-After is honoured: for the next 30 s Polygon is not called at all.
        calls = sum(1 for r, _ in env.log if r.path == POLY_STOCKS)
        assert calls == 1
        o = outcome(chain.poll(["AAPL", "MSFT"], AT), "AAPL")
        assert o["detail"].startswith("polygon: rate_limited") and o["source"] == "alpaca"
        assert sum(1 for r, _ in env.log if r.path == POLY_STOCKS) == calls
        assert chain.sources["polygon"].guard.breaker.state == "closed"  # backing off is not a failure
    chain.close()


def test_alpaca_429_is_rate_limited_at_once_not_slept_on(env, tmp_path):
    # alpaca-py would sleep a fixed 3 s before retrying a 429; we see the 429 and its Retry-After first. Had the
    # SDK slept, the call would have ended in our 0.8 s timeout, not as rate_limited, and been retried.
    env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=503))
    env.expect_request(ALPACA_STOCKS).respond_with_handler(
        respond({"message": "too many requests."}, status=429, headers={"Retry-After": "1"}))
    chain = build_chain(chain_file(tmp_path, deadline=1.5, retries=0))
    res = chain.poll(["AAPL"], AT)
    o = outcome(res, "AAPL")
    assert o["source"] is None and o["book_levels"] == 0
    assert o["error_class"] == "rate_limited" and "polygon: server_error; alpaca: rate_limited" in o["detail"]
    assert sum(1 for r, _ in env.log if r.path == ALPACA_STOCKS) == 1  # the SDK did not retry it
    chain.close()


# ---- a batch call failing because of one symbol, polled live through the CLI ----------------------
HEALTHY = ["AAPL", "MSFT", "NVDA", "AMZN", "META", "GOOG"]

BAD = {"HANG": "timeout", "BOOM": "server_error", "CROSS": "invalid_book", "EMPTY": "unknown_symbol"}


def cli(*args: object, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _now_ns() -> int:
    return time.time_ns()


def polygon_batch(hang: Hang) -> Callable[[Request], Response]:
    """Polygon snapshot-all: the whole call hangs if HANG is asked for (until the poller has exited), 500s if
    BOOM is; CROSS comes back crossed; EMPTY is not in the answer."""

    def handler(request: Request) -> Response:
        tickers = request.args.get("tickers", "").split(",")
        if "HANG" in tickers:
            hang.wait()
        if "BOOM" in tickers:
            return Response('{"status": "ERROR"}', status=500, content_type="application/json")
        rows = [poly_quote(t, 100.0, 99.9 if t == "CROSS" else 100.02, t=_now_ns()) for t in tickers if t != "EMPTY"]
        return Response(json.dumps(poly_snapshot(*rows)), content_type="application/json")

    return handler


def alpaca_batch(hang: Hang) -> Callable[[Request], Response]:
    def handler(request: Request) -> Response:
        syms = request.args.get("symbols", "").split(",")
        if "HANG" in syms:
            hang.wait()
        if "BOOM" in syms:
            return Response('{"message": "internal error"}', status=500, content_type="application/json")
        body = alpaca_quotes({s: (100.0, 1, 99.9 if s == "CROSS" else 100.03, 1) for s in syms if s != "EMPTY"})
        stamp = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        for q in body["quotes"].values():
            q["t"] = stamp
        return Response(json.dumps(body), content_type="application/json")

    return handler


def sources_toml(tmp_path: Path, timeout: float = 0.4, deadline: float = 2.5) -> Path:
    lim = f"timeout_s = {timeout}\nrate_per_s = 1000.0\nburst = 1000.0"
    p = tmp_path / "sources.toml"
    p.write_text(f"""
cycle_deadline_s = {deadline}
[sources.polygon]
kind = "polygon"
asset = "stocks"
retries = 0
{lim}
[sources.alpaca]
kind = "alpaca"
asset = "stocks"
{lim}
[groups.stocks]
chain = ["polygon", "alpaca"]
symbols = {json.dumps(HEALTHY + list(BAD))}
""")
    return p


@pytest.mark.integration  # the CLI's live poll in a subprocess, 20 one-second cycles
def test_bad_symbols_in_a_batch_never_black_out_the_healthy_ones_and_poll_exits_promptly(env, tmp_path):
    # The hanging calls never answer while the poller runs (the stand-in holds them longer than the CLI's 300 s
    # timeout): a cycle, or the exit, that waited for one would never come, and the run would hit that timeout
    # instead of exiting 0 with every cycle recorded.
    hang = Hang(safety_s=600.0)
    env.expect_request(POLY_STOCKS).respond_with_handler(polygon_batch(hang))
    env.expect_request(ALPACA_STOCKS).respond_with_handler(alpaca_batch(hang))
    d, ack = tmp_path / "data", tmp_path / "ack.log"
    cycles = 20
    started = dt.datetime.now(dt.UTC)
    try:
        r = cli("poll", "--source", "chain", "--sources-config", sources_toml(tmp_path), "--interval", "1",
                "--cycles", cycles, "--no-online", "--json", "--data-dir", d, "--ack-log", ack, env=dict(os.environ))
    finally:
        hang.release()
    ended = dt.datetime.now(dt.UTC)
    assert r.returncode == 0, r.stderr
    # The vendors did hang, and the poller exited with those calls still unanswered; every cycle was acknowledged.
    assert hang.entered > 0
    assert len(ack.read_text().splitlines()) == cycles
    con = connect(LakePaths(d))
    served = dict(con.sql("SELECT symbol, count(*) FILTER (WHERE error_class IS NULL) FROM outcomes "
                          "GROUP BY symbol").fetchall())
    n_cycles = con.sql("SELECT count(DISTINCT cycle_ts) FROM outcomes").fetchall()[0][0]
    assert n_cycles >= cycles - 2  # a cycle that overran skips a slot, never queues up
    for s in HEALTHY:
        assert served[s] >= 0.95 * n_cycles, (s, served[s], n_cycles)
    # Each bad symbol has its own reason, every cycle, and was never served.
    for s, cls in BAD.items():
        got = con.sql("SELECT DISTINCT error_class FROM outcomes WHERE symbol = ?", params=[s]).fetchall()
        assert got == [(cls,)], (s, got)
    # The healthy ones kept riding Polygon's batch: the source itself was never judged broken.
    by = dict(con.sql("SELECT source, count(*) FROM outcomes WHERE error_class IS NULL GROUP BY 1").fetchall())
    assert by.get("polygon", 0) >= 0.95 * n_cycles * len(HEALTHY)
    # Time is the clock's: the vendor stamped every book during this run, and we received each one after that.
    first, last, ordered = con.sql("SELECT min(event_ts), max(received_ts), bool_and(received_ts >= event_ts) "
                                   "FROM snapshots").fetchall()[0]
    assert started <= first and last <= ended and ordered, (started, first, last, ended)


# ---- the whole market in one unfiltered call -----------------------------------------------------
def test_whole_market_source_shapes_every_ticker(server, monkeypatch):
    """Polygon's snapshot-all without a filter, through the official client: every quoted ticker becomes an L1
    row; a ticker without a quote is quarantined, not dropped."""
    from microstructure.sources.polygon import WholeMarketSource

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


@pytest.mark.integration  # the CLI's live poll and online read in subprocesses
def test_poll_the_whole_market_from_the_cli(server, tmp_path):
    """`poll --source polygon-market`: every ticker of one unfiltered snapshot call, live, into the lake and
    online (the real CLI in a subprocess, the official client against the local server)."""
    def answer(_request):  # type: ignore[no-untyped-def]
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


# ---- through the pipeline: lake, outcomes, coverage ----------------------------------------------
def test_chain_poll_into_the_lake_records_outcomes_and_coverage(env, tmp_path):
    env.expect_request(POLY_STOCKS).respond_with_json(
        poly_snapshot(poly_quote("AAPL", 189.50, 189.52)))  # MSFT missing at Polygon -> Alpaca
    env.expect_request(poly_crypto_path("X:DOGEUSD")).respond_with_json({"status": "OK", "data": {}})
    good_alpaca(env)
    paths = LakePaths(tmp_path / "d")
    chain = build_chain(chain_file(tmp_path), ["DOGE/USD"])
    times = pipeline.cycle_times(AT, 2.0, 3, 0)
    stats = pipeline.poll_cycles(paths, chain, ["AAPL", "MSFT", "BTC/USD", "DOGE/USD"], times)
    chain.close()
    assert stats.served_by == {"polygon": 3, "alpaca": 3, "alpaca_crypto": 3}
    assert stats.missing == {"unavailable": 3}  # DOGE/USD: neither vendor had it
    assert stats.coverage() == {"l2": 1, "shallow": 0, "l1_only": 2, "none": 1}
    from microstructure.lake.coverage import coverage

    cov = coverage(paths)
    by = {r["source"]: r for r in cov["sources"]}
    assert by["alpaca_crypto"]["l2"] == 1 and by["polygon"]["l1_only"] == 1 and by["alpaca"]["l1_only"] == 1
    assert cov["overall"] | {"none_symbols": None} == {"l2": 1, "shallow": 0, "l1_only": 2, "none": 1, "symbols": 4,
                                                        "none_symbols": None}
    assert cov["overall"]["none_symbols"] == ["DOGE/USD"]
    con = connect(paths)
    assert con.sql("SELECT count(*) FROM outcomes").fetchall()[0][0] == 12
    assert con.sql("SELECT DISTINCT detail FROM outcomes WHERE symbol = 'DOGE/USD'").fetchall() == [
        ("alpaca_crypto: unknown_symbol; polygon_crypto: unavailable | polygon_crypto crypto book empty or "
         "deprecated for DOGE/USD",)]
    assert con.sql("SELECT count(*) FROM snapshots").fetchall()[0][0] >= 3
