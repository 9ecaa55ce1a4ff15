"""Alpaca through ``alpaca-py``.

- US stocks: ``StockHistoricalDataClient.get_stock_latest_quote`` (feed ``iex`` or ``sip``), one call per
  group: NBBO (sip) or IEX's own top of book (iex), so one level. Needs ``APCA_API_KEY_ID`` and
  ``APCA_API_SECRET_KEY``.
- Crypto: ``CryptoHistoricalDataClient.get_crypto_latest_orderbook``, one call per group: a real L2 book,
  no keys needed.

The SDK sets no request timeout and sleeps a fixed 3 s on a 429 before retrying. We mount a requests
transport adapter (requests' documented extension point) on the client's session that gives every request
our socket timeout and turns a 429 into :class:`RateLimited` with its ``Retry-After`` before the SDK can
sleep on it: the guard then backs the source off for as long as Alpaca asked.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from microstructure.contract.book import BookQuote
from microstructure.sources.guard import (
    CONNECTION,
    MALFORMED,
    SERVER_ERROR,
    TIMEOUT,
    Guard,
    Limits,
    RateLimited,
    SourceError,
    parse_retry_after,
)
from microstructure.sources.vendor import (
    ALPACA_BASE_ENV,
    ConfigError,
    Fetched,
    base_url_from_env,
    env_key,
    http_error_class,
)

if TYPE_CHECKING:
    from alpaca.data.historical import CryptoHistoricalDataClient, StockHistoricalDataClient
    from requests import PreparedRequest, Response
    from requests.adapters import HTTPAdapter

UNKNOWN = "unknown_symbol"


def _adapter(timeout_s: float) -> HTTPAdapter:
    from requests.adapters import HTTPAdapter

    class _VendorAdapter(HTTPAdapter):
        # HTTPAdapter.send's own parameters and defaults (requests.Session.send passes them by keyword).
        def send(self, request: PreparedRequest, stream: bool = False,
                 timeout: float | tuple[float | None, float | None] | None = None, verify: bool | str = True,
                 cert: str | tuple[str, str] | None = None, proxies: dict[str, str] | None = None) -> Response:
            if timeout is None:
                timeout = (timeout_s, timeout_s)
            resp = super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
            if resp.status_code == 429:
                resp.close()
                raise RateLimited(parse_retry_after(resp.headers.get("Retry-After")), "HTTP 429")
            return resp

    return _VendorAdapter()


def classify(e: BaseException) -> SourceError:
    import requests
    from alpaca.common.exceptions import APIError
    from pydantic import ValidationError

    if isinstance(e, SourceError):
        return e
    if isinstance(e, APIError):
        status = e.status_code or 0
        return SourceError(http_error_class(status), f"HTTP {status}")
    if isinstance(e, requests.Timeout):
        return SourceError(TIMEOUT, "request timed out")
    if isinstance(e, requests.ConnectionError):
        return SourceError(CONNECTION, type(e).__name__)
    if isinstance(e, ValueError | ValidationError | KeyError | TypeError):
        # requests' JSONDecodeError is a ValueError; so is the SDK's "response matches no known key".
        return SourceError(MALFORMED, f"{type(e).__name__}: {str(e)[:200]}")
    return SourceError(SERVER_ERROR, f"{type(e).__name__}: {str(e)[:200]}")


class AlpacaSource:
    def __init__(self, name: str = "alpaca", asset: str = "stocks", limits: Limits | None = None,
                 feed: str = "iex", lot_size: float = 1.0) -> None:
        if asset not in ("stocks", "crypto"):
            raise ConfigError(f"{name}: asset must be stocks or crypto, not {asset!r}")
        if feed not in ("iex", "sip", "delayed_sip"):
            raise ConfigError(f"{name}: feed must be iex, sip or delayed_sip, not {feed!r}")
        self.name, self.asset, self.feed, self.lot_size = name, asset, feed, lot_size
        self.max_levels = 1 if asset == "stocks" else 10
        self.limits = limits or Limits()
        # Where the keys go: Alpaca, or a stand-in the environment names (https, or http on loopback).
        base = base_url_from_env(ALPACA_BASE_ENV)
        self.client: StockHistoricalDataClient | CryptoHistoricalDataClient
        if asset == "stocks":
            from alpaca.data.historical import StockHistoricalDataClient

            why = f"source {name!r} (Alpaca stocks) needs Alpaca keys in the environment"
            self.client = StockHistoricalDataClient(env_key("APCA_API_KEY_ID", True, why),
                                                    env_key("APCA_API_SECRET_KEY", True, why), url_override=base)
        else:
            from alpaca.data.historical import CryptoHistoricalDataClient

            # Crypto market data needs no keys; send them if they are set (higher rate limits).
            self.client = CryptoHistoricalDataClient(env_key("APCA_API_KEY_ID", False, ""),
                                                     env_key("APCA_API_SECRET_KEY", False, ""), url_override=base)
        # alpaca-py's RESTClient keeps its requests session in ``_session`` and offers no timeout option;
        # mounting an adapter is requests' own API for per-transport behaviour.
        adapter = _adapter(self.limits.timeout_s)
        for prefix in ("http://", "https://"):
            self.client._session.mount(prefix, adapter)
        # A redirect is an error, never followed: requests drops only ``Authorization`` on a cross-host
        # redirect, and Alpaca's keys ride in APCA-API-* headers, which it would send on to any host.
        self.client._session.max_redirects = 0
        self.guard = Guard(name, self.limits, classify)

    def __repr__(self) -> str:
        return f"AlpacaSource(name={self.name!r}, asset={self.asset!r}, feed={self.feed!r})"

    def fetch(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None = None) -> Fetched:
        from alpaca.data.historical import StockHistoricalDataClient

        out = Fetched()
        if isinstance(self.client, StockHistoricalDataClient):  # asset "stocks" (__init__ made the client)
            from alpaca.data.enums import DataFeed
            from alpaca.data.requests import StockLatestQuoteRequest

            req = StockLatestQuoteRequest(symbol_or_symbols=list(symbols), feed=DataFeed(self.feed))
            got = self.guard.call(self.client.get_stock_latest_quote, req, deadline=deadline)
            received = dt.datetime.now(dt.UTC)  # when the answer was in our hands
            for s in symbols:
                q = got.get(s)
                if q is None:
                    out.errors[s] = SourceError(UNKNOWN, f"{self.name} has no quote for {s}")
                    continue
                # Alpaca sends 0/0 for a side with no quote: that side is absent, not a zero-priced level.
                bids = [(q.bid_price, q.bid_size * self.lot_size)] if q.bid_price else []
                asks = [(q.ask_price, q.ask_size * self.lot_size)] if q.ask_price else []
                out.quotes.append(BookQuote(s, q.timestamp, received, self.name, bids, asks))
        else:
            from alpaca.data.requests import CryptoLatestOrderbookRequest

            book_req = CryptoLatestOrderbookRequest(symbol_or_symbols=list(symbols))
            books = self.guard.call(self.client.get_crypto_latest_orderbook, book_req, deadline=deadline)
            received = dt.datetime.now(dt.UTC)
            for s in symbols:
                b = books.get(s)
                if b is None:
                    out.errors[s] = SourceError(UNKNOWN, f"{self.name} has no order book for {s}")
                    continue
                # The full book can run to hundreds of levels; keep the best ten a side, best first.
                bids = sorted(((q.price, q.size) for q in b.bids), key=lambda x: -x[0])[:10]
                asks = sorted(((q.price, q.size) for q in b.asks), key=lambda x: x[0])[:10]
                out.quotes.append(BookQuote(s, b.timestamp, received, self.name, bids, asks))
        return out
