"""Two ccxt venues over real HTTP (pytest-httpserver): binance (one depth call per pair) and hitbtc (one
order-book call for many pairs), each answering its market list and order books in the venue's real JSON shape,
counting every request, and answering 429 or 5xx for the pairs a test names.

Shapes: binance ``GET /api/v3/exchangeInfo`` and ``GET /api/v3/depth`` (developers.binance.com, spot REST "Market
data"); hitbtc ``GET /api/3/public/symbol``, ``/public/currency`` and ``/public/orderbook`` (api.hitbtc.com,
"Market data"), as ccxt's own parsers read them (ccxt/binance.py fetch_markets/parse_market, hitbtc.py).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

BINANCE_RPS = 20.0  # 6,000 request weight a minute, a depth call of limit <= 100 weighs 5 (see docs/ccxt.md)
HITBTC_RPS = 30.0  # market data: 30 requests a second an IP


def pairs(n: int, quote: str, offset: int = 0) -> list[str]:
    """``n`` made-up spot pairs (``C007/USDT``): the venues list them like any other."""
    return [f"C{i:03d}/{quote}" for i in range(offset, offset + n)]


def price_of(symbol: str) -> float:
    base = symbol.split("/")[0]
    return 100.0 + (int(base[1:]) if base[1:].isdigit() else 7)


def _levels(mid: float, side: int) -> list[list[str]]:
    # 12 levels a side (more than the 10 we ask for: the venue may send more), best first, 1 bp apart.
    return [[f"{mid * (1 + side * 0.0001 * (i + 1)):.6f}", f"{0.5 + i:.4f}"] for i in range(12)]


@dataclass
class Venue:
    """One venue's stand-in: ``faults`` maps a venue id (``BTCUSDT``) to the HTTP status its book answers with."""

    name: str
    symbols: list[str]
    server: HTTPServer
    faults: dict[str, int] = field(default_factory=dict)
    market_fault: int | None = None  # the status the market list answers with while set
    retry_after: str | None = None  # the Retry-After a 429 carries while set (binance sends one with 418/429)
    huge: set[str] = field(default_factory=set)  # venue ids whose book is a 2M-level body, streamed
    books: dict[str, dict] = field(default_factory=dict)  # venue id -> the depth answer sent as it is
    huge_sent: int = 0  # bytes of those bodies the stand-in got to write before the client stopped reading
    slow_s: float = 0.0  # how long each order-book answer takes
    gzip_bodies: dict[str, bytes] = field(default_factory=dict)  # venue id -> a gzip body sent with its encoding
    book_hits: list[float] = field(default_factory=list)  # time.time() of each order-book request
    requests: list[str] = field(default_factory=list)  # every path asked for, with its query
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.server.url_for("/").rstrip("/")

    def log(self, request: Request, book: bool) -> None:
        with self.lock:
            self.requests.append(request.full_path)
            if book:
                self.book_hits.append(time.time())

    def huge_book(self, levels: int = 2_000_000) -> Iterator[bytes]:
        """A hostile depth answer: ``levels`` levels a side (~40 MB), written as the client reads it."""
        lv = b'["100.00000000","1.00000000"]'
        chunk = b",".join([lv] * 2000) + b","
        parts = [b'{"lastUpdateId":1,"bids":[', *([chunk] * (levels // 2000)), lv + b'],"asks":[',
                 *([chunk] * (levels // 2000)), lv + b"]}"]
        for part in parts:
            self.huge_sent += len(part)
            yield part

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most order-book requests in any ``seconds``-long window."""
        hits = sorted(self.book_hits)
        best, lo = 0, 0
        for hi, t in enumerate(hits):
            while t - hits[lo] >= seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


def vid(symbol: str) -> str:
    return symbol.replace("/", "")


def _error(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


# ---- binance -------------------------------------------------------------------------------------------
def binance_market(symbol: str) -> dict:
    base, quote = symbol.split("/")
    return {
        "symbol": vid(symbol), "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8, "quoteAsset": quote,
        "quotePrecision": 8, "quoteAssetPrecision": 8, "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True, "ocoAllowed": True, "otoAllowed": True, "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True, "cancelReplaceAllowed": True, "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000",
             "tickSize": "0.01000000"},
            {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5}],
        "permissions": [], "permissionSets": [["SPOT"]], "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"]}


def binance(server: HTTPServer, symbols: list[str]) -> Venue:
    v = Venue("binance", symbols, server)

    def exchange_info(request: Request) -> Response:
        v.log(request, False)
        if v.market_fault is not None:
            return _error(v.market_fault, {"code": -1001, "msg": "Internal error; unable to process your "
                                                                          "request. Please try again."})
        return Response(json.dumps({
            "timezone": "UTC", "serverTime": int(time.time() * 1000),
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
                           {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                           {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000}],
            "exchangeFilters": [], "symbols": [binance_market(s) for s in v.symbols]}),
            content_type="application/json")

    def depth(request: Request) -> Response:
        v.log(request, True)
        sid = request.args.get("symbol", "")
        status = v.faults.get(sid)
        if status == 429:
            r = _error(429, {"code": -1003, "msg": "Too many requests; current limit of IP is 6000 requests per "
                                                  "minute."})
            if v.retry_after is not None:
                r.headers["Retry-After"] = v.retry_after
            return r
        if sid in v.gzip_bodies:
            return Response(v.gzip_bodies[sid], content_type="application/json", headers={"Content-Encoding": "gzip"})
        if sid in v.books:
            return Response(json.dumps(v.books[sid]), content_type="application/json")
        if sid in v.huge:
            return Response(v.huge_book(), content_type="application/json")
        if status is not None:
            return Response("<html><body><h1>502 Bad Gateway</h1></body></html>", status=status,
                            content_type="text/html")
        sym = next((s for s in v.symbols if vid(s) == sid), None)
        if sym is None:
            return _error(400, {"code": -1121, "msg": "Invalid symbol."})
        limit = int(request.args.get("limit", "100"))
        mid = price_of(sym)
        return Response(json.dumps({"lastUpdateId": int(time.time() * 1000), "bids": _levels(mid, -1)[:limit],
                                    "asks": _levels(mid, 1)[:limit]}), content_type="application/json")

    server.expect_request("/api/v3/exchangeInfo").respond_with_handler(exchange_info)
    server.expect_request("/api/v3/depth").respond_with_handler(depth)
    return v


# ---- hitbtc --------------------------------------------------------------------------------------------
def hitbtc_market(symbol: str) -> dict:
    base, quote = symbol.split("/")
    return {"type": "spot", "base_currency": base, "quote_currency": quote, "status": "working",
            "quantity_increment": "0.0001", "tick_size": "0.000001", "take_rate": "0.0025", "make_rate": "0.001",
            "fee_currency": quote, "margin_trading": False, "max_initial_leverage": "1.00"}


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hitbtc(server: HTTPServer, symbols: list[str]) -> Venue:
    v = Venue("hitbtc", symbols, server)

    def symbol_list(request: Request) -> Response:
        v.log(request, False)
        return Response(json.dumps({vid(s): hitbtc_market(s) for s in v.symbols}), content_type="application/json")

    def currencies(request: Request) -> Response:
        v.log(request, False)
        coins = sorted({p for s in v.symbols for p in s.split("/")})
        return Response(json.dumps({c: {"full_name": c, "crypto": True, "payin_enabled": True, "payout_enabled": True,
                                        "transfer_enabled": True, "precision_transfer": "0.00000001",
                                        "delisted": False, "networks": []} for c in coins}),
                        content_type="application/json")

    def books(request: Request) -> Response:
        v.log(request, True)
        time.sleep(v.slow_s)
        asked = [s for s in request.args.get("symbols", "").split(",") if s]
        depth_n = int(request.args.get("depth", "100"))
        for sid in asked:
            status = v.faults.get(sid)
            if status == 429:
                return _error(429, {"error": {"code": 429, "message": "Too many requests",
                                              "description": "Too many requests"}})
            if status is not None:
                return _error(status, {"error": {"code": 500, "message": "Internal Server Error",
                                                 "description": ""}})
        out = {}
        stamp = _iso_now()
        for sid in asked:
            sym = next((s for s in v.symbols if vid(s) == sid), None)
            if sym is None:
                continue
            mid = price_of(sym)
            out[sid] = {"timestamp": stamp, "ask": _levels(mid, 1)[:depth_n], "bid": _levels(mid, -1)[:depth_n]}
        return Response(json.dumps(out), content_type="application/json")

    server.expect_request("/api/3/public/symbol").respond_with_handler(symbol_list)
    server.expect_request("/api/3/public/currency").respond_with_handler(currencies)
    server.expect_request("/api/3/public/orderbook").respond_with_handler(books)
    return v


def start_server() -> HTTPServer:
    s = HTTPServer(threaded=True)
    s.start()
    return s


VENUES: dict[str, Callable[[HTTPServer, list[str]], Venue]] = {"binance": binance, "hitbtc": hitbtc}
