"""The snapshot contract: one Arrow schema for a polled order-book snapshot, and its validation.

A snapshot row is one source's view of one symbol's book at one instant. Prices and sizes are stored
"wide" (``bid_px_1 .. bid_px_10``, ``bid_sz_1 ..``, ``ask_px_1 ..``, ``ask_sz_1 ..``) so the DuckDB
transforms read plain columns and Parquet compresses each level well. A level a source did not give
is NULL, never zero: ``book_levels`` says how many levels the source really gave, so an L1 quote is
never mistaken for a thin L2 book.

Validation never raises and never drops: every row ends up either in the clean table or in the
quarantine table with a ``reason``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_LEVELS = 10
TS_TYPE = pa.timestamp("us", tz="UTC")

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
    ]
)

KEY = ("symbol", "event_ts", "source")

# Reasons, in the order they are checked: the first that applies is recorded.
REASONS = (
    "missing_key",
    "empty_book",
    "one_sided_book",
    "nan_or_inf",
    "incomplete_level",
    "level_gap",
    "nonpositive_price",
    "negative_size",
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
    bids: Sequence[tuple[float, float]] = field(default_factory=tuple)  # best first
    asks: Sequence[tuple[float, float]] = field(default_factory=tuple)
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


def raw_table(arrays: dict[str, pa.Array | np.ndarray | list]) -> pa.Table:
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


def classify(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def validate(raw: pa.Table) -> Validated:
    """Split a raw snapshot table into clean rows and quarantine records (with a reason each)."""
    reason, levels, locked = classify(raw)
    table = raw.set_column(raw.schema.get_field_index("book_levels"), "book_levels", pa.array(levels))
    table = table.set_column(table.schema.get_field_index("locked"), "locked", pa.array(locked))
    bad = np.array([r is not None for r in reason], dtype=bool)
    clean = table.filter(pa.array(~bad)).cast(SNAPSHOT_SCHEMA)
    q = table.filter(pa.array(bad))
    q = q.append_column("reason", pa.array(list(reason[bad]), pa.string()))
    q = q.append_column("detail", pa.nulls(q.num_rows, pa.string()))
    return Validated(clean=clean, quarantine=q.cast(QUARANTINE_SCHEMA))


def malformed_record(symbol: str | None, source: str, received_ts: dt.datetime, reason: str,
                     detail: object) -> pa.Table:
    """A quarantine row for an answer that could not even be shaped into a snapshot."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    row = {f.name: None for f in QUARANTINE_SCHEMA}
    row.update(symbol=symbol, source=source, received_ts=to_utc_us(received_ts), reason=reason,
               detail=text[:2000])
    return pa.Table.from_pylist([row], schema=QUARANTINE_SCHEMA)
