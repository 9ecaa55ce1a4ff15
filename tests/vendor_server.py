"""Payloads in the vendors' documented JSON shapes, served over real HTTP by pytest-httpserver; a vendor that
stops answering; and the sources file that points a fallback chain at the stand-in."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

from werkzeug import Request, Response

SECRET_POLY = "pk_SECRET_poly_9f8e7d"
SECRET_ID = "AK_SECRET_id_1a2b3c"
SECRET_KEY = "sk_SECRET_alpaca_4d5e6f"
NS = 1_764_000_000_000_000_000  # 2025-11-24T16:00:00Z in ns
POLY_STOCKS = "/v2/snapshot/locale/us/markets/stocks/tickers"
ALPACA_STOCKS = "/v2/stocks/quotes/latest"
ALPACA_CRYPTO = "/v1beta3/crypto/us/latest/orderbooks"


def poly_crypto_path(ticker: str) -> str:
    return f"/v2/snapshot/locale/global/markets/crypto/tickers/{ticker}/book"


def poly_quote(ticker: str, bid: float, ask: float, bs: int = 3, as_: int = 2, t: int = NS) -> dict[str, Any]:
    return {"ticker": ticker, "updated": t,
            "lastQuote": {"p": bid, "s": bs, "P": ask, "S": as_, "t": t},
            "day": {"o": bid, "h": ask, "l": bid, "c": bid, "v": 1000, "vw": bid}}


def poly_snapshot(*tickers: dict[str, Any]) -> dict[str, Any]:
    return {"status": "OK", "count": len(tickers), "tickers": list(tickers)}


def poly_crypto_book(ticker: str, bids: list[tuple[float, float]], asks: list[tuple[float, float]]) -> dict:
    return {"status": "OK", "data": {
        "ticker": ticker, "bidCount": sum(s for _, s in bids), "askCount": sum(s for _, s in asks),
        "spread": (asks[0][0] - bids[0][0]) if bids and asks else None, "updated": NS,
        "bids": [{"p": p, "x": {"1": s / 2, "2": s / 2}} for p, s in bids],
        "asks": [{"p": p, "x": {"1": s}} for p, s in asks]}}


def alpaca_quotes(quotes: dict[str, tuple[float, float, float, float]]) -> dict[str, Any]:
    return {"quotes": {s: {"t": "2025-11-24T16:00:00.123456789Z", "ax": "V", "ap": ap, "as": as_, "bx": "V",
                           "bp": bp, "bs": bs, "c": ["R"], "z": "C"} for s, (bp, bs, ap, as_) in quotes.items()}}


def alpaca_books(books: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]]) -> dict[str, Any]:
    return {"orderbooks": {s: {"t": "2025-11-24T16:00:00.5Z", "b": [{"p": p, "s": z} for p, z in b],
                               "a": [{"p": p, "s": z} for p, z in a]} for s, (b, a) in books.items()}}


class Hang:
    """A vendor that stops answering: each request waits until the test calls :meth:`release`, which it does
    once the code under test has given up on the call. Code that waited for the answer would never get past
    the call (until ``safety_s``, and then with an answer the test's checks refuse), so a test proves "did not
    wait" by what was served, never by timing the call."""

    def __init__(self, safety_s: float = 120.0) -> None:
        self.safety_s = safety_s
        self.entered = 0  # requests that reached the hanging vendor
        self._released = threading.Event()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            self.entered += 1
        self._released.wait(self.safety_s)

    def release(self) -> None:
        self._released.set()


def respond(body: Any = None, status: int = 200, headers: dict[str, str] | None = None, raw: str | None = None,
            hang: Hang | None = None):
    """A werkzeug handler: optionally hang first (see :class:`Hang`), then the body."""

    def handler(request: Request) -> Response:
        if hang is not None:
            hang.wait()
        text = raw if raw is not None else json.dumps(body)
        return Response(text, status=status, headers=headers or {}, content_type="application/json")

    return handler


# ---- a fallback chain pointed at the stand-in ------------------------------------------------------
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
