"""The bounds every recorded reader shares (a format's own bounds, such as IEX's packet size or Binance's buffered
diffs, sit in its reader), the error a reader raises
past one, and the checks that apply them.

Every recorded input is bounded: past a bound the reader stops with one `error:` line naming the bound (exit 2)
before it allocates for it. The bounds are far above real data (measured on ../shared/data and the vendors'
specs) and far below what hurts a laptop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.inputs import InputError

MiB = 2**20
# A text line: a CSV row, a JSON-lines message. Binance's 1000-level REST depth snapshot is 64 KB a line, a
# 5000-level one ~320 KB; a wide CSV row of 10 levels is < 1 KB.
MAX_LINE_BYTES = 4 * MiB
# A text field we keep or parse: a CSV cell of a column we read, a symbol in a JSON message. Symbols, times and
# numbers are < 64 bytes.
MAX_FIELD_BYTES = 1024
# Decompressed bytes per gzip / zstd file: at most MAX_COMPRESSION_RATIO x the compressed size (but always
# DECOMPRESSED_FLOOR) and never more than MAX_DECOMPRESSED_BYTES. Real recordings compress 6-13x (Binance JSON
# 6.5-8.8x, Hyperliquid 12.6x); a gzip bomb is ~1000x, a zstd one far more. Streamed and counted: never held.
MAX_COMPRESSION_RATIO = 200
DECOMPRESSED_FLOOR = 64 * MiB
MAX_DECOMPRESSED_BYTES = 64 * 2**30  # a full day of IEX DEEP is ~10-20 GB uncompressed
# Sampling grid: time span / cadence (the snapshots a LOBSTER or IEX DEEP file can produce per symbol). A 6.5 h
# session at 1 ms is 23.4 M; a 204-byte capture with two far-apart times must not become billions of rows.
MAX_GRID_POINTS = 25_000_000
MIN_CADENCE_S = 0.001  # below a millisecond a sampled book is the message stream itself: backfill it unsampled
MAX_CADENCE_S = 86_400.0
# Messages with one timestamp (LOBSTER, IEX DEEP): the busiest real instants carry hundreds; a million with one
# time is a broken clock, and the book it describes never settles.
MAX_MESSAGES_PER_INSTANT = 1_000_000
# Diffs buffered before a Binance recording's first REST snapshot, as text (real recordings: a few lines).
MAX_BUFFERED_BYTES = 64 * MiB
# Price levels one side of a rebuilt book may hold (Binance depth, IEX DEEP): real books hold thousands.
MAX_BOOK_LEVELS = 1_000_000
# A Parquet row group, uncompressed (from the footer): it is read as a unit. Our own lake writes ~100 MB groups.
MAX_ROW_GROUP_BYTES = 1024 * MiB
BATCH_ROWS = 100_000
BATCH_BYTES = 32 * MiB  # text parsed at a time (a batch is BATCH_ROWS rows or this much text, whichever first)


class FileFormatError(InputError):
    """The file is not in the format asked for, or passes a bound; the message says what and where (exit 2)."""


def snippet(v: Any, n: int = 60) -> str:
    """A value from a file, quoted for a one-line message: control characters escaped, cut at ``n``."""
    s = v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)
    cut = len(s) > n
    return repr(s[:n]) + ("..." if cut else "")


def why(e: BaseException) -> str:
    """A library's error text for a one-line message: its first line, cut at 200 characters, control characters
    escaped (the text may quote the file's bytes)."""
    lines = str(e).splitlines() or ["no detail given"]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in lines[0][:200])


def check_cadence(cadence_s: float) -> float:
    """The sampling cadence, refused when it is not a number of seconds in [MIN_CADENCE_S, MAX_CADENCE_S]."""
    if not (math.isfinite(cadence_s) and MIN_CADENCE_S <= cadence_s <= MAX_CADENCE_S):
        raise FileFormatError(f"--cadence {cadence_s:g}: must be between {MIN_CADENCE_S:g} s (MIN_CADENCE_S) and "
                              f"{MAX_CADENCE_S:g} s")
    return cadence_s


class GridBudget:
    """Counts the grid points a reader emits; refuses, before emitting them, the points past MAX_GRID_POINTS."""

    def __init__(self, cadence_s: float) -> None:
        self.cadence_s = cadence_s
        self.used = 0

    def take(self, n: int, where: str) -> None:
        if self.used + n > MAX_GRID_POINTS:
            raise FileFormatError(
                f"{where}: at --cadence {self.cadence_s:g} s the file's time span needs more than "
                f"{MAX_GRID_POINTS:,} snapshots (MAX_GRID_POINTS): give a larger --cadence, or split the file")
        self.used += n


class InstantCounter:
    """Counts consecutive messages with one timestamp; refuses past MAX_MESSAGES_PER_INSTANT."""

    def __init__(self) -> None:
        self.ts: int | None = None
        self.n = 0

    def add(self, ts: int, where: str, count: int = 1) -> None:
        if ts == self.ts:
            self.n += count
        else:
            self.ts, self.n = ts, count
        if self.n > MAX_MESSAGES_PER_INSTANT:
            self._refuse(where)

    def add_many(self, ts: np.ndarray, where: Callable[[int], str]) -> None:
        """Times in file order (vectorised: runs of equal times are counted at once); ``where(i)`` names the
        position of the i-th."""
        if len(ts) == 0:
            return
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ts)) + 1])
        lengths = np.diff(np.concatenate([starts, [len(ts)]]))
        if self.ts is not None and ts[0] == self.ts:
            lengths[0] += self.n
        over = np.flatnonzero(lengths > MAX_MESSAGES_PER_INSTANT)
        if len(over):
            self._refuse(where(min(len(ts) - 1, int(starts[over[0]]) + MAX_MESSAGES_PER_INSTANT)))
        self.ts, self.n = int(ts[starts[-1]]), int(lengths[-1])

    @staticmethod
    def _refuse(where: str) -> None:
        raise FileFormatError(f"{where}: more than {MAX_MESSAGES_PER_INSTANT:,} messages with one timestamp "
                              "(MAX_MESSAGES_PER_INSTANT): the file's clock is broken")


def check_fields(t: pa.Table, cols: list[str], where: Callable[[int], str]) -> None:
    """Refuses the first cell of ``cols`` longer than MAX_FIELD_BYTES; ``where(i)`` names the i-th row."""
    for c in cols:
        lengths = pc.binary_length(t.column(c).cast(pa.string()))
        top = pc.max(lengths).as_py()
        if top is not None and top > MAX_FIELD_BYTES:
            i = int(np.argmax(pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False) > MAX_FIELD_BYTES))
            raise FileFormatError(f"{where(i)}: field {snippet(c)} is longer than {MAX_FIELD_BYTES:,} bytes "
                                  "(MAX_FIELD_BYTES)")
