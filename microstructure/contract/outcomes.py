"""What every order-book source returns, so the poller can treat them alike."""

from __future__ import annotations

import pyarrow as pa

from microstructure.contract.book import TS_TYPE

# One row per symbol per cycle: who served it (or why nobody did). Lake dataset ``outcomes``.
OUTCOMES_SCHEMA = pa.schema([
    pa.field("cycle_ts", TS_TYPE, nullable=False),
    pa.field("symbol", pa.string(), nullable=False),
    pa.field("source", pa.string()),  # the source that served the book; NULL if none did
    pa.field("book_levels", pa.int32()),  # the served snapshot's book_levels; 0 if none
    pa.field("latency_ms", pa.float64()),  # time spent on this symbol's answering call(s)
    pa.field("error_class", pa.string()),  # NULL when served; else why the symbol went without a book
    pa.field("detail", pa.string()),  # every source tried, in order, with its result
])
OUTCOMES_KEY = ("symbol", "cycle_ts")
