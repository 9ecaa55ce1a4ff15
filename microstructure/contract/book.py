"""The snapshot contract: one Arrow schema for a polled order-book snapshot, and its validation.

A snapshot row is one source's view of one symbol's book at one instant. Prices and sizes are stored
"wide" (``bid_px_1 .. bid_px_10``, ``bid_sz_1 ..``, ``ask_px_1 ..``, ``ask_sz_1 ..``) so the DuckDB
transforms read plain columns and Parquet compresses each level well. A level a source did not give
is NULL, never zero: ``book_levels`` says how many levels the source really gave, so an L1 quote is
never mistaken for a thin L2 book.

Validation never raises and never drops: every row ends up either in the clean table or in the
quarantine table with a ``reason``. What "plausible" means for a time, a price and a size is defined here once,
for every source and every recorded format.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_LEVELS = 10
TS_TYPE = pa.timestamp("us", tz="UTC")

# A book time before this, or more than AHEAD past the clock, is a broken timestamp (``implausible_time``): no
# electronic book we can read is older, and a clock a day fast is broken, not early. One definition for every
# source: live polls, wide, snapshots, LOBSTER, IEX DEEP, Binance and Hyperliquid recordings.
EARLIEST = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
AHEAD = dt.timedelta(days=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
EARLIEST_US = (EARLIEST - _EPOCH) // dt.timedelta(microseconds=1)

# Prices and sizes a real book can hold (``price_out_of_range`` / ``size_out_of_range``). Beyond them a value is
# corrupt, and left in it makes features overflow (two 1e308 prices give mid = inf).
# - MAX_PRICE 1e12: the dearest quotes are far below it: Berkshire A ~7e5 USD, BTC ~1e5 USD, ~1.6e9 IDR and
#   ~2.5e9 VND, and ~1e11 in the rial's street rate.
# - MIN_PRICE 1e-15: the cheapest real quotes (meme tokens near 1e-8 USD, SHIB/BTC near 2.5e-10) are thousands
#   of times above it; only an underflow or a unit error lands below.
# - MAX_SIZE 1e15: above the whole supply of the most numerous tokens (SHIB ~5.9e14, PEPE ~4.2e14), so no one
#   level can hold more. price x size stays below 1e27: every product and square a feature takes is finite.
MAX_PRICE = 1e12
MIN_PRICE = 1e-15
MAX_SIZE = 1e15


def latest_plausible(now: dt.datetime | None = None) -> dt.datetime:
    return (now or dt.datetime.now(dt.UTC)) + AHEAD


def plausible_us(us: np.ndarray, now: dt.datetime | None = None) -> np.ndarray:
    """Per value: is this time (epoch microseconds, int64 or float) plausible? NaN is not."""
    hi = (latest_plausible(now) - _EPOCH) // dt.timedelta(microseconds=1)
    with np.errstate(invalid="ignore"):
        return (us >= EARLIEST_US) & (us <= hi)


def plausible_ns(ns: int, now: dt.datetime | None = None) -> bool:
    """One epoch-nanosecond time (any Python int, however large): plausible? For stream readers."""
    hi = (latest_plausible(now) - _EPOCH) // dt.timedelta(microseconds=1)
    return EARLIEST_US * 1000 <= ns <= hi * 1000

LEVEL_COLUMNS: list[str] = [
    f"{side}_{kind}_{i}" for side in ("bid", "ask") for i in range(1, MAX_LEVELS + 1) for kind in ("px", "sz")
]

SNAPSHOT_SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("event_ts", TS_TYPE, nullable=False),  # the source's time for this book
        pa.field("received_ts", TS_TYPE, nullable=False),  # when we had it in hand
        pa.field("source", pa.string(), nullable=False),
        pa.field("book_levels", pa.int32(), nullable=False),  # max levels present on either side
        pa.field("halted", pa.bool_()),  # NULL when the source cannot tell
        pa.field("locked", pa.bool_(), nullable=False),  # best bid == best ask: kept, flagged
        *[pa.field(c, pa.float64()) for c in LEVEL_COLUMNS],
    ]
)

# What a source hands over before validation: same columns, nothing guaranteed.
RAW_SCHEMA = pa.schema([f.with_nullable(True) for f in SNAPSHOT_SCHEMA])

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string()),
        pa.field("event_ts", TS_TYPE),
        pa.field("received_ts", TS_TYPE),
        pa.field("source", pa.string()),
        pa.field("book_levels", pa.int32()),
        pa.field("halted", pa.bool_()),
        pa.field("locked", pa.bool_()),
        *[pa.field(c, pa.float64()) for c in LEVEL_COLUMNS],
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),  # e.g. the raw payload for a row that could not be parsed
        # Where a recorded row came from: ``<file> line 12`` / ``row 12`` / ``packet 3 message 7``; NULL for live
        # sources. Part of the quarantine's key: rejected rows that share a time (or have none) stay distinct,
        # and a re-run of the same file finds the same keys.
        pa.field("origin", pa.string()),
    ]
)

KEY = ("symbol", "event_ts", "source")

# Reasons, in the order they are checked: the first that applies is recorded.
REASONS = (
    "missing_key",
    "implausible_time",
    "empty_book",
    "one_sided_book",
    "nan_or_inf",
    "incomplete_level",
    "level_gap",
    "nonpositive_price",
    "negative_size",
    "price_out_of_range",
    "size_out_of_range",
    "levels_out_of_order",
    "duplicate_level",
    "crossed_book",
)


@dataclass(frozen=True)
class BookQuote:
    """A source's answer for one symbol, before it is shaped into the wide schema."""

    symbol: str
    event_ts: dt.datetime
    received_ts: dt.datetime
    source: str
    # (price, size), best first; a size the vendor did not give is None and stays NULL in the table.
    bids: Sequence[tuple[float, float | None]] = field(default_factory=tuple)
    asks: Sequence[tuple[float, float | None]] = field(default_factory=tuple)
    halted: bool | None = None


