"""Recorded Binance depth streams, replayed into our snapshots.

A recording is gzip text, one message a line: ``<local receive time, ns> <websocket JSON>`` (depth diffs,
``bookTicker``, trades; read by ``recorded.json_lines``) plus one REST depth snapshot line (``lastUpdateId``). The
book is rebuilt exactly as Binance documents it:

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
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sortedcontainers import SortedDict

from microstructure.contract.book import MAX_LEVELS, BookQuote
from microstructure.recorded.batch import Batch, take_batch
from microstructure.recorded.bounds import MAX_BOOK_LEVELS, MAX_BUFFERED_BYTES, FileFormatError, check_cadence, snippet
from microstructure.recorded.json_lines import (
    BATCH,
    EPOCH,
    Line,
    implausible_row,
    int_field,
    malformed,
    read_lines,
    symbol_field,
    times_ok,
    ts_from_ns,
)

GAP = "sequence_gap"
MAX_BUFFERED_DIFFS = 200_000  # diffs before the first REST snapshot (real recordings: a handful)


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
            if len(side) > MAX_BOOK_LEVELS:
                raise FileFormatError(f"the book holds more than {MAX_BOOK_LEVELS:,} price levels on one side "
                                      "(MAX_BOOK_LEVELS): not a real book")

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
    where: str = ""  # file and line of the message
    loaded: dt.datetime | None = None  # its file's time (received_ts of a row quarantined for its time)


@dataclass
class _Diff:
    first: int
    last: int
    prev: int | None  # ``pu`` (futures)
    e_ms: int
    symbol: str
    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]


@dataclass
class _Stream:
    book: DepthBook | None = None
    last_id: int | None = None
    synced: bool = False  # the first diff after the snapshot has been applied
    broken: bool = False
    pending: list[tuple[Line, dict[str, Any], _Diff]] = field(default_factory=list)
    pending_bytes: int = 0
    symbol: str | None = None


def _levels(v: Any, where: str, key: str) -> list[tuple[float, float]]:
    """``[[price, size], ...]`` as floats; anything else (or a non-finite number) is malformed."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise malformed(where, f"{key!r} is not a list of [price, size]")
    out = []
    for lv in v:
        if not isinstance(lv, list | tuple) or len(lv) < 2:
            raise malformed(where, f"{key!r} holds {snippet(lv, 30)}, not [price, size]")
        try:
            p, q = float(lv[0]), float(lv[1])
        except (TypeError, ValueError):
            raise malformed(where, f"{key!r} holds {snippet(lv, 30)}, not [price, size] numbers") from None
        if not (math.isfinite(p) and math.isfinite(q)):
            raise malformed(where, f"{key!r} holds a non-finite number: {snippet(lv, 30)}")
        out.append((p, q))
    return out


def _parse_diff(d: dict[str, Any], where: str) -> _Diff:
    return _Diff(int_field(d, "U", where), int_field(d, "u", where), int_field(d, "pu", where) if "pu" in d else None,
                 int_field(d, "E", where), symbol_field(d.get("s"), where, "s"), _levels(d.get("b"), where, "b"),
                 _levels(d.get("a"), where, "a"))


def replay(files: list[Path]) -> Iterator[Event]:
    """The stream's events in order, the book rebuilt as Binance documents (see the module docstring). A
    malformed message stops the replay with its file and line (a FileFormatError)."""
    st = _Stream()

    def diff(line: Line, d: dict[str, Any], p: _Diff) -> Iterator[Event]:
        recv = line.recv
        ev: dict[str, Any] = {"where": line.where, "loaded": line.loaded}
        if st.broken:
            yield Event("skip", recv, d, **ev)
            return
        assert st.book is not None and st.last_id is not None
        first, last = p.first, p.last
        futures = p.prev is not None
        if not st.synced:
            snap = st.last_id
            if (last < snap) if futures else (last <= snap):
                return  # older than the snapshot
            lo_ok = first <= snap if futures else first <= snap + 1
            hi_ok = last >= snap if futures else last >= snap + 1
            if not (lo_ok and hi_ok):
                st.broken = True
                yield Event("gap", recv, {**d, "reason": f"first diff U={first} u={last} does not straddle "
                                                        f"lastUpdateId={snap}"}, **ev)
                return
            st.synced = True
        else:
            ok = p.prev == st.last_id if futures else first == st.last_id + 1
            if not ok:
                st.broken = True
                prev = p.prev if futures else first
                yield Event("gap", recv, {**d, "reason": f"diff follows {prev}, the book is at {st.last_id}"}, **ev)
                return
        try:
            st.book.update(p.bids, p.asks)
        except FileFormatError as e:
            raise FileFormatError(f"{line.where}: {e}") from None
        st.last_id = last
        yield Event("book", recv, d, st.book, **ev)

    for line in read_lines(files):
        msg = line.msg
        if "lastUpdateId" in msg:  # a REST snapshot: (re)start the book, then the buffered diffs
            last_id = int_field(msg, "lastUpdateId", line.where)
            bids, asks = _levels(msg.get("bids"), line.where, "bids"), _levels(msg.get("asks"), line.where, "asks")
            try:
                st.book = DepthBook(bids, asks)
            except FileFormatError as e:
                raise FileFormatError(f"{line.where}: {e}") from None
            st.last_id, st.synced, st.broken = last_id, False, False
            buffered, st.pending, st.pending_bytes = st.pending, [], 0
            for ln, d, p in buffered:
                yield from diff(ln, d, p)
            continue
        stream, data = msg.get("stream", ""), msg.get("data")
        if not isinstance(stream, str):
            raise malformed(line.where, "'stream' is not text")
        if "@depth" in stream:
            if not isinstance(data, dict):
                raise malformed(line.where, "a depth message without a 'data' object")
            p = _parse_diff(data, line.where)
            if st.symbol is None:
                st.symbol = p.symbol
            elif p.symbol != st.symbol:
                raise FileFormatError(f"{line.where}: one stream per call: found {snippet(st.symbol, 30)} and "
                                      f"{snippet(p.symbol, 30)}")
            if st.book is None:
                st.pending.append((line, data, p))
                st.pending_bytes += line.size
                if len(st.pending) > MAX_BUFFERED_DIFFS or st.pending_bytes > MAX_BUFFERED_BYTES:
                    raise FileFormatError(f"{line.where}: {len(st.pending):,} depth diffs ({st.pending_bytes:,} "
                                          f"bytes) and no REST snapshot (at most {MAX_BUFFERED_DIFFS:,} diffs, "
                                          f"{MAX_BUFFERED_BYTES:,} bytes: MAX_BUFFERED_BYTES): not a complete "
                                          "recording")
                continue
            yield from diff(line, data, p)
        elif stream.endswith("@bookTicker") and isinstance(data, dict):
            yield Event("ticker", line.recv, data, where=line.where, loaded=line.loaded)


