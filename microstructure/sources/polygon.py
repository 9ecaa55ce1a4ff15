"""Polygon through ``polygon-api-client``.

- US stocks: ``get_snapshot_all("stocks", tickers=...)``, one call for the whole group; its ``lastQuote``
  is the NBBO, so rows have one level (``book_levels = 1``). Polygon has no stock depth endpoint.
- Crypto: ``get_snapshot_crypto_book(ticker)``, one call per symbol, the aggregated L2 book. Polygon has
  deprecated this endpoint since 2024-07-01: an error or an empty answer means "unavailable", never an
  empty book.

We call with ``raw=True`` and decode the body ourselves: the client turns undecodable JSON (and a body
missing its result key) into ``[]``, which would make a broken answer look like "no data".
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from microstructure.contract.book import BookQuote
from microstructure.sources.guard import (
    CONNECTION,
    MALFORMED,
    SERVER_ERROR,
    TIMEOUT,
    UNAVAILABLE,
    UNKNOWN_SYMBOL,
    Guard,
    Limits,
    RateLimited,
    SourceError,
    parse_retry_after,
)
from microstructure.sources.secrets import scrub
from microstructure.sources.vendor import (
    POLYGON_BASE_ENV,
    ConfigError,
    Fetched,
    base_url_from_env,
    env_key,
    http_error_class,
    ns_to_dt,
    parse_json,
)

if TYPE_CHECKING:
    from types import TracebackType

    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse
    from urllib3.util.retry import Retry

DEFAULT_BASE = "https://api.polygon.io"


def polygon_ticker(symbol: str) -> str:
    """Our crypto symbols are ``BASE/QUOTE`` (Alpaca's style); Polygon spells them ``X:BASEQUOTE``."""
    return "X:" + symbol.replace("/", "") if "/" in symbol else symbol


def _vendor_retry(total: int) -> Retry:
    """Polygon's own retry policy (same statuses and back-off), except that a 429 is not slept on inside the
    client: it is raised at once as :class:`RateLimited` with its ``Retry-After``, so the guard backs the
    whole source off instead of a worker thread sleeping through the cycle. A subclass of urllib3's
    ``Retry`` is urllib3's documented way to change retry behaviour."""
    from urllib3.util.retry import Retry

    class _Retry(Retry):
        def increment(self, method: str | None = None, url: str | None = None,
                      response: BaseHTTPResponse | None = None, error: Exception | None = None,
                      _pool: ConnectionPool | None = None, _stacktrace: TracebackType | None = None) -> Self:
            if response is not None and response.status == 429:
                raise RateLimited(parse_retry_after(response.headers.get("Retry-After")), "HTTP 429")
            return super().increment(method, url, response, error, _pool, _stacktrace)

    # redirect=0: a redirect is an error, never followed. The key rides in a header, and a redirect may
    # point anywhere (urllib3 keeps headers on a same-host redirect, whatever the scheme).
    return _Retry(total=total, redirect=0, status_forcelist=[413, 429, 499, 500, 502, 503, 504],
                  backoff_factor=0.1)


def classify(e: BaseException) -> SourceError:
    from polygon.exceptions import AuthError, BadResponse
    from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError, ReadTimeoutError

    if isinstance(e, SourceError):
        return e
    if isinstance(e, AuthError):
        return SourceError("auth", str(e))
    if isinstance(e, BadResponse):
        # The client raises BadResponse(body) for any non-200 it does not retry; the status is not kept,
        # so tell a rejected key (401/403) from other 4xx by Polygon's documented error body.
        body = str(e)
        low = body.lower()
        if "api key" in low or "not_authorized" in low or "unauthorized" in low:
            return SourceError("auth", "Polygon rejected the API key")
        return SourceError("client_error", body[:200])
    if isinstance(e, MaxRetryError):
        # The client's own retries (429/5xx) are spent; the reason says which.
        reason = str(e.reason)
        if "429" in reason:
            return SourceError("rate_limited", "429 after the client's retries")
        if isinstance(e.reason, ReadTimeoutError):
            return SourceError(TIMEOUT, "read timeout")
        if isinstance(e.reason, NewConnectionError | ProtocolError):
            return SourceError(CONNECTION, reason[:200])
        return SourceError(SERVER_ERROR, reason[:200])
    if isinstance(e, ReadTimeoutError | TimeoutError):
        return SourceError(TIMEOUT, str(e)[:200])
    if isinstance(e, OSError | ProtocolError):
        return SourceError(CONNECTION, str(e)[:200])
    return SourceError(SERVER_ERROR, f"{type(e).__name__}: {e}"[:200])


class PolygonSource:
    def __init__(self, name: str = "polygon", asset: str = "stocks", limits: Limits | None = None,
                 retries: int = 1, lot_size: float = 1.0) -> None:
        from polygon import RESTClient

        if asset not in ("stocks", "crypto"):
            raise ConfigError(f"{name}: asset must be stocks or crypto, not {asset!r}")
        self.name, self.asset = name, asset
        self.max_levels = 1 if asset == "stocks" else 10
        self.limits = limits or Limits()
        self.lot_size = lot_size
        key = env_key("POLYGON_API_KEY", True, f"source {name!r} needs a Polygon API key in the environment")
        # Where the key goes: Polygon, or a stand-in the environment names (https, or http on loopback).
        base = base_url_from_env(POLYGON_BASE_ENV) or DEFAULT_BASE
        t = self.limits.timeout_s
        self.client = RESTClient(api_key=key, base=base.rstrip("/"), connect_timeout=t, read_timeout=t,
                                 retries=retries)
        # polygon-api-client keeps its timeouts in ``self.timeout`` but never passes them to urllib3, so a
        # vendor that stops answering holds the socket forever. Its urllib3 pool manager is public
        # (``client.client``); its per-pool defaults carry our socket timeout and retry policy.
        import urllib3

        self.client.client.connection_pool_kw.update(timeout=urllib3.Timeout(connect=t, read=t),
                                                     retries=_vendor_retry(retries))
        self.client.client.clear()
        self.guard = Guard(name, self.limits, classify)

    def __repr__(self) -> str:  # the client holds the key; keep it out of any repr
        return f"PolygonSource(name={self.name!r}, asset={self.asset!r})"

    def _get(self, fn: Callable[..., Any], *args: Any) -> Any:
        resp = fn(*args, raw=True)
        if resp.status != 200:  # the client raises before this; kept in case a version stops doing so
            raise SourceError(http_error_class(resp.status), f"HTTP {resp.status}")
        return parse_json(resp.data, self.name)

    def fetch(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None = None) -> Fetched:
        return self._stocks(symbols, at, deadline) if self.asset == "stocks" else self._crypto(symbols, at, deadline)

    def _stocks(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None) -> Fetched:
        from polygon.rest.models import TickerSnapshot

        body = self.guard.call(self._get, self.client.get_snapshot_all, "stocks", list(symbols), deadline=deadline)
        received = dt.datetime.now(dt.UTC)  # when the answer was in our hands, not the cycle's slot
        out = Fetched()
        if not isinstance(body, dict) or not isinstance(body.get("tickers", []), list):
            raise SourceError(MALFORMED, "snapshot body has no 'tickers' list")
        seen = {}
        for d in body.get("tickers") or []:
            try:
                snap = TickerSnapshot.from_dict(d)
            except Exception:  # a row the model cannot read: keep it for quarantine
                out.malformed.append((str(d.get("ticker") if isinstance(d, dict) else None), str(d)[:2000]))
                continue
            seen[snap.ticker] = snap
        for s in symbols:
            snap = seen.get(s)
            if snap is None:
                out.errors[s] = SourceError(UNKNOWN_SYMBOL, f"{self.name} has no snapshot for {s}")
                continue
            q = snap.last_quote
            if q is None or (q.bid_price is None and q.ask_price is None):
                out.errors[s] = SourceError(UNAVAILABLE, f"{self.name} snapshot for {s} has no quote")
                continue
            bids = [] if q.bid_price is None else [(q.bid_price, _size(q.bid_size, self.lot_size))]
            asks = [] if q.ask_price is None else [(q.ask_price, _size(q.ask_size, self.lot_size))]
            out.quotes.append(BookQuote(s, ns_to_dt(q.sip_timestamp or snap.updated, received), received, self.name,
                                        bids, asks))
        return out

    def _crypto(self, symbols: Sequence[str], at: dt.datetime, deadline: float | None) -> Fetched:
        from polygon.rest.models import SnapshotTickerFullBook

        out = Fetched(calls_ok=0)
        for s in symbols:
            if deadline is not None and time.monotonic() >= deadline:
                out.errors[s] = SourceError("deadline", "the cycle deadline passed")
                continue
            try:
                body = self.guard.call(self._get, self.client.get_snapshot_crypto_book, polygon_ticker(s),
                                       deadline=deadline)
            except SourceError as e:
                out.errors[s] = e  # one call per symbol: its failure is its own
                continue
            received = dt.datetime.now(dt.UTC)
            out.calls_ok += 1
            data = body.get("data") if isinstance(body, dict) else None
            book = SnapshotTickerFullBook.from_dict(data) if isinstance(data, dict) else None
            if book is None or not (book.bids or book.asks):
                # Deprecated endpoint: an empty answer is "no data from this source", not an empty book.
                out.errors[s] = SourceError(UNAVAILABLE, f"{self.name} crypto book empty or deprecated for {s}")
                continue
            bids = [(b.price, sum((b.exchange_shares or {}).values())) for b in book.bids or []]
            asks = [(a.price, sum((a.exchange_shares or {}).values())) for a in book.asks or []]
            out.quotes.append(BookQuote(s, ns_to_dt(book.updated, received), received, self.name, bids, asks))
        return out


def _size(v: float | None, lot: float) -> float | None:
    return None if v is None else float(v) * lot


class WholeMarketSource:
    """Every US stock in one call: Polygon's snapshot-all without a ``tickers`` filter (~10,000 tickers).

    The answer is shaped straight into columns (one pass over the JSON, no model object per ticker): at
    10,000 tickers the client's ``TickerSnapshot`` models alone would cost a large part of a 1 s cycle. The
    call itself still goes through the official client, its retries, our timeout and our guard. The symbols a
    cycle is asked for are ignored: the market decides what comes back. A ticker without a quote is a
    quarantine row (``unavailable``), never dropped silently.
    """

    def __init__(self, name: str = "polygon", limits: Limits | None = None, retries: int = 1,
                 lot_size: float = 1.0) -> None:
        self.inner = PolygonSource(name, "stocks", limits, retries, lot_size)
        self.name = name
        self.lot_size = lot_size

    def __repr__(self) -> str:
        return f"WholeMarketSource(name={self.name!r})"

    def close(self) -> None:
        self.inner.client.client.clear()

    def fetch_body(self) -> tuple[dict[str, Any], dt.datetime]:
        body = self.inner.guard.call(self.inner._get, self.inner.client.get_snapshot_all, "stocks")
        received = dt.datetime.now(dt.UTC)
        if not isinstance(body, dict) or not isinstance(body.get("tickers", []), list):
            raise SourceError(MALFORMED, "snapshot body has no 'tickers' list")
        return body, received

    def poll(self, symbols: Sequence[str], at: dt.datetime) -> Any:
        import numpy as np
        import pyarrow as pa

        from microstructure.contract.book import QUARANTINE_SCHEMA, TS_TYPE, raw_table
        from microstructure.sources.base import PollResult

        body, received = self.fetch_body()
        recv_us = (received - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        sym: list[str] = []
        ts: list[int] = []
        bp: list[float | None] = []
        bs: list[float | None] = []
        ap: list[float | None] = []
        as_: list[float | None] = []
        bad: list[tuple[str | None, str]] = []
        for d in body.get("tickers") or []:
            q = d.get("lastQuote") if isinstance(d, dict) else None
            t = d.get("ticker") if isinstance(d, dict) else None
            if not isinstance(t, str) or not isinstance(q, dict):
                bad.append((t if isinstance(t, str) else None, str(d)[:2000]))
                continue
            p_bid, p_ask = q.get("p"), q.get("P")
            if not p_bid and not p_ask:
                bad.append((t, str(d)[:2000]))
                continue
            sym.append(t)
            ts.append(q.get("t") or d.get("updated") or 0)
            bp.append(p_bid or None)
            ap.append(p_ask or None)
            bs.append(q.get("s"))
            as_.append(q.get("S"))
        n = len(sym)
        raw_ns = np.array(ts, dtype=np.int64) if n else np.zeros(0, np.int64)
        # Polygon stamps in ns (sometimes ms or µs): the same magnitude rule as ns_to_dt, vectorised.
        us = np.where(raw_ns > 10**17, raw_ns // 1000, np.where(raw_ns > 10**14, raw_ns, raw_ns * 1000))
        us = np.where(raw_ns > 0, us, recv_us)
        lot = self.lot_size

        def sizes(v: list[float | None]) -> pa.Array:
            return pa.array([None if x is None else float(x) * lot for x in v], pa.float64())

        arrays: dict[str, Any] = {
            "symbol": pa.array(sym, pa.string()),
            "event_ts": pa.array(us, pa.int64()).cast(TS_TYPE),
            "received_ts": pa.array(np.full(n, recv_us, np.int64)).cast(TS_TYPE),
            "source": pa.array([self.name] * n, pa.string()),
            "halted": pa.nulls(n, pa.bool_()),
            "bid_px_1": pa.array(bp, pa.float64()), "bid_sz_1": sizes(bs),
            "ask_px_1": pa.array(ap, pa.float64()), "ask_sz_1": sizes(as_),
        }
        rejected = QUARANTINE_SCHEMA.empty_table()
        if bad:
            rejected = pa.Table.from_pylist(
                [{"symbol": s, "received_ts": received, "source": self.name, "reason": UNAVAILABLE,
                  "detail": scrub(detail)} for s, detail in bad], schema=QUARANTINE_SCHEMA)
        return PollResult(raw=raw_table(arrays), rejected=rejected)
