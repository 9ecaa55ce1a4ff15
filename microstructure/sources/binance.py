"""Recorded Binance depth streams, replayed into our snapshots.

A recording is gzip text, one message a line: ``<local receive time, ns> <websocket JSON>`` (depth diffs,
``bookTicker``, trades) plus one REST depth snapshot line (``lastUpdateId``). The book is rebuilt exactly as
Binance documents it:

* diffs that arrive before the snapshot are buffered;
* spot: drop diffs with ``u <= lastUpdateId``; the first applied one has ``U <= lastUpdateId + 1 <= u``; then each
  diff's ``U`` is the previous ``u + 1``;
* futures (USD-M, COIN-M: diffs carry ``pu``): drop diffs with ``u < lastUpdateId``; the first applied one has
  ``U <= lastUpdateId <= u``; then each diff's ``pu`` is the previous ``u``;
* a size of 0 removes the level.

A break in the chain is a gap: the book is unusable until a new snapshot, and every sample slot it covers is a
quarantine row (``sequence_gap``), never a book. Several files of one continuous stream are read as one stream.
The book is sampled at ``cadence`` seconds of exchange time: each sample is the book after the last diff of its
slot, top 10 levels, ``event_ts`` = the diff's exchange time ``E``, ``received_ts`` = the recorder's receive time.
Sizes are in the base asset (spot, USD-M); COIN-M quotes contracts (100 USD per BTC contract, 10 USD otherwise),
converted to the base asset (contracts x USD / price) so that price x size is dollars, as everywhere else.
Memory is the book plus one batch of rows.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sortedcontainers import SortedDict

from microstructure.book import MAX_LEVELS, QUARANTINE_SCHEMA, BookQuote, table_from_quotes
from microstructure.sources.files import Batch, FileFormatError

GAP = "sequence_gap"
BATCH = 10_000


class DepthBook:
    """One instrument's full book: price -> size per side, kept sorted."""

    def __init__(self, bids: Iterable[Any], asks: Iterable[Any]) -> None:
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()
        self.update(bids, asks)

    def update(self, bids: Iterable[Any], asks: Iterable[Any]) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for p, q in levels:
                price, size = float(p), float(q)
                if size == 0:
                    side.pop(price, None)
                else:
                    side[price] = size

    def top(self, n: int = MAX_LEVELS) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        nb = len(self.bids)
        bids = [self.bids.peekitem(nb - 1 - i) for i in range(min(n, nb))]
        asks = [self.asks.peekitem(i) for i in range(min(n, len(self.asks)))]
        return bids, asks

    def best(self) -> tuple[float | None, float | None]:
        return (self.bids.peekitem(-1)[0] if self.bids else None, self.asks.peekitem(0)[0] if self.asks else None)


@dataclass
class Event:
    kind: str  # "book" (a diff applied), "ticker" (a bookTicker), "gap" (the chain broke), "skip" (a diff
    # that arrived while the book was unusable)
    recv_ns: int
    data: dict[str, Any]
    book: DepthBook | None = None


@dataclass
class _Stream:
    book: DepthBook | None = None
    last_id: int | None = None
    synced: bool = False  # the first diff after the snapshot has been applied
    broken: bool = False
    pending: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    symbol: str | None = None


def _lines(files: list[Path]) -> Iterator[tuple[int, dict[str, Any]]]:
    for f in files:
        try:
            with gzip.open(f, "rt") as fh:
                for n, line in enumerate(fh, 1):
                    line = line.strip()
                    if not line:
                        continue
                    stamp, _, body = line.partition(" ")
                    try:
                        yield int(stamp), json.loads(body)
                    except ValueError as e:
                        raise FileFormatError(f"{f.name} line {n}: not '<receive ns> <json>' ({e})") from None
        except (OSError, EOFError) as e:  # not gzip, or cut short
            raise FileFormatError(f"{f.name}: cannot read the gzip stream ({e})") from None


def replay(files: list[Path]) -> Iterator[Event]:
    """The stream's events in order, the book rebuilt as Binance documents (see the module docstring)."""
    st = _Stream()

    def diff(recv: int, d: dict[str, Any]) -> Iterator[Event]:
        if st.broken:
            yield Event("skip", recv, d)
            return
        assert st.book is not None and st.last_id is not None
        first, last = int(d["U"]), int(d["u"])
        futures = "pu" in d
        if not st.synced:
            snap = st.last_id
            if (last < snap) if futures else (last <= snap):
                return  # older than the snapshot
            lo_ok = first <= snap if futures else first <= snap + 1
            hi_ok = last >= snap if futures else last >= snap + 1
            if not (lo_ok and hi_ok):
                st.broken = True
                yield Event("gap", recv, {**d, "reason": f"first diff U={first} u={last} does not straddle "
                                                        f"lastUpdateId={snap}"})
                return
            st.synced = True
        else:
            ok = int(d["pu"]) == st.last_id if futures else first == st.last_id + 1
            if not ok:
                st.broken = True
                prev = d.get("pu", first)
                yield Event("gap", recv, {**d, "reason": f"diff follows {prev}, the book is at {st.last_id}"})
                return
        st.book.update(d.get("b", []), d.get("a", []))
        st.last_id = last
        yield Event("book", recv, d, st.book)

    for recv, msg in _lines(files):
        if "lastUpdateId" in msg:  # a REST snapshot: (re)start the book, then the buffered diffs
            st.book = DepthBook(msg.get("bids", []), msg.get("asks", []))
            st.last_id, st.synced, st.broken = int(msg["lastUpdateId"]), False, False
            buffered, st.pending = st.pending, []
            for r, d in buffered:
                yield from diff(r, d)
            continue
        stream, data = msg.get("stream", ""), msg.get("data")
        if not isinstance(data, dict):
            continue
        if "@depth" in stream:
            s = data.get("s")
            if st.symbol is None:
                st.symbol = s
            elif s != st.symbol:
                raise FileFormatError(f"one stream per call: found {st.symbol} and {s}")
            if st.book is None:
                st.pending.append((recv, data))
                if len(st.pending) > 200_000:
                    raise FileFormatError("200,000 depth diffs and no REST snapshot: not a complete recording")
                continue
            yield from diff(recv, data)
        elif stream.endswith("@bookTicker"):
            yield Event("ticker", recv, data)


