"""Public crypto order books from any ccxt venue (``kind = "ccxt"``, ``exchange = "binance"`` in the sources file).

One source per venue, on ccxt's asyncio client (``ccxt.async_support``) running on a loop thread of its own: a
cycle's calls to one venue are issued together and ccxt's own rate limiter (``enableRateLimit``, the venue's
``rateLimit`` times each endpoint's cost) spaces them across the cycle; our token bucket (``Limits``) is a second
cap on top. A venue with a bulk endpoint (``has['fetchOrderBooks']``: hitbtc, upbit, exmo, hollaex) gets one call
per group of symbols; the others one ``fetch_order_book(symbol, limit=10)`` per symbol. See docs/ccxt.md for which
venues fit 150 pairs in a 2 s cycle, and the arithmetic.

Symbols are the project's crypto spelling, ``BASE/QUOTE`` (``BTC/USDT``), which is ccxt's unified spot symbol;
the venue's own ids (``BTCUSDT``) and currency aliases are ccxt's markets' business. ``BTC/USD`` is not
``BTC/USDT``: a venue that lists only the latter answers ``unknown_symbol`` for the former, never a stand-in.

Times: ``received_ts`` is our clock when the answer arrived; ``event_ts`` the book's ``timestamp`` where the
venue sends one (hitbtc, upbit, ...), else the received time (binance spot's REST depth carries no time).

Public endpoints need no keys, so none is ever sent; the stand-in for tests comes from the environment only
(``MICROSTRUCTURE_CCXT_URL_<EXCHANGE>``, https anywhere, http to loopback only), never from a sources file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from microstructure.contract.book import BookQuote
from microstructure.sources.guard import (
    AUTH,
    CLIENT_ERROR,
    CONNECTION,
    DEADLINE,
    MALFORMED,
    RATE_LIMITED,
    SERVER_ERROR,
    SPLITTABLE,
    THROTTLED,
    TIMEOUT,
    UNAVAILABLE,
    UNKNOWN_SYMBOL,
    Guard,
    Limits,
    RateLimited,
    SourceError,
)
from microstructure.sources.vendor import ConfigError, Fetched, base_url_from_env, http_error_class

if TYPE_CHECKING:
    from ccxt.async_support.base.exchange import Exchange

URL_ENV_PREFIX = "MICROSTRUCTURE_CCXT_URL_"
LEVELS = 10  # the book depth asked for and kept, a side
# A bulk call names its symbols in the query string; venues cap a URL near 2 kB (exmo says 2048 characters).
BULK_URL_CHARS = 1500
MARKETS_WAIT_S = 10.0  # a venue's market list can be several MB (binance's exchangeInfo): longer than one call
# The most of one answer we read (decompressed). A 10-level book is ~1 kB, a bulk call of 160 pairs ~200 kB; a
# market list is the venue's whole catalogue (binance spot's exchangeInfo is several MB).
BOOK_BODY_BYTES = 4 * 2**20
MARKETS_BODY_BYTES = 64 * 2**20
_BODY_CAP: contextvars.ContextVar[int] = contextvars.ContextVar("ccxt_body_cap", default=BOOK_BODY_BYTES)
# ccxt logs every request and answer body at DEBUG: its logger is ours, never below INFO, so an application's
# DEBUG logging never records a venue's bodies (see docs/security.md).
CCXT_LOG = logging.getLogger("microstructure.sources.ccxt_client")
CCXT_LOG.setLevel(logging.INFO)
# Venue options that keep load_markets to the public spot list: binance would also load its futures venues
# (fapi, dapi) and, with keys, call a private currencies endpoint.
VENUE_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False},
}
_UNIFIED = re.compile(r"[A-Z0-9][A-Z0-9.\-_]*/[A-Z0-9][A-Z0-9.\-_]*(:[A-Z0-9.\-_]+)?")
# ccxt's handle_http_status_code message: "<id> <METHOD> <url> <status> <reason> <body>".
_STATUS = re.compile(r"^\S+ (?:GET|POST|PUT|DELETE|PATCH|HEAD) \S+ (\d{3})\b")


# The order-book endpoint each venue's fetch_order_book(s) calls, as a path into ccxt's ``api`` table (which holds
# each endpoint's cost in units of the venue's ``rateLimit`` milliseconds). For docs/ccxt.md's arithmetic.
BOOK_ENDPOINT: dict[str, tuple[str, ...]] = {
    "binance": ("public", "get", "depth"),
    "hitbtc": ("public", "get", "public/orderbook"),  # bulk
    "upbit": ("public", "get", "orderbook"),  # bulk
    "okx": ("public", "get", "market/books"),
    "bybit": ("public", "get", "v5/market/orderbook"),
    "kucoin": ("public", "get", "market/orderbook/level2_20"),
    "bitget": ("public", "spot", "get", "v2/spot/market/orderbook"),
    "mexc": ("spot", "public", "get", "depth"),
    "kraken": ("public", "get", "Depth"),
}


def book_calls_per_s(exchange: str, limit: int = LEVELS) -> float:
    """Order-book calls a second ccxt's own limiter lets through to ``exchange``: 1000 / (rateLimit x cost), the
    cost of the endpoint in BOOK_ENDPOINT at ``limit`` levels (``byLimit`` where the venue weighs by depth)."""
    import ccxt

    return _book_rate(getattr(ccxt, exchange)(), exchange, limit)


def default_rate(exchange: str) -> float:
    """Our bucket's ``rate_per_s`` when the sources file sets none: the venue's own book-call rate where
    BOOK_ENDPOINT knows its endpoint, else ``Limits``' default."""
    return book_calls_per_s(exchange) if exchange in BOOK_ENDPOINT else Limits.rate_per_s


