"""ccxt venues through the real ccxt client, over real HTTP, against local stand-ins of binance and hitbtc.

Nothing patches ccxt: each venue is pointed at its stand-in with ``MICROSTRUCTURE_CCXT_URL_<EXCHANGE>``, and the
stand-ins answer in the venues' own JSON shapes (``tests/ccxt_venues.py``), count every request, and answer 429 or
5xx for the pairs a test names.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microstructure.lake.paths import LakePaths
from microstructure.lake.views import connect
from microstructure.sources.ccxt_source import BOOK_ENDPOINT, CcxtSource, book_calls_per_s, point_at, url_env
from microstructure.sources.chain_config import build_chain
from microstructure.sources.guard import Limits, SourceError
from microstructure.sources.vendor import ConfigError
from tests.ccxt_venues import BINANCE_RPS, HITBTC_RPS, Venue, binance, hitbtc, hitbtc_market, pairs, start_server

N_BINANCE, N_HITBTC = 30, 120  # 150 pairs; binance's 30 are 75% of the 40 depth calls its limit allows in 2 s


@pytest.fixture(scope="module")
def _servers():
    a, b = start_server(), start_server()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def venues(_servers, monkeypatch) -> tuple[Venue, Venue]:
    """binance on one local server, hitbtc on the other, and the environment pointing ccxt at them."""
    for s in _servers:
        s.clear()
    vb = binance(_servers[0], ["BTC/USDT", "ETH/USDT", *pairs(N_BINANCE - 2, "USDT")])
    vh = hitbtc(_servers[1], pairs(N_HITBTC, "USDT", offset=100))
    monkeypatch.setenv(url_env("binance"), vb.url)
    monkeypatch.setenv(url_env("hitbtc"), vh.url)
    return vb, vh


def sources_toml(tmp_path: Path, vb: Venue, vh: Venue, deadline: float = 1.9) -> Path:
    p = tmp_path / "sources.toml"
    p.write_text(f"""
cycle_deadline_s = {deadline}

[sources.binance]
kind = "ccxt"
exchange = "binance"
asset = "crypto"
rate_per_s = {BINANCE_RPS}
burst = 1
timeout_s = 0.8

[sources.hitbtc]
kind = "ccxt"
exchange = "hitbtc"
asset = "crypto"
rate_per_s = {HITBTC_RPS}
burst = 2
timeout_s = 0.8

[groups.crypto_binance]
chain = ["binance"]
symbols = {json.dumps(vb.symbols)}