def coinm_contract_usd(symbol: str) -> float:
    """USD value of one COIN-M contract: 100 for BTC, 10 for every other coin (Binance's contract specs)."""
    return 100.0 if symbol.startswith("BTCUSD") else 10.0


def _base_sizes(levels: list[tuple[float, float]], usd: float) -> list[tuple[float, float]]:
    return [(p, q * usd / p) for p, q in levels]


def _symbol(d: dict[str, Any]) -> tuple[str, str]:
    """(our symbol, source) for a diff: spot keeps Binance's name, USD-M perpetuals get ``-PERP`` (they share
    spot's name), COIN-M's names already end in ``_PERP``."""
    s = str(d.get("s"))
    if "pu" not in d:
        return s, "binance-spot"
    if s.endswith("_PERP"):
        return s, "binance-coinm"
    return f"{s}-PERP", "binance-usdm"


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ts(ns: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=ns // 1000)


def read_binance_depth(files: list[Path], cadence: float = 1.0, symbol: str | None = None,
                       levels: int = MAX_LEVELS) -> Iterator[Batch]:
    """Sampled snapshots of the rebuilt book (``Batch``es of up to 10,000 rows) and gap quarantine rows."""
    import pyarrow as pa

    if cadence <= 0:
        raise FileFormatError("cadence must be > 0")
    slot_ms = cadence * 1000
    quotes: list[BookQuote] = []
    rejected: list[dict[str, Any]] = []
    pending: tuple[int, int, Any, Any, str, str] | None = None  # slot, recv, E, top, symbol, source
    gap_slots: set[int] = set()

    def flush() -> Batch:
        raw = table_from_quotes(quotes)
        rej = pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA) if rejected else QUARANTINE_SCHEMA.empty_table()
        quotes.clear()
        rejected.clear()
        return Batch(raw, rej)

    def emit(p: tuple[int, int, Any, Any, str, str]) -> None:
        _, recv, e_ms, (bids, asks), sym, src = p
        quotes.append(BookQuote(symbol or sym, _EPOCH + dt.timedelta(milliseconds=e_ms), _ts(recv), src, bids, asks))

    for ev in replay(sorted(files)):
        if ev.kind == "ticker":
            continue
        e_ms = int(ev.data.get("E") or 0)
        slot = int(e_ms // slot_ms)
        sym, src = _symbol(ev.data)
        if pending is not None and slot != pending[0]:
            emit(pending)
            pending = None
        if ev.kind == "book":
            assert ev.book is not None
            bids, asks = ev.book.top(levels)
            if src == "binance-coinm":  # sizes in contracts: our books count the base asset (px x size = USD)
                usd = coinm_contract_usd(sym)
                bids, asks = _base_sizes(bids, usd), _base_sizes(asks, usd)
            pending = (slot, ev.recv_ns, e_ms, (bids, asks), sym, src)
        elif slot not in gap_slots:  # "gap" or "skip": the book is unusable in this slot
            gap_slots.add(slot)
            rejected.append({"symbol": symbol or sym, "event_ts": _EPOCH + dt.timedelta(milliseconds=e_ms),
                             "received_ts": _ts(ev.recv_ns), "source": src, "reason": GAP,
                             "detail": ev.data.get("reason", "the book is unusable until a new snapshot")})
        if len(quotes) + len(rejected) >= BATCH:
            yield flush()
    if pending is not None:
        emit(pending)
    if quotes or rejected:
        yield flush()


def read_hyperliquid_l2(files: list[Path], cadence: float = 1.0, symbol: str | None = None,
                        levels: int = MAX_LEVELS) -> Iterator[Batch]:
    """Hyperliquid ``l2Book`` recordings (full 20-level snapshots, same line format): the last snapshot of each
    ``cadence`` slot, top 10 levels; ``event_ts`` = Hyperliquid's ``time``, ``received_ts`` = the recorder's.
    Symbols are ``<coin>-PERP`` (Hyperliquid's books are perpetuals), source ``hyperliquid``."""
    if cadence <= 0:
        raise FileFormatError("cadence must be > 0")
    slot_ms = cadence * 1000
    quotes: list[BookQuote] = []
    last: tuple[int, BookQuote] | None = None
    for recv, msg in _lines(sorted(files)):
        if msg.get("channel") != "l2Book" or not isinstance(msg.get("data"), dict):
            continue
        d = msg["data"]
        try:
            bids_raw, asks_raw = d["levels"]
            bids = [(float(x["px"]), float(x["sz"])) for x in bids_raw][:levels]
            asks = [(float(x["px"]), float(x["sz"])) for x in asks_raw][:levels]
            e_ms = int(d["time"])
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"l2Book message without levels/time ({e})") from None
        q = BookQuote(symbol or f"{d.get('coin')}-PERP", _EPOCH + dt.timedelta(milliseconds=e_ms), _ts(recv),
                      "hyperliquid", bids, asks)
        slot = int(e_ms // slot_ms)
        if last is not None and slot != last[0]:
            quotes.append(last[1])
        last = (slot, q)
    if last is not None:
        quotes.append(last[1])
    if quotes:
        yield Batch(table_from_quotes(quotes), QUARANTINE_SCHEMA.empty_table())