def _book_rate(client: Any, exchange: str, limit: int = LEVELS) -> float:
    node: Any = client.api
    for k in BOOK_ENDPOINT[exchange]:
        node = node[k]
    cost = node
    if isinstance(node, dict):
        cost = node.get("cost", 1)
        for upto, c in node.get("byLimit", []):
            if limit <= upto:
                cost = c
                break
    return 1000.0 / (float(client.rateLimit) * float(cost))


def url_env(exchange: str) -> str:
    return URL_ENV_PREFIX + exchange.upper()


def unified(symbol: str) -> str | None:
    """``symbol`` if it is written as a ccxt unified symbol (``BTC/USDT``, ``BTC/USDT:USDT``), else None."""
    return symbol if _UNIFIED.fullmatch(symbol) else None


def hint(symbol: str) -> str:
    """How a symbol written another way (``BTCUSDT``, ``btc-usdt``) would be spelt here."""
    s = symbol.strip().upper().replace("-", "/").replace("_", "/")
    return s if "/" in s else "BASE/QUOTE, e.g. BTC/USDT"


def point_at(api: Any, base: str) -> Any:
    """ccxt's ``urls['api']`` (a URL, or a nested dict of them) with every URL's scheme and host replaced by
    ``base``'s, each keeping its own path: the stand-in serves the venue's real paths."""
    if isinstance(api, dict):
        return {k: point_at(v, base) for k, v in api.items()}
    if isinstance(api, str):
        path = urlsplit(api).path
        return base + path
    return api