[groups.crypto_hitbtc]
chain = ["hitbtc"]
symbols = {json.dumps(vh.symbols)}
""")
    return p


def _poll(chain, symbols):
    return chain.poll(symbols, dt.datetime.now(dt.UTC))


def _by_symbol(res) -> dict[str, dict]:
    return {r["symbol"]: r for r in res.outcomes.to_pylist()}


# ---- the rate arithmetic, from ccxt's own metadata -------------------------------------------------------
def test_venue_rates_come_from_ccxts_own_rate_limit_and_endpoint_costs():
    # binance: rateLimit 50 ms, depth at limit <= 100 costs 1 -> 20 calls/s (6,000 weight a minute / 5 a call);
    # hitbtc: rateLimit 3.333 ms, public/orderbook costs 10 -> 30 calls/s (its documented market-data limit).
    assert book_calls_per_s("binance") == pytest.approx(BINANCE_RPS)
    assert book_calls_per_s("hitbtc") == pytest.approx(HITBTC_RPS, rel=1e-3)
    # A deeper binance book weighs more: 500 levels cost 5, a quarter of the calls... a fifth.
    assert book_calls_per_s("binance", limit=500) == pytest.approx(BINANCE_RPS / 5)
    # Every venue in the docs' table resolves to a number (the path into ccxt's api table still exists).
    assert all(book_calls_per_s(x) > 0 for x in BOOK_ENDPOINT)


# ---- 150 pairs, two venues, a 2 s cycle ----------------------------------------------------------------
@pytest.mark.integration  # the CLI's live poll in a subprocess, four 2-second cycles
def test_150_pairs_over_two_venues_fit_a_2s_cycle_within_each_venues_limit(venues, tmp_path):
    vb, vh = venues
    d = tmp_path / "data"
    cycles = 4
    r = subprocess.run([sys.executable, "-m", "microstructure", "poll", "--source", "chain", "--sources-config",
                        str(sources_toml(tmp_path, vb, vh)), "--interval", "2", "--cycles", str(cycles), "--no-online",
                        "--json", "--data-dir", str(d)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    con = connect(LakePaths(d))
    per_cycle = con.sql("SELECT cycle_ts, count(*) FILTER (WHERE error_class IS NULL), min(book_levels) "
                        "FILTER (WHERE error_class IS NULL) FROM outcomes GROUP BY 1 ORDER BY 1").fetchall()
    assert len(per_cycle) >= cycles - 1, per_cycle  # a cycle that overran skips a slot, never queues up
    # Every pair was served with its ten levels every cycle.
    assert all(n == N_BINANCE + N_HITBTC and lv == 10 for _, n, lv in per_cycle), (
        per_cycle, con.sql("SELECT cycle_ts, symbol, detail FROM outcomes WHERE error_class IS NOT NULL").fetchall())
    by_source = dict(con.sql("SELECT source, count(DISTINCT symbol) FROM snapshots GROUP BY 1").fetchall())
    assert by_source == {"binance": N_BINANCE, "hitbtc": N_HITBTC}
    # Within each venue's limit: binance one depth call a pair a cycle, spaced 50 ms apart by ccxt's limiter (and
    # our bucket): on average at most 20 a second over the run, at most 40 (one cycle's budget) in any 2 s, and a
    # median gap of ~50 ms (without the limiters a cycle's 30 calls arrive within a few ms). Measured as the
    # stand-in saw them arrive: a busy machine delays some requests and bunches them, which moves a few gaps, not
    # the average or the median. binance's own rule is looser: 6,000 weight a minute, 1,200 such calls.
    hits = sorted(vb.book_hits)
    assert len(hits) == N_BINANCE * len(per_cycle)
    assert (len(hits) - 1) / (hits[-1] - hits[0]) <= BINANCE_RPS
    assert vb.max_in_window(2.0) <= 2 * BINANCE_RPS, vb.max_in_window(2.0)
    gaps = sorted(b - a for a, b in itertools.pairwise(hits))
    assert gaps[len(gaps) // 2] >= 0.5 / BINANCE_RPS, gaps[len(gaps) // 2]  # half the spacing: jitter's room
    # hitbtc: one bulk call a cycle.
    assert len(vh.book_hits) == len(per_cycle)
    assert vh.max_in_window(1.0) <= HITBTC_RPS
    # The market lists were loaded once per run, not per cycle.
    assert sum(p.startswith("/api/v3/exchangeInfo") for p in vb.requests) == 1
    assert sum(p.startswith("/api/3/public/symbol") for p in vh.requests) == 1
    # Time: hitbtc stamps its books (event_ts is its time); binance's depth has none (event_ts is our receipt).
    rows = con.sql("SELECT source, bool_and(event_ts = received_ts), bool_and(received_ts >= event_ts) "
                   "FROM snapshots GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("binance", True, True), ("hitbtc", False, True)], rows


# ---- faults --------------------------------------------------------------------------------------------
@pytest.mark.integration  # ~3 s: binance's 30 depth calls spaced by its limiter
def test_429_and_5xx_give_their_error_classes_and_keep_the_good_symbols(venues, tmp_path):
    vb, vh = venues
    vb.faults.update({"C001USDT": 429, "C002USDT": 502})
    vh.faults.update({"C105USDT": 500})
    chain = build_chain(sources_toml(tmp_path, vb, vh, deadline=10.0))
    try:
        res = _poll(chain, chain.symbols)
    finally:
        chain.close()
    out = _by_symbol(res)
    assert out["C001/USDT"]["error_class"] == "rate_limited"
    assert out["C002/USDT"]["error_class"] == "server_error"
    assert out["C105/USDT"]["error_class"] == "server_error"
    assert "binance: rate_limited" in out["C001/USDT"]["detail"]
    bad = {"C001/USDT", "C002/USDT", "C105/USDT"}
    good = [s for s in chain.symbols if s not in bad]
    # Every other pair of both venues served in the same cycle: the hitbtc batch was split around C105.
    assert all(out[s]["error_class"] is None and out[s]["book_levels"] == 10 for s in good), \
        [(s, out[s]["error_class"]) for s in good if out[s]["error_class"]]
    assert res.raw.num_rows == len(good)
    assert len(vh.book_hits) > 1  # the split: more than the one bulk call


@pytest.mark.integration  # ~4 s: two cycles of binance's 30 spaced depth calls
def test_a_429_with_retry_after_backs_the_venue_off_and_the_other_venue_carries_on(venues, tmp_path):
    vb, vh = venues
    chain = build_chain(sources_toml(tmp_path, vb, vh, deadline=10.0))
    try:
        from werkzeug import Response

        vh.server.clear()
        vh.server.expect_request("/api/3/public/symbol").respond_with_json(
            {s.replace("/", ""): hitbtc_market(s) for s in vh.symbols})
        vh.server.expect_request("/api/3/public/currency").respond_with_json({})
        vh.server.expect_request("/api/3/public/orderbook").respond_with_handler(
            lambda r: Response('{"error": {"code": 429, "message": "Too many requests"}}', status=429,
                               headers={"Retry-After": "60"}, content_type="application/json"))
        first = _by_symbol(_poll(chain, chain.symbols))
        asked = sum(1 for p in vh.server.log if p[0].path == "/api/3/public/orderbook")
        second = _by_symbol(_poll(chain, chain.symbols))
    finally:
        chain.close()
    for res in (first, second):
        assert {res[s]["error_class"] for s in vh.symbols} == {"rate_limited"}
        assert all(res[s]["error_class"] is None for s in vb.symbols)
    # The second cycle did not call hitbtc at all: it asked for 60 s.
    assert sum(1 for p in vh.server.log if p[0].path == "/api/3/public/orderbook") == asked == 1
    assert "Retry-After" in second[vh.symbols[0]]["detail"]


# ---- symbols -------------------------------------------------------------------------------------------
def test_btc_usdt_is_asked_by_the_venues_id_and_lands_as_btc_usdt(venues):
    vb, _ = venues
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5))
    try:
        got = src.fetch(["BTC/USDT", "BTCUSDT", "btc/usdt", "BTC/USD"], dt.datetime.now(dt.UTC),
                        time.monotonic() + 10)
    finally:
        src.close()
    assert [q.symbol for q in got.quotes] == ["BTC/USDT"]
    assert any(p == "/api/v3/depth?symbol=BTCUSDT&limit=10" for p in vb.requests), vb.requests
    errs = {s: (e.error_class, e.detail) for s, e in got.errors.items()}
    # The venue's own spelling, or lower case, is not ours: refused with the spelling to use.
    assert errs["BTCUSDT"][0] == errs["btc/usdt"][0] == "unknown_symbol"
    assert "BTC/USDT" in errs["btc/usdt"][1]
    # BTC/USD is not BTC/USDT: a venue listing only the latter has no book for the former, and none is made up.
    assert errs["BTC/USD"] == ("unknown_symbol", "binance lists no market BTC/USD")
    assert sum(p.startswith("/api/v3/depth") for p in vb.requests) == 1


def test_ccxt_pairs_get_the_crypto_threshold_profile():
    from microstructure.sources.chain import asset_of
    from microstructure.trading.thresholds import ThresholdSet

    for s in ("BTC/USDT", "C007/USDT", "ETH/BTC"):
        assert asset_of(s) == "crypto"
        assert ThresholdSet().profile_of(s) == "crypto"


# ---- where requests go ---------------------------------------------------------------------------------
def test_ccxt_url_override_refuses_a_non_loopback_http_host(monkeypatch):
    monkeypatch.setenv(url_env("binance"), "http://api.example.com")
    with pytest.raises(ConfigError, match="loopback"):
        CcxtSource("b", exchange="binance")
    monkeypatch.setenv(url_env("binance"), "http://127.0.0.1:9@evil.example.com")
    with pytest.raises(ConfigError):
        CcxtSource("b", exchange="binance")
    # https may point anywhere (TLS authenticates the host); every API URL of the venue moves, keeping its path.
    monkeypatch.setenv(url_env("binance"), "https://mirror.example.com")
    src = CcxtSource("b", exchange="binance")
    try:
        api = src.client.urls["api"]
        assert api["public"] == "https://mirror.example.com/api/v3"
        assert all(v.startswith("https://mirror.example.com/") for v in api.values() if isinstance(v, str))
    finally:
        src.close()


def test_point_at_keeps_each_urls_path_under_the_new_host():
    api = {"public": "https://api.hitbtc.com/api/3", "nested": {"x": "https://a.b/c/d"}, "n": None}
    assert point_at(api, "http://127.0.0.1:5") == {"public": "http://127.0.0.1:5/api/3",
                                                   "nested": {"x": "http://127.0.0.1:5/c/d"}, "n": None}


@pytest.mark.parametrize("key", ["urls", "hostname", "base_url"])
def test_a_sources_file_setting_urls_is_refused(tmp_path, key):
    p = tmp_path / "sources.toml"
    p.write_text(f"""
