"""What stands between a cycle and a vendor: the token bucket, the circuit breaker (per source and per symbol)
and the throttle, on their own clocks and in a chain against the local stand-in vendor."""

from __future__ import annotations

import time

from microstructure.sources.chain import ChainSource, Group
from microstructure.sources.chain_config import build_chain
from microstructure.sources.guard import CircuitBreaker, Limits, TokenBucket
from tests.vendor_server import (
    ALPACA_STOCKS,
    AT,
    POLY_STOCKS,
    chain_file,
    good_alpaca,
    outcome,
    poly_quote,
    poly_snapshot,
    respond,
)


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


def test_breaker_opens_skips_the_source_then_closes_after_cooldown(env, tmp_path):
    env.expect_request(POLY_STOCKS).respond_with_handler(respond({"status": "ERROR"}, status=500))
    good_alpaca(env)
    chain = build_chain(chain_file(tmp_path, failures=2, cooldown=30.0, retries=0))
    poly = chain.sources["polygon"]
    for _ in range(2):
        assert outcome(chain.poll(["AAPL"], AT), "AAPL")["detail"].startswith("polygon: server_error")
    assert poly.guard.breaker.state == "open"
    calls = sum(1 for r, _ in env.log if r.path == POLY_STOCKS)
    res = chain.poll(["AAPL"], AT)
    assert outcome(res, "AAPL")["detail"].startswith("polygon: breaker_open")
    assert sum(1 for r, _ in env.log if r.path == POLY_STOCKS) == calls  # not called while open
    assert outcome(res, "AAPL")["source"] == "alpaca"
    # Cool-down over, on the breakers' own clocks rather than by waiting 30 s: the source's breaker and the one
    # its isolation gave AAPL after AAPL's own failures. Real time plus a jump, so the instants they opened at
    # stay on the same scale. One trial call goes through, succeeds, and closes both.
    assert "AAPL" in chain.isolation["polygon"].breakers
    jump = [0.0]
    for br in (poly.guard.breaker, *chain.isolation["polygon"].breakers.values()):
        br.clock = lambda: time.monotonic() + jump[0]
    assert poly.guard.breaker.state == "open"
    jump[0] = 30.0
    assert poly.guard.breaker.state == "half_open"
    env.clear_handlers() if hasattr(env, "clear_handlers") else None
    env.handlers.clear()
    env.expect_request(POLY_STOCKS).respond_with_json(poly_snapshot(poly_quote("AAPL", 189.5, 189.52)))
    good_alpaca(env)
    res = chain.poll(["AAPL"], AT)
    assert outcome(res, "AAPL")["source"] == "polygon" and poly.guard.breaker.state == "closed"
    chain.close()


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