def classify(e: BaseException) -> SourceError:
    """ccxt's exception classes in our error classes. The HTTP status, where ccxt's message carries it, decides
    first: ccxt files a 400/403/404 under ExchangeNotAvailable, which is a client error here, not a 5xx."""
    import ccxt

    if isinstance(e, SourceError):
        return e
    msg = str(e)[:300]
    if isinstance(e, ccxt.BadSymbol):
        return SourceError(UNKNOWN_SYMBOL, msg)
    if isinstance(e, ccxt.DDoSProtection):  # RateLimitExceeded is a DDoSProtection: 429 and 418
        return RateLimited(None, msg)
    if isinstance(e, ccxt.AuthenticationError | ccxt.PermissionDenied | ccxt.AccountSuspended):
        return SourceError(AUTH, msg)
    if isinstance(e, ccxt.RequestTimeout):
        return SourceError(TIMEOUT, msg)
    m = _STATUS.match(str(e))
    if m is not None:
        cls = http_error_class(int(m.group(1)))
        return RateLimited(None, msg) if cls == RATE_LIMITED else SourceError(cls, msg)
    if isinstance(e, ccxt.ExchangeNotAvailable):
        import aiohttp

        # ccxt raises ExchangeNotAvailable from aiohttp's connection errors and DNS failures as well as for 5xx.
        if isinstance(e.__cause__, aiohttp.ClientConnectionError | OSError):
            return SourceError(CONNECTION, msg)
        return SourceError(SERVER_ERROR, msg)
    if isinstance(e, ccxt.NetworkError):
        return SourceError(CONNECTION, msg)
    if isinstance(e, ccxt.BadResponse | ccxt.NullResponse):
        return SourceError(MALFORMED, msg)
    if isinstance(e, ccxt.BadRequest | ccxt.ExchangeError):
        return SourceError(CLIENT_ERROR, msg)
    if isinstance(e, ValueError | KeyError | TypeError | IndexError):
        return SourceError(MALFORMED, f"{type(e).__name__}: {msg}")
    return SourceError(SERVER_ERROR, f"{type(e).__name__}: {msg}")


class _BoundedResponse(aiohttp.ClientResponse):
    """aiohttp's response, read no further than ``_BODY_CAP`` bytes (after decompression). ccxt reads every answer
    whole with ``response.text()``; aiohttp has no body limit on the client side (``read_bufsize`` is a buffer
    size, ``max_line_size``/``max_field_size`` bound the headers only), so this class, handed to the session we
    give ccxt (``ClientSession(response_class=...)``, ccxt's ``session`` setting), stops reading a huge body,
    closes its connection, and raises ``malformed``. Public aiohttp API only: ``content_length``, ``content``,
    ``charset``, ``close``."""

    async def text(self, encoding: str | None = None, errors: str = "strict") -> str:
        cap = _BODY_CAP.get()
        if self.content_length is not None and self.content_length > cap:
            self.close()
            raise SourceError(MALFORMED, f"an answer of {self.content_length} bytes, over the {cap} bytes read")
        buf = bytearray()
        while chunk := await self.content.read(2**16):
            buf += chunk
            if len(buf) > cap:
                self.close()
                raise SourceError(MALFORMED, f"an answer over the {cap} bytes read")
        return bytes(buf).decode(encoding or self.charset or "utf-8", errors)


def _answering(cls: type[Exchange], guard: Guard) -> type[Exchange]:
    """The venue's ccxt class with its ``on_rest_response`` hook (ccxt's per-response extension point, called with
    the status and headers before any parsing) turning a 429/418 into :class:`RateLimited` with the answer's own
    ``Retry-After`` and a 5xx into ``server_error``. Venues' ``handle_errors`` read such bodies in their own ways
    (hitbtc files a 500 as ExchangeError and a 429 as NetworkError), so the HTTP status decides first.

    A ``Retry-After`` backs ``guard`` off at once, on the loop thread, and ``throttle`` (the coroutine ccxt awaits
    before each request, its limiter) refuses every call it releases meanwhile: the calls of the same cycle queued
    behind the 429 are never sent."""
    from microstructure.sources.guard import parse_retry_after

    def on_rest_response(self: Exchange, code: int, reason: str, url: str, method: str, headers: Any, body: Any,
                         *rest: Any) -> Any:
        if code in (418, 429):
            after = next((str(v) for k, v in dict(headers or {}).items() if str(k).lower() == "retry-after"), None)
            wait = parse_retry_after(after)
            if wait:
                guard.backoff_until = max(guard.backoff_until,
                                          time.monotonic() + min(wait, guard.limits.max_retry_after_s))
            raise RateLimited(wait, f"{self.id} HTTP {code}")
        if code >= 500:
            raise SourceError(SERVER_ERROR, f"{self.id} HTTP {code} {str(reason)[:50]}")
        return super(sub, self).on_rest_response(code, reason, url, method, headers, body, *rest)

    async def throttle(self: Exchange, cost: Any = None) -> Any:
        await super(sub, self).throttle(cost)
        _refuse_in_backoff(guard, self.id)

    sub: type[Exchange] = type(cls.__name__, (cls,), {"on_rest_response": on_rest_response, "throttle": throttle})
    return sub