[sources.binance]
kind = "ccxt"
exchange = "binance"
asset = "crypto"
{key} = "http://attacker.example.com"
[groups.crypto]
chain = ["binance"]
symbols = ["BTC/USDT"]
""")
    with pytest.raises(ConfigError, match="MICROSTRUCTURE_CCXT_URL_"):
        build_chain(p)


def test_a_ccxt_source_must_name_a_ccxt_exchange_and_be_crypto(tmp_path):
    with pytest.raises(ConfigError, match="ccxt exchange id"):
        CcxtSource("x", exchange="nosuchvenue")
    with pytest.raises(ConfigError, match="crypto only"):
        CcxtSource("x", asset="stocks", exchange="binance")


def test_pairs_beyond_a_venues_budget_are_throttled_never_sent(venues):
    """50 binance pairs against a 1 s deadline: our bucket (20 a second, burst 1) lets about 20 calls through and
    records the rest as throttled, without a request; the ones sent are served."""
    vb, _ = venues
    vb.symbols += pairs(20, "USDT", offset=500)  # 50 listed pairs
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=BINANCE_RPS, burst=1))
    try:
        src.fetch(["BTC/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 10)  # markets loaded, bucket spent
        sent_before = len(vb.book_hits)
        got = src.fetch(vb.symbols, dt.datetime.now(dt.UTC), time.monotonic() + 1.0)
    finally:
        src.close()
    sent = len(vb.book_hits) - sent_before
    assert sent <= BINANCE_RPS * 1.0 + 2, sent
    assert sent - 2 <= len(got.quotes) <= sent  # a call still in flight at the deadline is sent but not served
    assert {e.error_class for e in got.errors.values()} <= {"throttled", "deadline"}
    assert len(got.quotes) + len(got.errors) == len(vb.symbols)
    assert sum(e.error_class == "throttled" for e in got.errors.values()) >= len(vb.symbols) - sent - 2


def test_poll_source_ccxt_keeps_only_the_ccxt_venues_of_the_file(venues, tmp_path):
    vb, vh = venues
    p = sources_toml(tmp_path, vb, vh)
    p.write_text(p.read_text() + """
