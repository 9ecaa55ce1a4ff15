"""Payloads in the vendors' documented JSON shapes, served over real HTTP by pytest-httpserver."""

from __future__ import annotations

import json
import time
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


def respond(body: Any = None, status: int = 200, headers: dict[str, str] | None = None, raw: str | None = None,
            sleep_s: float = 0.0):
    """A werkzeug handler: optional delay (a hanging vendor), then the body."""

    def handler(request: Request) -> Response:
        if sleep_s:
            time.sleep(sleep_s)
        text = raw if raw is not None else json.dumps(body)
        return Response(text, status=status, headers=headers or {}, content_type="application/json")

    return handler