def coinm_contract_usd(symbol: str) -> float:
    """USD value of one COIN-M contract: 100 for BTC, 10 for every other coin (Binance's contract specs)."""
    return 100.0 if symbol.startswith("BTCUSD") else 10.0


def _base_sizes(levels: list[tuple[float, float]], usd: float) -> list[tuple[float, float]]:
    # A price of 0 (or below) has no base-asset size: NaN, and validation quarantines the book.
    return [(p, q * usd / p if p > 0 else math.nan) for p, q in levels]


def _symbol(d: dict[str, Any]) -> tuple[str, str]:
    """(our symbol, source) for a diff: spot keeps Binance's name, USD-M perpetuals get ``-PERP`` (they share
    spot's name), COIN-M's names already end in ``_PERP``."""
    s = str(d.get("s"))
    if "pu" not in d:
        return s, "binance-spot"
    if s.endswith("_PERP"):
        return s, "binance-coinm"
    return f"{s}-PERP", "binance-usdm"


def read_binance_depth(files: list[Path], cadence: float = 1.0, symbol: str | None = None,
                       levels: int = MAX_LEVELS) -> Iterator[Batch]:
    """Sampled snapshots of the rebuilt book (``Batch``es of up to 10,000 rows), gap quarantine rows, and
    messages whose times are not plausible (``implausible_time``: quarantined, never sampled)."""
    check_cadence(cadence)
    slot_ms = cadence * 1000
    quotes: list[BookQuote] = []
    origins: list[str] = []
    rejected: list[dict[str, Any]] = []
    pending: tuple[int, int, Any, Any, str, str, str] | None = None  # slot, recv, E, top, symbol, source, where
    gap_slots: set[int] = set()
    loaded: dt.datetime | None = None

    def flush() -> Batch:
        return take_batch(quotes, origins, rejected, loaded)

    def emit(p: tuple[int, int, Any, Any, str, str, str]) -> None:
        _, recv, e_ms, (bids, asks), sym, src, where = p
        quotes.append(BookQuote(symbol or sym, EPOCH + dt.timedelta(milliseconds=e_ms), ts_from_ns(recv), src,
                                bids, asks))
        origins.append(where)

    for ev in replay(sorted(files)):
        if ev.kind == "ticker":
            continue
        loaded = ev.loaded
        e_ms = int(ev.data["E"])  # checked by the replay
        sym, src = _symbol(ev.data)
        if not times_ok(e_ms, ev.recv_ns):
            rejected.append(implausible_row(symbol or sym, src, ev.data.get("E"), ev.recv_ns, ev.where, ev.loaded))
        else:
            slot = int(e_ms // slot_ms)
            if pending is not None and slot != pending[0]:
                emit(pending)
                pending = None
            if ev.kind == "book":
                assert ev.book is not None
                bids, asks = ev.book.top(levels)
                if src == "binance-coinm":  # sizes in contracts: our books count the base asset (px x size = USD)
                    usd = coinm_contract_usd(sym)
                    bids, asks = _base_sizes(bids, usd), _base_sizes(asks, usd)
                pending = (slot, ev.recv_ns, e_ms, (bids, asks), sym, src, ev.where)
            elif slot not in gap_slots:  # "gap" or "skip": the book is unusable in this slot
                gap_slots.add(slot)
                rejected.append({"symbol": symbol or sym, "event_ts": EPOCH + dt.timedelta(milliseconds=e_ms),
                                 "received_ts": ts_from_ns(ev.recv_ns), "source": src, "reason": GAP,
                                 "detail": ev.data.get("reason", "the book is unusable until a new snapshot"),
                                 "origin": ev.where})
        if len(quotes) + len(rejected) >= BATCH:
            yield flush()
    if pending is not None:
        emit(pending)
    if quotes or rejected:
        yield flush()