def _refuse_in_backoff(guard: Guard, name: str) -> None:
    left = guard.backoff_until - time.monotonic()
    if left > 0:
        raise SourceError(RATE_LIMITED, f"{name} asked us to wait (Retry-After): {left:.1f} s left")


class CcxtSource:
    def __init__(self, name: str = "ccxt", asset: str = "crypto", limits: Limits | None = None,
                 exchange: str = "", lot_size: float = 1.0) -> None:
        import ccxt
        import ccxt.async_support as ccxt_async

        if asset != "crypto":
            raise ConfigError(f"{name}: a ccxt source is crypto only, not {asset!r}")
        if exchange not in ccxt.exchanges:
            raise ConfigError(f"{name}: exchange must be a ccxt exchange id (binance, hitbtc, ...), "
                              f"not {str(exchange)[:40]!r}")
        self.name, self.asset, self.exchange, self.lot_size = name, asset, exchange, lot_size
        self.max_levels = LEVELS
        # Unset (no rate_per_s in the sources file): the venue's own book-call rate, not a guess.
        self.limits = limits or Limits(rate_per_s=default_rate(exchange))
        base = base_url_from_env(url_env(exchange))
        self.guard = Guard(name, self.limits, classify)
        self._loop = asyncio.new_event_loop()
        # A daemon thread: a call stuck in a venue's socket never keeps the process alive (see guard.run_with_timeout).
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"ccxt-{name}", daemon=True)
        self._thread.start()
        # Our own HTTP session (ccxt's ``session`` setting), made on the loop thread: it bounds each answer's size
        # (_BoundedResponse), resolves names on the loop's executor (aiohttp's aiodns resolver would start a
        # process-wide pycares thread that never ends), and never reads proxies from the environment.
        self._session: aiohttp.ClientSession = self._submit(self._open_session()).result(timeout=10.0)
        # No keys: public books only. ccxt's limiter on (the venue's rateLimit and per-endpoint costs);
        # its timeout is our per-call socket timeout.
        self.client: Exchange = _answering(getattr(ccxt_async, exchange), self.guard)({
            "enableRateLimit": True, "timeout": int(self.limits.timeout_s * 1000), "asyncio_loop": self._loop,
            "options": dict(VENUE_OPTIONS.get(exchange, {})), "session": self._session, "logger": CCXT_LOG})
        if base is not None:
            self.client.urls["api"] = point_at(self.client.urls["api"], base)
        self.bulk = self.client.has.get("fetchOrderBooks") is True
        self._lock = threading.Lock()
        # The market list starts loading now, in the background, so the first cycle need not spend its budget on
        # it (the binance one is several MB); the first fetch waits for it until that cycle's deadline at most.
        self._markets: Future[Any] | None = self._submit(self._load_markets())

    def __repr__(self) -> str:
        return f"CcxtSource(name={self.name!r}, exchange={self.exchange!r}, bulk={self.bulk})"

    # ---- the loop thread --------------------------------------------------------------------------------
    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @staticmethod
    async def _open_session() -> aiohttp.ClientSession:
        import ssl

        import certifi

        # ccxt's own TLS default (its CA bundle is certifi's).
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=certifi.where()),
                                         resolver=aiohttp.ThreadedResolver())
        return aiohttp.ClientSession(connector=connector, trust_env=False, response_class=_BoundedResponse)

    def _markets_ready(self, deadline: float | None) -> None:
        """The venue's market list, loaded once (then cached by ccxt). Waited for until ``deadline`` at most: a
        load still running carries on into the next cycle; a failed one is tried again next cycle."""
        with self._lock:
            if self._markets is None or (self._markets.done() and self._markets.exception() is not None):
                if time.monotonic() < self.guard.backoff_until:
                    raise SourceError(RATE_LIMITED, f"{self.name} asked us to wait (Retry-After)")
                self._markets = self._submit(self._load_markets())
            fut = self._markets
        wait = MARKETS_WAIT_S if deadline is None else min(MARKETS_WAIT_S, deadline - time.monotonic())
        try:
            fut.result(timeout=max(0.0, wait))
        except FutureTimeout:
            raise SourceError(TIMEOUT, f"{self.name}: market list still loading") from None
        except Exception as e:
            err = self._classified(e)
            raise SourceError(err.error_class, f"{self.name}: market list: {err.detail}") from e

    async def _load_markets(self) -> Any:
        # ccxt reads its ``timeout`` at each request. The market list gets a longer one than a book call (binance's
        # is several MB); no book call runs meanwhile, as every fetch waits for the markets first.
        self.client.timeout = int(MARKETS_WAIT_S * 1000)
        _BODY_CAP.set(MARKETS_BODY_BYTES)  # this task's (and the ones ccxt starts from it) cap only
        try:
            return await self.client.load_markets()
        finally:
            self.client.timeout = int(self.limits.timeout_s * 1000)

    def _classified(self, e: BaseException) -> SourceError:
        err = classify(e)
        if isinstance(err, RateLimited) and err.retry_after_s:
            # The venue's Retry-After backs the whole source off: the next cycles call it not at all until then.
            self.guard.backoff_until = max(self.guard.backoff_until,
                                           time.monotonic() + min(err.retry_after_s, self.limits.max_retry_after_s))
        return err

    async def _paced(self, deadline: float | None) -> None:
        """Wait for a token of our own bucket (the venue's limiter then spaces the call again); THROTTLED when
        none comes before the deadline."""
        _refuse_in_backoff(self.guard, self.name)
        while not self.guard.bucket.take():
            if deadline is not None and time.monotonic() + 0.05 >= deadline:
                raise SourceError(THROTTLED, f"{self.name} rate limit {self.limits.rate_per_s:g}/s: no token "
                                             "before the cycle deadline")
            await asyncio.sleep(min(0.05, 1.0 / max(self.limits.rate_per_s, 1e-3)))

    async def _one(self, market: str, deadline: float | None) -> tuple[Any, float]:
        await self._paced(deadline)
        book = await self.client.fetch_order_book(market, LEVELS)
        return book, time.monotonic()

    async def _many(self, markets: list[str], deadline: float | None) -> tuple[Any, float]:
        await self._paced(deadline)
        books = await self.client.fetch_order_books(markets, LEVELS)
        return books, time.monotonic()

    # ---- a cycle ----------------------------------------------------------------------------------------
    def fetch(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None = None) -> Fetched:
        now = time.monotonic()
        if now < self.guard.backoff_until:
            raise SourceError(RATE_LIMITED, f"{self.name} asked us to wait (Retry-After): "
                                            f"{self.guard.backoff_until - now:.1f} s left")
        out = Fetched(calls_ok=0)
        try:
            self._markets_ready(deadline)
        except SourceError as e:
            # Says nothing about any one symbol: every symbol gets it, and the batch is not split over it.
            out.errors = dict.fromkeys(symbols, e)
            return out
        markets = self.client.markets or {}
        wanted: dict[str, str] = {}  # ccxt unified symbol -> ours
        for s in symbols:
            u = unified(s)
            if u is None:
                out.errors[s] = SourceError(UNKNOWN_SYMBOL, f"{s!r} is not written BASE/QUOTE; "
                                                            f"did you mean {hint(s)}?")
            elif u not in markets:
                out.errors[s] = SourceError(UNKNOWN_SYMBOL, f"{self.name} lists no market {u}")
            else:
                wanted[u] = s
        if not wanted:
            return out
        calls: list[tuple[list[str], Future[Any]]] = []
        if self.bulk:
            for chunk in self._chunks(list(wanted)):
                calls.append((chunk, self._submit(self._many(chunk, deadline))))
        else:
            calls = [([u], self._submit(self._one(u, deadline))) for u in wanted]
        first_err: SourceError | None = None
        n_calls = len(calls)
        todo = collections.deque(calls)
        while todo:
            chunk, fut = todo.popleft()
            # Without a deadline: a call's timeout after the limiter's spacing of every call before it.
            wait = (self.limits.timeout_s + n_calls / max(self.limits.rate_per_s, 1e-3) if deadline is None
                    else deadline - time.monotonic())
            try:
                got, t_done = fut.result(timeout=max(0.0, wait))
            except FutureTimeout:
                fut.cancel()
                err = SourceError(DEADLINE if deadline is not None else TIMEOUT,
                                  f"no answer from {self.name} before the cycle deadline")
                out.errors.update((wanted[u], err) for u in chunk)
                first_err = first_err or err
                continue
            except Exception as e:
                err = self._classified(e)
                if self.bulk and n_calls > 1 and len(chunk) > 1 and err.error_class in SPLITTABLE:
                    # One of several bulk calls failed in a way one pair can cause: halved here, as the chain
                    # only splits a fetch that fails as a whole and this one has served other calls' pairs.
                    half = len(chunk) // 2
                    todo.extend((h, self._submit(self._many(h, deadline))) for h in (chunk[:half], chunk[half:]))
                    continue
                out.errors.update((wanted[u], err) for u in chunk)
                first_err = first_err or err
                continue
            out.calls_ok += 1
            # when the answer was in our hands (the loop thread's clock reading, as wall time)
            received = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=max(0.0, time.monotonic() - t_done))
            books = got if self.bulk else {chunk[0]: got}
            for u in chunk:
                book = books.get(u) if isinstance(books, dict) else None
                if book is None:
                    out.errors[wanted[u]] = SourceError(UNAVAILABLE, f"{self.name} sent no book for {u}")
                    continue
                try:
                    out.quotes.append(self._quote(wanted[u], book, received))
                except (TypeError, ValueError, KeyError, IndexError) as e:
                    out.malformed.append((wanted[u], str(book)[:2000]))
                    out.errors[wanted[u]] = SourceError(MALFORMED, f"{type(e).__name__}: {str(e)[:200]}")
        if self.bulk and n_calls == 1 and first_err is not None:
            # The one batched call failed: raised, so the chain can split the batch to find a symbol that
            # breaks it (a 5xx, a hang) or back the whole venue off (a 429). A per-symbol call's failure is its own.
            raise first_err
        return out

    def _chunks(self, markets: list[str]) -> list[list[str]]:
        """Bulk calls whose joined venue ids stay under ``BULK_URL_CHARS``."""
        out: list[list[str]] = [[]]
        n = 0
        for u in markets:
            k = len(str(self.client.markets[u]["id"])) + 1
            if out[-1] and n + k > BULK_URL_CHARS:
                out.append([])
                n = 0
            out[-1].append(u)
            n += k
        return out

    def _quote(self, symbol: str, book: dict[str, Any], received: dt.datetime) -> BookQuote:
        ts = book.get("timestamp")
        event = dt.datetime.fromtimestamp(ts / 1000, dt.UTC) if isinstance(ts, int | float) and ts > 0 else received
        # ccxt sorts bids high to low and asks low to high; a level is [price, amount, (order count...)].
        bids = [(float(lv[0]), float(lv[1]) * self.lot_size) for lv in book["bids"][:LEVELS]]
        asks = [(float(lv[0]), float(lv[1]) * self.lot_size) for lv in book["asks"][:LEVELS]]
        return BookQuote(symbol, event, received, self.name, bids, asks)

    def close(self) -> None:
        """Cancels the calls still running, closes ccxt and our HTTP session, stops and closes the loop, ends its
        thread: nothing left for the interpreter's exit to complain about."""
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            # Best effort, bounded: the process may be on its way out.
            with contextlib.suppress(Exception):
                self._submit(self._shutdown()).result(timeout=5.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
        if not self._loop.is_running():
            self._loop.close()

    async def _shutdown(self) -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        with contextlib.suppress(Exception):
            await self.client.close()  # ccxt's own: its websocket clients, and a 250 ms grace for TLS to end
        await self._session.close()
        await asyncio.get_running_loop().shutdown_default_executor()