[sources.alpaca_stocks]
kind = "alpaca"
asset = "stocks"
[groups.stocks]
chain = ["alpaca_stocks"]
symbols = ["AAPL"]
""")
    chain = build_chain(p, only="ccxt")  # no Alpaca keys needed: its source is never built
    try:
        assert sorted(chain.sources) == ["binance", "hitbtc"]
    finally:
        chain.close()


def test_a_book_the_venue_sent_crossed_or_unreadable_is_quarantined_with_its_reason(venues, tmp_path):
    vb, vh = venues
    from werkzeug import Response

    def books(request):
        asked = request.args.get("symbols", "").split(",")
        out = {sid: {"timestamp": "2026-01-01T00:00:00.000Z", "ask": [["100.5", "1"]], "bid": [["100.4", "1"]]}
               for sid in asked}
        out[asked[0]] = {"timestamp": "2026-01-01T00:00:00.000Z", "ask": [["99", "1"]], "bid": [["101", "1"]]}
        out[asked[1]] = {"timestamp": "2026-01-01T00:00:00.000Z", "ask": [["x", "1"]], "bid": [["100.4", "1"]]}
        return Response(json.dumps(out), content_type="application/json")

    vh.server.clear()
    vh.server.expect_request("/api/3/public/symbol").respond_with_json(
        {s.replace("/", ""): hitbtc_market(s) for s in vh.symbols})
    vh.server.expect_request("/api/3/public/currency").respond_with_json({})
    vh.server.expect_request("/api/3/public/orderbook").respond_with_handler(books)
    chain = build_chain(sources_toml(tmp_path, vb, vh, deadline=10.0))
    try:
        res = chain.poll(vh.symbols[:4], dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC))
    finally:
        chain.close()
    out = _by_symbol(res)
    crossed, unreadable, *good = vh.symbols[:4]
    assert out[crossed]["error_class"] == "invalid_book"
    assert out[unreadable]["error_class"] == "malformed"  # ccxt reads "x" as no price: never a 0 level
    assert all(out[s]["error_class"] is None for s in good)
    assert set(res.rejected.column("symbol").to_pylist()) >= {crossed, unreadable}


def test_a_market_list_that_fails_is_every_pairs_error_and_is_loaded_again_next_cycle(venues):
    vb, _ = venues
    vb.market_fault = 503
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5))
    try:
        first = src.fetch(["BTC/USDT", "ETH/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 5)
        asked_first = set(vb.requests)
        vb.market_fault = None
        second = src.fetch(["BTC/USDT", "ETH/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 5)
    finally:
        src.close()
    # One reason for every pair (not split over: it says nothing about any pair), and no book asked for.
    assert {(e.error_class, "market list" in e.detail) for e in first.errors.values()} == {("server_error", True)}
    assert first.calls_ok == 0 and not first.quotes
    assert asked_first == {"/api/v3/exchangeInfo?"}
    assert [q.symbol for q in second.quotes] == ["BTC/USDT", "ETH/USDT"] and not second.errors


def test_a_venue_that_refuses_connections_is_a_connection_error(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv(url_env("hitbtc"), f"http://127.0.0.1:{s.getsockname()[1]}")
        src = CcxtSource("hitbtc", exchange="hitbtc")
        try:
            got = src.fetch(["BTC/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 5)
        finally:
            src.close()
    assert got.errors["BTC/USDT"].error_class == "connection", got.errors


# ---- review: attacks and bugs ----------------------------------------------------------------------------
def test_a_venue_answering_a_huge_book_is_bounded(venues):
    """A 2M-level (~40 MB) depth answer: read no further than the cap, that pair malformed with the reason, the
    other pairs of the cycle served."""
    from microstructure.sources.ccxt_source import BOOK_BODY_BYTES

    vb, _ = venues
    vb.huge.add("ETHUSDT")
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5, timeout_s=5.0))
    try:
        got = src.fetch(["BTC/USDT", "ETH/USDT", "C003/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 20)
    finally:
        src.close()
    err = got.errors["ETH/USDT"]
    assert (err.error_class, "bytes" in err.detail) == ("malformed", True), err
    assert sorted(q.symbol for q in got.quotes) == ["BTC/USDT", "C003/USDT"]
    # The stand-in stopped writing soon after the cap (what the sockets' buffers held), not at the 40 MB end.
    assert vb.huge_sent < BOOK_BODY_BYTES + 16 * 2**20, vb.huge_sent


_CLOSE_SCRIPT = """
import datetime as dt, gc, threading, time
from microstructure.sources.ccxt_source import CcxtSource
from microstructure.sources.guard import Limits, SourceError
a = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5))
got = a.fetch(["BTC/USDT", "ETH/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 10)
assert len(got.quotes) == 2, got
b = CcxtSource("binance2", exchange="binance")  # closed with its market list still loading
a.close()
b.close()
del a, b
gc.collect()
print(sorted(t.name for t in threading.enumerate()))
"""


@pytest.mark.integration  # a python subprocess
def test_closing_a_ccxt_source_leaves_no_thread_session_or_loop_noise(venues):
    r = subprocess.run([sys.executable, "-W", "default", "-c", _CLOSE_SCRIPT], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['MainThread']", r.stdout
    assert r.stderr == "", r.stderr  # no "Unclosed client session", "Task was destroyed", "Event loop is closed"


def test_a_429_with_retry_after_stops_the_calls_still_queued_for_that_venue(venues):
    """binance answers the cycle's first depth call 429 Retry-After 60: the 29 calls queued behind it in ccxt's
    limiter are not sent (they would hit a venue that asked us to stop), each pair says rate_limited."""
    vb, _ = venues
    vb.faults["BTCUSDT"] = 429
    vb.retry_after = "60"
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5))
    try:
        got = src.fetch(vb.symbols, dt.datetime.now(dt.UTC), time.monotonic() + 10)
    finally:
        src.close()
    assert vb.symbols[0] == "BTC/USDT"
    # The first call, and at most the ones ccxt's limiter had already let go before the 429 arrived.
    assert len(vb.book_hits) <= 3, len(vb.book_hits)
    assert {e.error_class for e in got.errors.values()} == {"rate_limited"}
    assert len(got.errors) + len(got.quotes) == len(vb.symbols)


def test_ccxt_never_logs_a_venues_answer(venues, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5))
    try:
        got = src.fetch(["BTC/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 10)
    finally:
        src.close()
    assert [q.symbol for q in got.quotes] == ["BTC/USDT"]
    leaked = [r.getMessage()[:200] for r in caplog.records if "lastUpdateId" in r.getMessage()
              or "baseAssetPrecision" in r.getMessage()]
    assert not leaked, leaked


def test_rate_per_s_left_unset_is_the_venues_own_book_call_rate(venues, tmp_path):
    vb, vh = venues
    p = sources_toml(tmp_path, vb, vh)
    p.write_text(p.read_text().replace(f"rate_per_s = {BINANCE_RPS}\n", ""))
    chain = build_chain(p)
    try:
        assert chain.sources["binance"].limits.rate_per_s == pytest.approx(book_calls_per_s("binance"))
        assert chain.sources["hitbtc"].limits.rate_per_s == HITBTC_RPS  # set in the file: kept
    finally:
        chain.close()
    src = CcxtSource("h", exchange="hitbtc")
    try:
        assert src.limits.rate_per_s == pytest.approx(book_calls_per_s("hitbtc"))
    finally:
        src.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1.evil.example.com", "http://127.0.0.1@evil.example.com",
                                 "http://localhost.evil.example.com", "http://evil.example.com#@127.0.0.1",
                                 "http://evil.example.com\\@127.0.0.1", "http://0x7f000001", "ftp://127.0.0.1"])
def test_ccxt_url_override_refuses_loopback_lookalikes(monkeypatch, url):
    monkeypatch.setenv(url_env("binance"), url)
    with pytest.raises(ConfigError):
        CcxtSource("b", exchange="binance")


def test_ccxt_url_override_takes_ipv6_loopback(monkeypatch):
    monkeypatch.setenv(url_env("binance"), "http://[::1]:8080")
    src = CcxtSource("b", exchange="binance")
    try:
        assert src.client.urls["api"]["public"] == "http://[::1]:8080/api/v3"
    finally:
        src.close()


@pytest.mark.parametrize("line", ['options = {defaultType = "future"}', 'proxies = "http://evil.example.com"',
                                  'httpsProxy = "http://evil.example.com"', 'aiohttp_proxy = "http://e.example"',
                                  'apiKey = "k"', 'secret = "s"', "verbose = true", "aiohttp_trust_env = true",
                                  'session = "x"'])
def test_a_sources_file_cannot_hand_ccxt_options_proxies_or_keys(tmp_path, line):
    p = tmp_path / "sources.toml"
    p.write_text(f"""
[sources.binance]
kind = "ccxt"
exchange = "binance"
asset = "crypto"
{line}
[groups.crypto]
chain = ["binance"]
symbols = ["BTC/USDT"]
""")
    with pytest.raises(ConfigError):
        build_chain(p)


def test_a_bad_pair_in_one_of_several_bulk_calls_does_not_sink_the_pairs_sharing_its_call(venues):
    """200 hitbtc pairs are two bulk calls (the URL cap); a pair that makes its call answer 500 is found by
    splitting that call, and the other pairs of the same call are served in the same cycle."""
    _, vh = venues
    vh.symbols += pairs(80, "USDT", offset=300)  # 200 listed pairs: two calls of ids
    vh.faults["C350USDT"] = 500
    src = CcxtSource("hitbtc", exchange="hitbtc", limits=Limits(rate_per_s=HITBTC_RPS, burst=2))
    try:
        got = src.fetch(vh.symbols, dt.datetime.now(dt.UTC), time.monotonic() + 10)
    finally:
        src.close()
    assert {s: e.error_class for s, e in got.errors.items()} == {"C350/USDT": "server_error"}
    assert len(got.quotes) == len(vh.symbols) - 1


def test_levels_are_the_best_ten_in_price_order_with_the_venues_numbers_exactly(venues):
    """A venue sending 15 levels a side, shuffled, in its own decimal strings: the best ten of each side are kept,
    bids high to low and asks low to high, each price and size the float of the venue's string."""
    import random

    vb, _ = venues
    bids = [[f"{100 - i * 0.01:.8f}", f"{0.00000001 * (i + 1):.8f}"] for i in range(15)]
    asks = [[f"{100.01 + i * 0.01:.8f}", f"{123456.789 + i:.8f}"] for i in range(15)]
    want_b = [(float(p), float(q)) for p, q in bids[:10]]
    want_a = [(float(p), float(q)) for p, q in asks[:10]]
    random.Random(7).shuffle(bids)
    random.Random(8).shuffle(asks)
    vb.books["BTCUSDT"] = {"lastUpdateId": 1, "bids": bids, "asks": asks}
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5))
    try:
        got = src.fetch(["BTC/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 10)
    finally:
        src.close()
    (q,) = got.quotes
    assert q.bids == want_b and q.asks == want_a


def test_an_empty_or_one_sided_book_is_quarantined_and_the_good_pairs_kept(venues, tmp_path):
    vb, vh = venues
    lv = [["100.0", "1.0"]]
    vb.books.update({"ETHUSDT": {"lastUpdateId": 1, "bids": [], "asks": []},
                     "C000USDT": {"lastUpdateId": 1, "bids": lv, "asks": []},
                     "C001USDT": {"lastUpdateId": 1, "bids": [], "asks": lv}})
    chain = build_chain(sources_toml(tmp_path, vb, vh, deadline=10.0))
    try:
        out = _by_symbol(_poll(chain, vb.symbols[:5]))
    finally:
        chain.close()
    assert {s: out[s]["error_class"] for s in vb.symbols[:5]} == {
        "BTC/USDT": None, "ETH/USDT": "invalid_book", "C000/USDT": "invalid_book", "C001/USDT": "invalid_book",
        "C002/USDT": None}
    assert "empty_book" in out["ETH/USDT"]["detail"] and "one_sided_book" in out["C000/USDT"]["detail"]


def test_a_venue_answering_a_gzip_bomb_is_bounded_after_decompression(venues):
    """256 MiB of JSON whitespace in ~250 kB of gzip: aiohttp inflates it in steps and we stop counting at the
    cap, so the answer is refused as malformed, never held whole."""
    import zlib

    vb, _ = venues
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    block = b" " * 2**20
    vb.gzip_bodies["ETHUSDT"] = b"".join([*(z.compress(block) for _ in range(256)), z.flush()])
    src = CcxtSource("binance", exchange="binance", limits=Limits(rate_per_s=20, burst=5, timeout_s=5.0))
    try:
        got = src.fetch(["BTC/USDT", "ETH/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 20)
    finally:
        src.close()
    err = got.errors["ETH/USDT"]
    assert (err.error_class, "bytes" in err.detail) == ("malformed", True), err
    assert [q.symbol for q in got.quotes] == ["BTC/USDT"]


def test_a_slow_venue_does_not_hold_the_cycle_past_its_deadline(venues):
    """hitbtc answers after 3 s, its per-call timeout is 5 s, the cycle's deadline 1 s away: the fetch gives up
    at the deadline (``deadline``, not the answer and not ccxt's timeout) and the source still closes cleanly."""
    _, vh = venues
    src = CcxtSource("hitbtc", exchange="hitbtc", limits=Limits(rate_per_s=HITBTC_RPS, burst=2, timeout_s=5.0))
    try:
        src.fetch(["C100/USDT"], dt.datetime.now(dt.UTC), time.monotonic() + 10)  # the market list, loaded
        vh.slow_s = 3.0
        with pytest.raises(SourceError) as e:  # the one bulk call failed: raised for the chain to split
            src.fetch(vh.symbols[:5], dt.datetime.now(dt.UTC), time.monotonic() + 1.0)
    finally:
        src.close()
    assert e.value.error_class == "deadline"
