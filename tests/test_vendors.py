"""Vendor sources through their official clients, over real HTTP, against a local server.

Nothing here patches a client: the sources are pointed at the server with the documented base-URL
variables, and the server answers in each vendor's JSON shape, or fails the way vendors fail.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from microstructure.jobs import poll as pipeline
from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect
from microstructure.sources.chain import AuthRejected, ChainSource, Group, build_chain
from microstructure.sources.guard import CircuitBreaker, Limits, TokenBucket
from microstructure.sources.vendor import ConfigError
from tests.vendor_server import (
    ALPACA_CRYPTO,
    ALPACA_STOCKS,
    POLY_STOCKS,
    SECRET_ID,
    SECRET_KEY,
    SECRET_POLY,
    alpaca_books,
    alpaca_quotes,
    poly_crypto_book,
    poly_crypto_path,
    poly_quote,
    poly_snapshot,
    respond,
)

AT = dt.datetime(2025, 11, 24, 16, 0, 1, tzinfo=dt.UTC)
FAST = {"timeout_s": 0.8, "rate_per_s": 1000.0, "burst": 1000.0}


def chain_file(tmp_path: Path, deadline: float = 2.0, failures: int = 3, cooldown: float = 30.0,
               retries: int = 1) -> Path:
    lim = "\n".join(f"{k} = {v}" for k, v in FAST.items())
    p = tmp_path / "sources.toml"
    p.write_text(f"""