def to_utc_us(ts: dt.datetime) -> dt.datetime:
    """Timezone-aware UTC, floored to microseconds (Parquet/Feast precision)."""
    if ts.tzinfo is None:
        raise ValueError(f"naive timestamp {ts!r}: sources must give timezone-aware times")
    return ts.astimezone(dt.UTC)


def empty_columns(n: int) -> dict[str, np.ndarray]:
    return {c: np.full(n, np.nan) for c in LEVEL_COLUMNS}


def table_from_quotes(quotes: Iterable[BookQuote]) -> pa.Table:
    """Shape quotes into the raw snapshot table (not yet validated; ``book_levels``/``locked`` unset).

    Levels beyond ``MAX_LEVELS`` are ignored: the contract stores the top 10.
    """
    quotes = list(quotes)
    n = len(quotes)
    cols = empty_columns(n)
    present = {c: np.zeros(n, dtype=bool) for c in LEVEL_COLUMNS}
    for r, q in enumerate(quotes):
        for side, levels in (("bid", q.bids), ("ask", q.asks)):
            for i, (px, sz) in enumerate(list(levels)[:MAX_LEVELS], start=1):
                for kind, v in (("px", px), ("sz", sz)):
                    c = f"{side}_{kind}_{i}"
                    if v is not None:
                        cols[c][r] = float(v)
                        present[c][r] = True
    arrays = {
        "symbol": pa.array([q.symbol for q in quotes], pa.string()),
        "event_ts": pa.array([to_utc_us(q.event_ts) for q in quotes], TS_TYPE),
        "received_ts": pa.array([to_utc_us(q.received_ts) for q in quotes], TS_TYPE),
        "source": pa.array([q.source for q in quotes], pa.string()),
        "halted": pa.array([q.halted for q in quotes], pa.bool_()),
    }
    for c in LEVEL_COLUMNS:
        arrays[c] = pa.array(cols[c], pa.float64(), mask=~present[c])
    return raw_table(arrays)


def raw_table(arrays: dict[str, pa.Array | np.ndarray | list[Any]]) -> pa.Table:
    """Build a raw (unvalidated) table; ``book_levels`` and ``locked`` are filled in by validation."""
    n = len(arrays["symbol"])
    out = []
    for f in RAW_SCHEMA:
        if f.name in arrays:
            a = arrays[f.name]
            out.append(a.cast(f.type) if isinstance(a, pa.Array) else pa.array(a, f.type))
        elif f.name == "book_levels":
            out.append(pa.array(np.zeros(n, dtype=np.int32)))
        elif f.name == "locked":
            out.append(pa.array(np.zeros(n, dtype=bool)))
        else:
            out.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(out, schema=RAW_SCHEMA)


