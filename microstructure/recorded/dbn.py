"""Databento DBN files (MBP-10 and MBP-1, zstd-compressed ``.dbn.zst`` or plain ``.dbn``), sampled into snapshots.

A DBN file is a metadata header (dataset, schema, the symbols asked for and their mappings to instrument ids,
day by day) followed by fixed-size binary records, decoded here by Databento's own ``databento_dbn.DBNDecoder``.
An MBP-10 record carries the top 10 levels of one instrument's book after one book event; MBP-1 carries the top
level. Only records flagged ``F_LAST`` (the last record of an event) are sampled: records before it in the same
event may show a book half way through the event.

* Symbols: the metadata's mappings (``raw symbol -> instrument id`` per UTC date, the date of ``ts_recv``, the
  time Databento indexes symbology by), updated by ``SymbolMappingMsg`` records when the file has them (live
  captures; their output symbol, the contract's own, unless it is an instrument id). An instrument no mapping
  names is quarantined once per file (``unmapped_instrument``), never guessed; so is one whose symbol names
  several instruments on that date (``ambiguous_symbol``: a parent symbol such as ES.FUT).
* Prices: DBN fixed point, integer units of 1e-9. Each becomes the float nearest its exact decimal value (Python
  divides two integers correctly rounded; a float64 ``price * 1e-9`` would be off by one unit in the last place
  for some prices). ``UNDEF_PRICE`` (and size 0) marks an empty level: NULL here, never a price. A book with an
  empty side is never a book: validation quarantines it (``one_sided_book`` / ``empty_book``) and keeps the good
  rows beside it.
* Times: ``event_ts`` = ``ts_event`` (the venue's matching-engine time); ``received_ts`` = ``ts_recv`` (when
  Databento's capture server had the message). As for the Binance and Hyperliquid recordings, the receive time
  of the recording is the closest truth we have about when the data was in hand: we did not receive it live.
  A record whose times are not plausible is quarantined (``implausible_time``); so is a sampled record Databento
  flags ``F_BAD_TS_RECV`` (``bad_ts_recv``: its ``ts_recv`` is not when the message came) or ``F_MAYBE_BAD_BOOK``
  (``maybe_bad_book``: after a gap the venue feed could not recover, the book may be wrong).
* Sampling: per symbol, the last ``F_LAST`` record of each ``cadence`` slot of ``ts_recv`` (DBN files are
  ordered by ``ts_recv``, and a historical request's range is on ``ts_recv``), like the Binance and Hyperliquid
  readers; the files are read in turn as one stream, so a slot cut by a file boundary still gives one snapshot.
  A file of both schemas (metadata schema none) samples a symbol's MBP-10 records once it has shown one, never
  its MBP-1 copies of the same book.

Records are framed by their length byte before the decoder sees them: only MBP-10, MBP-1 and SymbolMappingMsg
records are decoded, each checked to be as long as its type (a shorter one panics in databento_dbn's Rust code).

Bounds: the file is streamed through ``streams.BoundedStream`` (decompressed size counted: a zstd bomb stops at
its bound), the metadata header is at most MAX_METADATA_BYTES, and at most MAX_INSTRUMENTS instruments are
held at once (pending a sample, mapped by SymbolMappingMsg records, or remembered as unmapped). Memory is one
read (1 MiB) of records, one pending record per symbol and one batch of rows.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The fixed-point scale's one declaration, databento-dbn's (the live source divides by it too). This module is
# imported only when a DBN file is read (recorded/registry.py), so the import costs --help nothing.
from databento_dbn import FIXED_PRICE_SCALE

from microstructure.contract.book import MAX_LEVELS, BookQuote, plausible_ns
from microstructure.recorded.batch import Batch, file_time, take_batch
from microstructure.recorded.bounds import FileFormatError, MiB, check_cadence, snippet, why
from microstructure.recorded.json_lines import BATCH, ts_from_ns
from microstructure.recorded.streams import BoundedStream

SOURCE_NAME = "databento"
SCHEMAS = ("mbp-10", "mbp-1")
# The metadata header: the symbols asked for and their daily mappings. 2,000 symbols (a request's maximum) over a
# year of mappings is a few MB; a header claiming more is not a DBN file we read.
MAX_METADATA_BYTES = 64 * MiB
# Instruments with a pending sample at once (one record each). A day of every US equity is ~10,000; all of OPRA
# is ~1.5 M: split such a file by symbol (``--symbol``) or request fewer symbols.
MAX_INSTRUMENTS = 200_000
UNMAPPED = "unmapped_instrument"
AMBIGUOUS = "ambiguous_symbol"
MAYBE_BAD_BOOK = "maybe_bad_book"  # F_MAYBE_BAD_BOOK: an unrecoverable gap in the venue's feed
BAD_TS_RECV = "bad_ts_recv"  # F_BAD_TS_RECV: ts_recv inaccurate (clock issues or packet reordering)


def fixed_price(v: int) -> float:
    """A DBN fixed-point price (1e-9 units) as the float nearest its exact value (integer division rounds once)."""
    return v / FIXED_PRICE_SCALE


def _levels(rec: Any, undef: int) -> tuple[list[tuple[float, float | None]], list[tuple[float, float | None]]]:
    """(bids, asks) best first. ``UNDEF_PRICE`` with size 0 is an empty level: the trailing ones are dropped
    (a side with none left is empty: ``one_sided_book``). An undefined price anywhere else (before a set level,
    or with a size) is no price: NaN (``nan_or_inf``); a price without a size is half a level
    (``incomplete_level``). DBN books are compact, so either is a broken record, and quarantined."""
    bids: list[tuple[float, float | None]] = []
    asks: list[tuple[float, float | None]] = []
    empty = (math.nan, None)
    for lv in rec.levels[:MAX_LEVELS]:
        for side, px, sz in ((bids, lv.bid_px, lv.bid_sz), (asks, lv.ask_px, lv.ask_sz)):
            if px == undef:
                side.append(empty if sz == 0 else (math.nan, float(sz)))
            else:
                side.append((fixed_price(px), float(sz) if sz else None))
    for side in (bids, asks):
        while side and side[-1] is empty:
            side.pop()
    return bids, asks


class _Symbols:
    """instrument id -> symbol, from the metadata's mappings (per UTC date) and SymbolMappingMsg records.

    A symbol that names more than one instrument on one date (a parent symbol, ES.FUT, requested with
    ``stype_in=parent``: every contract maps to it) is ambiguous there: its books cannot be told apart by symbol,
    so they are quarantined (``ambiguous_symbol``), never mixed into one symbol's series."""

    def __init__(self, mappings: dict[str, list[dict[str, Any]]]) -> None:
        self.by_id: dict[int, list[tuple[dt.date, dt.date, str, bool]]] = {}
        self.live: dict[int, str] = {}
        # instrument -> the span (ns) of its last mapping found, its symbol, and whether that is ambiguous
        self.last: dict[int, tuple[int, int, str, bool]] = {}
        for raw, intervals in mappings.items():
            spans: list[tuple[dt.date, dt.date, int]] = []
            for iv in intervals:
                try:
                    iid = int(iv["symbol"])
                except (KeyError, TypeError, ValueError):
                    continue  # a mapping to another symbology than instrument ids: not one we can use
                spans.append((iv["start_date"], iv["end_date"], iid))
            spans.sort()
            # Sorted by start: a span overlaps an earlier one iff it starts before the latest end so far, and a
            # later one iff the next span starts before it ends (end dates are exclusive).
            latest: dt.date | None = None
            for i, (start, end, iid) in enumerate(spans):
                overlaps = (latest is not None and start < latest) or (i + 1 < len(spans) and spans[i + 1][0] < end)
                latest = end if latest is None else max(latest, end)
                self.by_id.setdefault(iid, []).append((start, end, raw, overlaps))

    def get(self, iid: int, ts_ns: int) -> tuple[str, bool] | None:
        """(symbol, ambiguous) of the instrument at ``ts_ns``, or None when no mapping names it."""
        if iid in self.live:
            return self.live[iid], False
        hit = self.last.get(iid)
        if hit is not None and hit[0] <= ts_ns < hit[1]:  # most records fall in the span their previous one did
            return hit[2], hit[3]
        spans = self.by_id.get(iid)
        if not spans:
            return None
        day = dt.datetime.fromtimestamp(ts_ns // 1_000_000_000, dt.UTC).date()
        for start, end, raw, ambiguous in spans:
            if start <= day < end:
                self.last[iid] = (_day_ns(start), _day_ns(end), raw, ambiguous)
                return raw, ambiguous
        return None


def _day_ns(d: dt.date) -> int:
    return (d - dt.date(1970, 1, 1)).days * 86_400 * 1_000_000_000


# The record types read here (DBN ``RType``): their records reach the decoder, every other one is framed by its
# length byte and skipped. A record shorter than its type makes databento_dbn's Rust code panic (PanicException, a
# BaseException, with Rust's own lines on stderr): its length is checked against the type's size first.
_MBP_1, _MBP_10, _SYMBOL_MAPPING = 0x01, 0x0A, 0x16


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, metadata or record) of one DBN file, streamed and bounded; the metadata comes first.
    A file that is not DBN, or is cut short, is a FileFormatError naming where."""
    import databento_dbn as dbn

    name = path.name
    dec = dbn.DBNDecoder()
    buf = bytearray()  # bytes read and not yet framed: less than one record, plus a read
    n = 0
    sizes: dict[int, int] = {}
    seen_meta = False
    with BoundedStream(path) as fh:
        while True:
            chunk = fh.read()
            if not chunk:
                break
            buf += chunk
            if not seen_meta:
                # b"DBN", the version, the metadata's length (u32 LE), then the metadata: refused past its bound
                # before it is held, decoded once whole.
                if len(buf) < 8:
                    continue
                if buf[:3] != b"DBN":
                    raise FileFormatError(f"{name}: not a DBN file this reader knows (no DBN signature)")
                end = 8 + int.from_bytes(buf[4:8], "little")
                if end > MAX_METADATA_BYTES:
                    raise FileFormatError(f"{name}: DBN metadata of {end:,} bytes, more than {MAX_METADATA_BYTES:,} "
                                          "(MAX_METADATA_BYTES): not a DBN file this reader knows")
                if len(buf) < end:
                    continue
                try:
                    dec.write(bytes(buf[:end]))
                    meta = dec.decode()[0]
                    if not isinstance(meta, dbn.Metadata):
                        raise ValueError("no metadata")
                    tail = 8 if meta.ts_out else 0  # records then carry the gateway's send time too
                    sym_size = (dbn.SymbolMappingMsgV1 if meta.version == 1 else dbn.SymbolMappingMsg).size_hint
                except (dbn.DBNError, ValueError, IndexError) as e:
                    raise FileFormatError(f"{name}: not a DBN file this reader knows ({why(e)})") from None
                sizes = {_MBP_1: dbn.MBP1Msg.size_hint + tail, _MBP_10: dbn.MBP10Msg.size_hint + tail,
                         _SYMBOL_MAPPING: sym_size + tail}
                del buf[:end]
                seen_meta = True
                yield 0, meta
            pos, runs, nos, run = 0, [], [], -1  # runs: (start, end) of consecutive records to decode
            broken: FileFormatError | None = None  # raised once the records before it are handed over
            while pos < len(buf):
                length = buf[pos] * 4
                want = sizes.get(buf[pos + 1]) if len(buf) - pos > 1 else None
                if length == 0 or (want is not None and length < want):
                    broken = FileFormatError(f"{name} after record {n:,}: a record of {length} bytes, shorter than "
                                             f"its type's {want or 4}: not a DBN file this reader knows")
                    break
                if len(buf) - pos < length:
                    break
                n += 1
                if want is None:
                    run = -1
                else:
                    if run < 0:
                        runs.append([pos, pos])
                        run = len(runs) - 1
                    runs[run][1] = pos + length
                    nos.append(n)
                pos += length
            if runs:
                try:
                    dec.write(b"".join(bytes(buf[a:b]) for a, b in runs))
                    out = dec.decode()
                except (dbn.DBNError, ValueError) as e:
                    raise FileFormatError(f"{name} after record {nos[0] - 1:,}: not a DBN file this reader knows "
                                          f"({why(e)})") from None
                if len(out) != len(nos):  # one record decoded per record framed: anything else is not DBN
                    raise FileFormatError(f"{name} after record {nos[0] - 1:,}: not a DBN file this reader knows "
                                          f"({len(out)} records decoded of {len(nos)})")
                yield from zip(nos, out, strict=True)
            if broken is not None:
                raise broken
            del buf[:pos]
    if not seen_meta:
        raise FileFormatError(f"{name}: empty or cut short before its DBN metadata ended")
    if buf:
        raise FileFormatError(f"{name} after record {n:,}: the file is cut short ({len(buf)} bytes of a record)")


def read_dbn(files: list[Path], cadence_s: float = 1.0, symbols: set[str] | None = None) -> Iterator[Batch]:
    """Sampled snapshots of DBN MBP-10 / MBP-1 files (in turn, one stream), in ``Batch``es; ``symbols`` keeps those
    symbols only (None: every symbol). See the module docstring."""
    import databento_dbn as dbn

    check_cadence(cadence_s)
    slot_ns = round(cadence_s * 1e9)  # cadence >= 1 ms: an integer number of ns is exact enough
    undef = dbn.UNDEF_PRICE
    doubts = ((dbn.F_MAYBE_BAD_BOOK, MAYBE_BAD_BOOK), (dbn.F_BAD_TS_RECV, BAD_TS_RECV))
    quotes: list[BookQuote] = []
    origins: list[str] = []
    rejected: list[dict[str, Any]] = []
    loaded: dt.datetime | None = None

    def flush() -> Batch:
        return take_batch(quotes, origins, rejected, loaded)

    def emit(rec: Any, sym: str, where: str) -> None:
        # Databento's own doubts about a record: a gap the venue feed could not recover (the book may be wrong
        # until it recovers) or a ts_recv that is not when the message came (clock trouble, reordering: our
        # received_ts would not be true). The slot's snapshot is then quarantined, never stored as a book.
        doubt = [why for flag, why in doubts if rec.flags & flag]
        if doubt:
            rejected.append({"symbol": sym, "received_ts": loaded, "source": SOURCE_NAME, "reason": doubt[0],
                             "detail": f"DBN flags {rec.flags:#04x}: {', '.join(doubt)}", "origin": where})
            return
        bids, asks = _levels(rec, undef)
        quotes.append(BookQuote(sym, ts_from_ns(rec.ts_event), ts_from_ns(rec.ts_recv), SOURCE_NAME, bids, asks))
        origins.append(where)

    # symbol -> (slot, record, where), across files: a capture split into files cuts a slot in two, and the slot's
    # snapshot is its last record whichever file holds it (instrument ids are per file and date; symbols are not).
    pending: dict[str, tuple[int, Any, str]] = {}

    def drain() -> Iterator[Batch]:
        for sym, (_, rec, where) in pending.items():
            emit(rec, sym, where)
            if len(quotes) >= BATCH:
                yield flush()
        pending.clear()
        if quotes or rejected:
            yield flush()

    for path in files:
        loaded = file_time(path)
        names: _Symbols | None = None
        unmapped: set[int] = set()
        deep: set[str] = set()  # symbols with MBP-10 records in this file (no more than the mappings name)
        stop: list[FileFormatError] = []
        for n, rec in _stop_after(_records(path), stop):
            if n == 0:
                schema = rec.schema
                if schema is not None and str(schema) not in SCHEMAS:
                    stop.append(FileFormatError(f"{path.name}: DBN schema {snippet(schema, 20)}; backfill --format "
                                                f"dbn reads {' and '.join(SCHEMAS)}"))
                    break
                try:
                    names = _Symbols(rec.mappings)
                except (dbn.DBNError, ValueError, TypeError) as e:
                    stop.append(FileFormatError(f"{path.name}: DBN metadata mappings this reader cannot read "
                                                f"({why(e)})"))
                    break
                continue
            assert names is not None
            if isinstance(rec, dbn.SymbolMappingMsg):
                # As Databento's SDK does (InstrumentMap.insert_symbol_mapping_msg): the output symbol, the
                # contract's own (ESZ5) for a parent or continuous subscription (ES.FUT), unless it is an instrument
                # id (a raw-symbol subscription), then the input symbol. The input one would file every contract
                # of ES.FUT under one symbol.
                try:  # the symbols are read (and checked as UTF-8) only now
                    out, inp = rec.stype_out_symbol, rec.stype_in_symbol
                except dbn.DBNError as e:
                    stop.append(FileFormatError(f"{path.name} record {n}: a symbol mapping whose symbol is not text "
                                                f"({why(e)}): not a DBN file this reader knows"))
                    break
                if rec.instrument_id not in names.live and len(names.live) >= MAX_INSTRUMENTS:
                    stop.append(FileFormatError(f"{path.name} record {n}: more than {MAX_INSTRUMENTS:,} instruments "
                                                "mapped (MAX_INSTRUMENTS): not a capture this reader holds"))
                    break
                names.live[rec.instrument_id] = inp if out.isdigit() else out
                continue
            if not isinstance(rec, dbn.MBP10Msg | dbn.MBP1Msg) or not rec.flags & dbn.F_LAST:
                continue  # other records (system, error, status) carry no book; non-last ones a partial event
            where = f"{path.name} record {n}"
            iid, recv = rec.instrument_id, rec.ts_recv
            named = names.get(iid, recv)
            if named is None or named[1]:
                if iid not in unmapped:
                    if len(unmapped) >= MAX_INSTRUMENTS:  # each is remembered, to quarantine it once
                        stop.append(FileFormatError(f"{where}: more than {MAX_INSTRUMENTS:,} instruments without a "
                                                    "symbol (MAX_INSTRUMENTS): not a file this reader knows"))
                        break
                    unmapped.add(iid)
                    rejected.append(
                        {"symbol": f"instrument_id={iid}", "received_ts": loaded, "source": SOURCE_NAME,
                         "reason": UNMAPPED,
                         "detail": "no symbol mapping names this instrument on this date (first record shown; the "
                                   "file's other records of it are skipped too)", "origin": where}
                        if named is None else
                        {"symbol": named[0], "received_ts": loaded, "source": SOURCE_NAME, "reason": AMBIGUOUS,
                         "detail": f"{snippet(named[0], 40)} names instrument_id={iid} and others on this date (a "
                                   "parent or other many-to-one symbology): request raw symbols (first record "
                                   "shown; the file's other records of it are skipped too)", "origin": where})
                continue
            sym = named[0]
            if symbols is not None and sym not in symbols:
                continue
            # A file of several schemas (metadata schema None: a live capture of mbp-10 and mbp-1) holds both
            # records of an event, each F_LAST: once a symbol has shown its 10 levels, its MBP-1 records are the
            # same book cut to one level, and sampling them would flip its series between 10 levels and 1.
            if isinstance(rec, dbn.MBP10Msg):
                deep.add(sym)
            elif sym in deep:
                continue
            if not (plausible_ns(rec.ts_event) and plausible_ns(recv)):
                rejected.append({"symbol": sym, "received_ts": loaded, "source": SOURCE_NAME,
                                 "reason": "implausible_time",
                                 "detail": f"ts_event={rec.ts_event} ns, ts_recv={recv} ns", "origin": where})
            else:
                slot = recv // slot_ns
                prev = pending.get(sym)
                if prev is not None and prev[0] != slot:
                    emit(prev[1], sym, prev[2])
                elif prev is None and len(pending) >= MAX_INSTRUMENTS:  # the pending books go in first
                    stop.append(FileFormatError(f"{where}: more than {MAX_INSTRUMENTS:,} instruments at once "
                                                "(MAX_INSTRUMENTS): read it a few symbols at a time (--symbol)"))
                    break
                pending[sym] = (slot, rec, where)
            if len(quotes) + len(rejected) >= BATCH:
                yield flush()
        if stop:  # a file cut short or broken part-way: the books before the break are kept, then the error
            yield from drain()
            raise stop[0]
    yield from drain()


def _stop_after(records: Iterator[tuple[int, Any]], stop: list[FileFormatError]) -> Iterator[tuple[int, Any]]:
    """The records until the file breaks; the error is kept in ``stop`` for the caller to raise once it has
    handed over what came before."""
    try:
        yield from records
    except FileFormatError as e:
        if not stop:
            stop.append(e)