cycle_deadline_s = {deadline}
[sources.polygon]
kind = "polygon"
asset = "stocks"
retries = {retries}
breaker_failures = {failures}
breaker_cooldown_s = {cooldown}
{lim}
[sources.alpaca]
kind = "alpaca"
asset = "stocks"
feed = "iex"
{lim}
[sources.alpaca_crypto]
kind = "alpaca"
asset = "crypto"
{lim}
[sources.polygon_crypto]
kind = "polygon"
asset = "crypto"
retries = 0
{lim}
[groups.stocks]
chain = ["polygon", "alpaca"]
symbols = ["AAPL", "MSFT"]
[groups.crypto]
chain = ["alpaca_crypto", "polygon_crypto"]
symbols = ["BTC/USD"]
""")
    return p


def outcome(res, symbol):
    rows = res.outcomes.to_pylist()
    return next(r for r in rows if r["symbol"] == symbol)


def good_alpaca(server):
    server.expect_request(ALPACA_STOCKS).respond_with_handler(
        respond(alpaca_quotes({"AAPL": (189.50, 3, 189.52, 2), "MSFT": (410.0, 1, 410.05, 4)})))
    server.expect_request(ALPACA_CRYPTO).respond_with_handler(
        respond(alpaca_books({"BTC/USD": ([(95000.0 - i, 0.1 * (i + 1)) for i in range(12)][::-1],
                                          [(95001.0 + i, 0.2) for i in range(12)])})))


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
    req = env.log[0][0]
    assert req.headers["Authorization"] == f"Bearer {SECRET_POLY}"
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
    if fault == "429":
        # Polygon's client would sleep Retry-After between its retries: 30 s would stall a naive poller.
        env.expect_request(POLY_STOCKS).respond_with_handler(
            respond({"status": "ERROR"}, status=429, headers={"Retry-After": "30"}))
    else:
        env.expect_request(POLY_STOCKS).respond_with_handler(
            respond(poly_snapshot(poly_quote("AAPL", 1, 2)), sleep_s=5))
    good_alpaca(env)
    chain = build_chain(chain_file(tmp_path, deadline=2.0))
    t0 = time.monotonic()
    res = chain.poll(["AAPL", "MSFT"], AT)
    took = time.monotonic() - t0
    o = outcome(res, "AAPL")
    assert o["source"] == "alpaca"
    expected = "rate_limited" if fault == "429" else "timeout"  # the vendor's 429 vs our per-call timeout
    assert o["detail"].startswith(f"polygon: {expected}")
    assert took < 2.0  # the cycle deadline held
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
    # alpaca-py would sleep a fixed 3 s before retrying a 429; we see the 429 and its Retry-After first.
    env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=503))
    env.expect_request(ALPACA_STOCKS).respond_with_handler(
        respond({"message": "too many requests."}, status=429, headers={"Retry-After": "1"}))
    chain = build_chain(chain_file(tmp_path, deadline=1.5, retries=0))
    t0 = time.monotonic()
    res = chain.poll(["AAPL"], AT)
    assert time.monotonic() - t0 < 0.5
    o = outcome(res, "AAPL")
    assert o["source"] is None and o["book_levels"] == 0
    assert o["error_class"] == "rate_limited" and "polygon: server_error; alpaca: rate_limited" in o["detail"]
    assert sum(1 for r, _ in env.log if r.path == ALPACA_STOCKS) == 1  # the SDK did not retry it
    chain.close()


def test_breaker_opens_skips_the_source_then_closes_after_cooldown(env, tmp_path):
    env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=500))
    good_alpaca(env)
    chain = build_chain(chain_file(tmp_path, failures=2, cooldown=0.6, retries=0))
    poly = chain.sources["polygon"]
    for _ in range(2):
        assert outcome(chain.poll(["AAPL"], AT), "AAPL")["detail"].startswith("polygon: server_error")
    assert poly.guard.breaker.state == "open"
    calls = sum(1 for r, _ in env.log if r.path == POLY_STOCKS)
    res = chain.poll(["AAPL"], AT)
    assert outcome(res, "AAPL")["detail"].startswith("polygon: breaker_open")
    assert sum(1 for r, _ in env.log if r.path == POLY_STOCKS) == calls  # not called while open
    assert outcome(res, "AAPL")["source"] == "alpaca"
    time.sleep(0.7)  # cool-down over: one trial call goes through, succeeds, and closes the breaker
    env.clear_handlers() if hasattr(env, "clear_handlers") else None
    env.handlers.clear()
    env.expect_request(POLY_STOCKS).respond_with_json(poly_snapshot(poly_quote("AAPL", 189.5, 189.52)))
    good_alpaca(env)
    res = chain.poll(["AAPL"], AT)
    assert outcome(res, "AAPL")["source"] == "polygon" and poly.guard.breaker.state == "closed"
    chain.close()


# ---- guard parts (property-style, with a controllable clock) ------------------------------------
def test_token_bucket_and_breaker_with_a_fake_clock():
    now = [0.0]
    b = TokenBucket(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert b.take() and not b.take()
    br = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    br.record(False)
    assert br.allow()
    br.record(False)
    assert br.state == "open" and not br.allow()
    now[0] += 10
    assert br.state == "half_open" and br.allow() and not br.allow()  # exactly one trial
    br.record(False)
    assert br.state == "open"
    now[0] += 10
    assert br.allow()
    br.record(True)
    assert br.state == "closed" and br.opened_count == 1


def test_throttled_calls_are_recorded_not_made(env, tmp_path):
    good_alpaca(env)
    chain = ChainSource({}, [Group("stocks", [], "stocks", ["AAPL"])])
    assert outcome(chain.poll(["AAPL"], AT), "AAPL")["error_class"] == "not_configured"
    from microstructure.sources.alpaca import AlpacaSource

    src = AlpacaSource("alpaca", "stocks", Limits(rate_per_s=0.001, burst=1, timeout_s=1))
    chain = ChainSource({"alpaca": src}, [Group("stocks", ["alpaca"], "stocks", ["AAPL"])])
    assert outcome(chain.poll(["AAPL"], AT), "AAPL")["source"] == "alpaca"
    o = outcome(chain.poll(["AAPL"], AT), "AAPL")
    assert o["error_class"] == "throttled"
    assert sum(1 for r, _ in env.log if r.path == ALPACA_STOCKS) == 1
    chain.close()


# ---- through the pipeline: lake, outcomes, coverage, no secrets ----------------------------------
def test_chain_poll_into_the_lake_records_outcomes_and_coverage(env, tmp_path):
    env.expect_request(POLY_STOCKS).respond_with_json(
        poly_snapshot(poly_quote("AAPL", 189.50, 189.52)))  # MSFT missing at Polygon -> Alpaca
    env.expect_request(poly_crypto_path("X:DOGEUSD")).respond_with_json({"status": "OK", "data": {}})
    good_alpaca(env)
    paths = LakePaths(tmp_path / "d")
    chain = build_chain(chain_file(tmp_path), ["DOGE/USD"])
    times = pipeline.cycle_times(AT, 2.0, 3, 0)
    stats = pipeline.poll(paths, chain, ["AAPL", "MSFT", "BTC/USD", "DOGE/USD"], times)
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


def test_no_key_reaches_logs_lake_or_prefect_results(env, tmp_path, caplog):
    import logging
    import os
    import subprocess
    import sys

    env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=500))
    good_alpaca(env)
    cfg = chain_file(tmp_path)
    d = tmp_path / "data"
    caplog.set_level(logging.DEBUG)
    envv = {**os.environ, "PREFECT_LOGGING_LEVEL": "DEBUG"}
    r = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--source", "chain", "--sources-config",
                        str(cfg), "--cycles", "2", "--interval", "0", "--no-online", "--json", "--data-dir", str(d)],
                       capture_output=True, text=True, env=envv, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["served_by"] == {"alpaca": 4, "alpaca_crypto": 2}  # the keys were used
    texts = [r.stdout, r.stderr, caplog.text]
    texts += [f.read_bytes().decode("latin-1") for f in d.rglob("*") if f.is_file()]
    for secret in (SECRET_POLY, SECRET_ID, SECRET_KEY):
        assert not any(secret in t for t in texts), secret