def _side(table: pa.Table, side: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(values with NaN for missing, present mask) as (n, MAX_LEVELS) arrays."""
    vals = np.empty((table.num_rows, MAX_LEVELS))
    present = np.empty((table.num_rows, MAX_LEVELS), dtype=bool)
    for i in range(MAX_LEVELS):
        col = table.column(f"{side}_{kind}_{i + 1}")
        present[:, i] = pc.is_valid(col).to_numpy(zero_copy_only=False)
        vals[:, i] = col.to_numpy(zero_copy_only=False)
    return vals, present


def _times_us(table: pa.Table, name: str) -> np.ndarray:
    """A timestamp column as epoch microseconds (float64, NaN for NULL; float is exact enough to compare with
    the plausible range)."""
    return table.column(name).cast(TS_TYPE).cast(pa.int64()).to_numpy(zero_copy_only=False).astype("float64")


def classify(table: pa.Table, now: dt.datetime | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (reason per row or None, book_levels, locked) for a raw snapshot table. Vectorised."""
    n = table.num_rows
    reason = np.full(n, None, dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        reason[(reason == None) & mask] = why  # noqa: E711 - numpy elementwise comparison

    bp, bp_ok = _side(table, "bid", "px")
    bs, bs_ok = _side(table, "bid", "sz")
    ap, ap_ok = _side(table, "ask", "px")
    az, az_ok = _side(table, "ask", "sz")

    sym = table.column("symbol")
    missing_key = ~pc.is_valid(sym).to_numpy(zero_copy_only=False)
    missing_key |= np.array([not s for s in sym.to_pylist()], dtype=bool)
    for c in ("event_ts", "received_ts", "source"):
        missing_key |= ~pc.is_valid(table.column(c)).to_numpy(zero_copy_only=False)
    mark(missing_key, "missing_key")
    mark(~(plausible_us(_times_us(table, "event_ts"), now) & plausible_us(_times_us(table, "received_ts"), now)),
         "implausible_time")

    bid_any = (bp_ok | bs_ok).any(axis=1)
    ask_any = (ap_ok | az_ok).any(axis=1)
    mark(~bid_any & ~ask_any, "empty_book")
    mark(bid_any ^ ask_any, "one_sided_book")

    with np.errstate(invalid="ignore"):
        nonfinite = np.zeros(n, dtype=bool)
        for v, ok in ((bp, bp_ok), (bs, bs_ok), (ap, ap_ok), (az, az_ok)):
            nonfinite |= (ok & ~np.isfinite(v)).any(axis=1)
        mark(nonfinite, "nan_or_inf")

        mark(((bp_ok ^ bs_ok) | (ap_ok ^ az_ok)).any(axis=1), "incomplete_level")

        # A present level after an absent one: the source skipped a level.
        bid_lvl = bp_ok & bs_ok
        ask_lvl = ap_ok & az_ok
        gap = (~bid_lvl[:, :-1] & bid_lvl[:, 1:]).any(axis=1) | (~ask_lvl[:, :-1] & ask_lvl[:, 1:]).any(axis=1)
        mark(gap, "level_gap")

        mark(((bid_lvl & (bp <= 0)) | (ask_lvl & (ap <= 0))).any(axis=1), "nonpositive_price")
        mark(((bid_lvl & (bs < 0)) | (ask_lvl & (az < 0))).any(axis=1), "negative_size")
        px_out = (bid_lvl & ((bp > MAX_PRICE) | (bp < MIN_PRICE))) | (ask_lvl & ((ap > MAX_PRICE) | (ap < MIN_PRICE)))
        mark(px_out.any(axis=1), "price_out_of_range")
        mark(((bid_lvl & (bs > MAX_SIZE)) | (ask_lvl & (az > MAX_SIZE))).any(axis=1), "size_out_of_range")

        both_b = bid_lvl[:, :-1] & bid_lvl[:, 1:]
        both_a = ask_lvl[:, :-1] & ask_lvl[:, 1:]
        bid_up = both_b & (bp[:, 1:] > bp[:, :-1])
        ask_down = both_a & (ap[:, 1:] < ap[:, :-1])
        mark(bid_up.any(axis=1) | ask_down.any(axis=1), "levels_out_of_order")
        dup = (both_b & (bp[:, 1:] == bp[:, :-1])).any(axis=1) | (both_a & (ap[:, 1:] == ap[:, :-1])).any(axis=1)
        mark(dup, "duplicate_level")

        best_bid = bp[:, 0]
        best_ask = ap[:, 0]
        mark(best_bid > best_ask, "crossed_book")
        locked = (best_bid == best_ask) & (reason == None)  # noqa: E711

    levels = np.maximum(bid_lvl.sum(axis=1), ask_lvl.sum(axis=1)).astype(np.int32)
    return reason, levels, locked


@dataclass
class Validated:
    clean: pa.Table  # SNAPSHOT_SCHEMA
    quarantine: pa.Table  # QUARANTINE_SCHEMA

    def reasons(self) -> dict[str, int]:
        if self.quarantine.num_rows == 0:
            return {}
        counts = pc.value_counts(self.quarantine.column("reason")).to_pylist()
        return {c["values"]: c["counts"] for c in counts}


def validate(raw: pa.Table, origin: pa.Array | None = None, fallback_ts: dt.datetime | None = None,
             now: dt.datetime | None = None) -> Validated:
    """Split a raw snapshot table into clean rows and quarantine records (with a reason each).

    ``origin`` (per row: where a recorded row came from) is kept on quarantine rows. A row quarantined for an
    implausible time keeps its times as text in ``detail``; its ``event_ts`` is NULL and its ``received_ts`` is
    ``fallback_ts`` (default: now), so a year-0001 or year-9999 row never makes a date partition of its own."""
    reason, levels, locked = classify(raw, now)
    table = raw.set_column(raw.schema.get_field_index("book_levels"), "book_levels", pa.array(levels))
    table = table.set_column(table.schema.get_field_index("locked"), "locked", pa.array(locked))
    bad = np.array([r is not None for r in reason], dtype=bool)
    clean = table.filter(pa.array(~bad)).cast(SNAPSHOT_SCHEMA)
    q = table.filter(pa.array(bad))
    why = reason[bad]
    detail = pa.nulls(q.num_rows, pa.string())
    when = why == "implausible_time"
    if when.any():
        ev = pc.cast(q.column("event_ts").cast(TS_TYPE).cast(pa.int64()), pa.string()).to_pylist()
        rc = pc.cast(q.column("received_ts").cast(TS_TYPE).cast(pa.int64()), pa.string()).to_pylist()
        detail = pa.array([f"event_ts={e} received_ts={r} (epoch us)" if w else None
                           for w, e, r in zip(when, ev, rc, strict=True)], pa.string())
        mask = pa.array(when)
        fallback = to_utc_us(fallback_ts or dt.datetime.now(dt.UTC))
        q = q.set_column(q.schema.get_field_index("event_ts"), "event_ts",
                         pc.if_else(mask, pa.scalar(None, TS_TYPE), q.column("event_ts").cast(TS_TYPE)))
        q = q.set_column(q.schema.get_field_index("received_ts"), "received_ts",
                         pc.if_else(mask, pa.scalar(fallback, TS_TYPE), q.column("received_ts").cast(TS_TYPE)))
    q = q.append_column("reason", pa.array(list(why), pa.string()))
    q = q.append_column("detail", detail)
    q = q.append_column("origin", origin.filter(pa.array(bad)).cast(pa.string()) if origin is not None
                        else pa.nulls(q.num_rows, pa.string()))
    return Validated(clean=clean, quarantine=q.cast(QUARANTINE_SCHEMA))


def malformed_record(symbol: str | None, source: str, received_ts: dt.datetime, reason: str,
                     detail: object) -> pa.Table:
    """A quarantine row for an answer that could not even be shaped into a snapshot."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    row: dict[str, object] = {f.name: None for f in QUARANTINE_SCHEMA}
    row.update(symbol=symbol, source=source, received_ts=to_utc_us(received_ts), reason=reason,
               detail=text[:2000])
    return pa.Table.from_pylist([row], schema=QUARANTINE_SCHEMA)
