"""Recorded files for backfill: our own snapshot Parquet, wide tables (CSV or Parquet), and the bounds every
recorded reader shares (this module is the one place they are set).

Wide table columns: ``symbol, ts, bid_px_1..N, bid_sz_1..N, ask_px_1..N, ask_sz_1..N`` with N <= 10 (a
missing level column is a missing level). ``ts`` is ISO-8601 (naive = UTC) or epoch seconds, ms, us or ns,
told apart by magnitude per value. A row whose time cannot be read, or lies outside the plausible range
(``book.EARLIEST`` .. a day ahead of the clock), is quarantined (``unparseable_time`` / ``implausible_time``)
and the rest go in. Files are read in batches, so a file of any size loads in bounded memory. The recorded time
is both ``event_ts`` and ``received_ts``: a file does not say when it was received, and using the book's own
time keeps point-in-time joins honest.

A CSV row is one line (a quoted newline is not supported: it ends the row, as in pyarrow's default). Every
rejected row carries its ``origin`` (``<file> line 12``, ``<file> row 12`` for Parquet) and, when its time is
what is wrong, the file's modification time as ``received_ts``: the same file gives the same quarantine keys
on every run, so a re-run adds nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from microstructure.contract.book import (
    AHEAD,
    EARLIEST,
    LEVEL_COLUMNS,
    MAX_LEVELS,
    QUARANTINE_SCHEMA,
    RAW_SCHEMA,
    TS_TYPE,
    BookQuote,
    plausible_us,
    raw_table,
    table_from_quotes,
)
from microstructure.contract.inputs import InputError

# ---- bounds ---------------------------------------------------------------------------------------------------
# Every recorded input is bounded: past a bound the reader stops with one `error:` line naming the bound (exit 2)
# before it allocates for it. The bounds are far above real data (measured on ../shared/data and the vendors'
# specs) and far below what hurts a laptop.
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
_READ = MiB  # bytes per read of a stream


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


def file_time(path: Path) -> dt.datetime:
    """The file's modification time (UTC, µs): the ``received_ts`` of its rows quarantined for their time. A
    file says when it was last written, the latest its rows were in hand; and it is the same on every run, so
    the quarantine's keys are. An implausible mtime (a tarball's 1970) becomes ``book.EARLIEST``."""
    try:
        us = int(path.stat().st_mtime_ns // 1000)
    except OSError:
        us = 0
    if not plausible_us(np.array([us]))[0]:
        return EARLIEST
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


# ---- bounded reading -------------------------------------------------------------------------------------------
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_UNSUPPORTED = {b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip"}


class BoundedStream:
    """A file's bytes, decompressed when it is gzip or zstd (told by its first bytes, whatever its name), with
    the decompressed bytes counted: past the file's bound the read stops with a FileFormatError."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError as e:
            raise FileFormatError(f"{path.name}: cannot read it ({e.strerror or why(e)})") from None
        self.codec = next((c for m, c in _MAGIC.items() if head.startswith(m)), None)
        other = next((c for m, c in _UNSUPPORTED.items() if head.startswith(m)), None)
        if other:
            raise FileFormatError(f"{path.name}: compressed with {other}; backfill reads plain, gzip or zstd files")
        self.limit = (min(MAX_DECOMPRESSED_BYTES, max(DECOMPRESSED_FLOOR, MAX_COMPRESSION_RATIO * size))
                      if self.codec else None)
        self.count = 0
        try:
            self._fh: Any = (pa.CompressedInputStream(pa.OSFile(str(path)), self.codec) if self.codec
                             else open(path, "rb"))  # noqa: SIM115 - closed in close()
        except (OSError, pa.ArrowException) as e:
            raise FileFormatError(f"{path.name}: cannot read it ({why(e)})") from None

    def read(self, n: int = _READ) -> bytes:
        try:
            data = self._fh.read(n)
        except (OSError, pa.ArrowException, EOFError) as e:
            raise FileFormatError(f"{self.name}: cannot read the {self.codec or 'file'} stream after "
                                  f"{self.count:,} bytes ({why(e)})") from None
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise FileFormatError(
                f"{self.name}: decompresses to more than {self.limit:,} bytes (MAX_COMPRESSION_RATIO "
                f"{MAX_COMPRESSION_RATIO}x its size, at least {DECOMPRESSED_FLOOR:,}, at most "
                f"{MAX_DECOMPRESSED_BYTES:,}): a compression bomb or not a recording; decompress it yourself "
                "to read it")
        return bytes(data)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BoundedStream:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()


def line_chunks(stream: BinaryIO | BoundedStream, name: str) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, complete lines without their newline) as the stream is read. A line longer
    than MAX_LINE_BYTES stops the read before more of it is held."""
    pending = b""
    done = 0  # lines yielded so far
    while True:
        chunk = stream.read(_READ)
        if not chunk:
            break
        parts = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
        pending = parts.pop()
        if parts and max(map(len, parts)) > MAX_LINE_BYTES:
            i = next(i for i, p in enumerate(parts) if len(p) > MAX_LINE_BYTES)
            _too_long(name, done + i + 1)
        if len(pending) > MAX_LINE_BYTES:
            _too_long(name, done + len(parts) + 1)
        if parts:
            yield done + 1, parts
            done += len(parts)
    if pending:
        yield done + 1, [pending]


def _too_long(name: str, line: int) -> None:
    raise FileFormatError(f"{name} line {line}: longer than {MAX_LINE_BYTES:,} bytes (MAX_LINE_BYTES): not a "
                          "recording this reader knows")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a plain, gzip or zstd text file, bounded (see ``line_chunks``)."""
    with BoundedStream(path) as fh:
        for first, parts in line_chunks(fh, path.name):
            for i, line in enumerate(parts):
                yield first + i, line


# ---- batches ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    raw: pa.Table  # shaped rows (validation judges the book and the times)
    rejected: pa.Table  # QUARANTINE_SCHEMA rows the reader rejected itself (unreadable or implausible time, gaps)
    origin: pa.Array | None = None  # per raw row: where it came from (kept on the row if validation rejects it)
    loaded_ts: dt.datetime | None = None  # received_ts of raw rows validation rejects for their time


def rejected_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA) if rows else QUARANTINE_SCHEMA.empty_table()


def take_batch(quotes: list[BookQuote], origins: list[str], rejected: list[dict[str, Any]],
               loaded: dt.datetime | None) -> Batch:
    """The streaming readers' pending books, their origins and rejected rows as one Batch; the lists are emptied
    for the next one."""
    b = Batch(table_from_quotes(quotes), rejected_table(rejected), pa.array(origins, pa.string()), loaded)
    quotes.clear()
    origins.clear()
    rejected.clear()
    return b


# ---- wide ------------------------------------------------------------------------------------------------------
def _ns_per_unit(v: np.ndarray) -> np.ndarray:
    """Nanoseconds per unit of each epoch number, the unit decided per value by magnitude (s, ms, us, ns):
    a column may mix seconds and milliseconds."""
    a = np.abs(v)
    return np.where(a < 1e11, 10**9, np.where(a < 1e14, 10**6, np.where(a < 1e17, 10**3, 1))).astype("int64")


TOO_LATE = pd.Timestamp("2262-01-01", tz="UTC")  # beyond int64 nanoseconds: implausible by definition
_EARLIEST = pd.Timestamp(EARLIEST)
_AHEAD = pd.Timedelta(AHEAD)


def parse_ts(col: pd.Series, now: pd.Timestamp | None = None) -> tuple[pa.Array, np.ndarray]:
    """ISO-8601 strings or epoch numbers (s, ms, us or ns, per value) to ``timestamp[us, UTC]``, with a
    reason per row: None, ``unparseable_time`` or ``implausible_time`` (outside ``book.EARLIEST`` .. a day
    ahead of ``now``); the time of a rejected row is NULL."""
    now = now or pd.Timestamp.now(tz="UTC")
    n = len(col)
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = pd.to_datetime(col, utc=True)
    else:
        num = pd.to_numeric(col, errors="coerce") if not pd.api.types.is_numeric_dtype(col) else col
        is_num = num.notna().to_numpy()
        ts = pd.Series(pd.NaT, index=col.index, dtype="datetime64[ns, UTC]")
        if is_num.any():
            # Integers stay integers: float64 cannot hold epoch nanoseconds exactly.
            dtype = "int64" if pd.api.types.is_integer_dtype(num) else "float64"
            v = num[is_num].to_numpy(dtype=dtype)
            mult = _ns_per_unit(v)
            fits = np.isfinite(v) & (np.abs(v.astype("float64") * mult) < 9.2e18)
            idx = np.flatnonzero(is_num)
            ts.iloc[idx[fits]] = pd.to_datetime((v[fits] * mult[fits]).astype("int64"), utc=True)
            ts.iloc[idx[~fits & np.isfinite(v)]] = TOO_LATE
        text = ~is_num & col.notna().to_numpy()
        if text.any():
            # "mixed", not "ISO8601": with ISO8601 pandas applies one row's offset to naive rows after it. A
            # year-0001 or year-9999 text time is out of pandas' nanosecond range: it reads as TOO_LATE/EARLY.
            parsed = pd.to_datetime(col[text].astype(str), utc=True, errors="coerce", format="mixed")
            ts[text] = parsed
            unread = np.flatnonzero(text & ts.isna().to_numpy())
            if len(unread):
                stand_in = [_out_of_range(s) for s in col.iloc[unread].astype(str)]
                found = [i for i, v in enumerate(stand_in) if v is not None]
                if found:
                    ts.iloc[unread[found]] = [stand_in[i] for i in found]
    reason = np.full(n, None, dtype=object)
    missing = ts.isna().to_numpy()
    reason[missing] = "unparseable_time"
    implausible = ~missing & ((ts < _EARLIEST) | (ts > now + _AHEAD)).to_numpy()
    reason[implausible] = "implausible_time"
    ts = ts.where(~implausible)
    return pa.array(ts.dt.floor("us"), TS_TYPE, from_pandas=True), reason


_TOO_EARLY = pd.Timestamp("1677-09-22", tz="UTC")


def _out_of_range(s: str) -> pd.Timestamp | None:
    """A time text pandas cannot hold in nanoseconds (year 0001, 9999) that is still a time: a stand-in on the
    same side of the plausible range, so it is quarantined as implausible rather than unparseable."""
    try:
        t = dt.datetime.fromisoformat(s.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return _TOO_EARLY if t.year < 1678 else TOO_LATE if t.year >= 2262 else None


def _csv_header(line: bytes, name: str) -> list[str]:
    try:
        names = next(csv.reader([line.decode("utf-8-sig").rstrip("\r")]))
    except (UnicodeDecodeError, csv.Error, StopIteration) as e:
        raise FileFormatError(f"{name} line 1: not a CSV header ({why(e)})") from None
    if any(len(n.encode()) > MAX_FIELD_BYTES for n in names):
        raise FileFormatError(f"{name} line 1: a column name longer than {MAX_FIELD_BYTES:,} bytes (MAX_FIELD_BYTES)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FileFormatError(f"{name} line 1: column(s) named twice: {', '.join(snippet(d) for d in dup[:5])}")
    return names


def _parse_csv(names: list[str], lines: list[bytes], nos: list[int], name: str) -> pa.Table:
    """Lines of one CSV (each <= MAX_LINE_BYTES) as a table of strings; a malformed line is named."""
    data = b"\n".join(lines)
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, block_size=MAX_LINE_BYTES + 1),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                                 strings_can_be_null=True))
    except pa.ArrowException as e:
        for line, no in zip(lines, nos, strict=True):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise FileFormatError(f"{name} line {no}: not UTF-8 text") from None
            try:
                fields = next(csv.reader([text.rstrip("\r")]))
            except csv.Error as ce:
                raise FileFormatError(f"{name} line {no}: not a CSV row ({why(ce)})") from None
            if len(fields) != len(names):
                raise FileFormatError(f"{name} line {no}: {len(fields)} fields where the header has "
                                      f"{len(names)}") from None
        raise FileFormatError(f"{name}: cannot read it as CSV ({why(e)})") from None


def _check_fields(t: pa.Table, cols: list[str], where: Callable[[int], str]) -> None:
    for c in cols:
        lengths = pc.binary_length(t.column(c).cast(pa.string()))
        top = pc.max(lengths).as_py()
        if top is not None and top > MAX_FIELD_BYTES:
            i = int(np.argmax(pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False) > MAX_FIELD_BYTES))
            raise FileFormatError(f"{where(i)}: field {snippet(c)} is longer than {MAX_FIELD_BYTES:,} bytes "
                                  "(MAX_FIELD_BYTES)")


def _used(names: list[str]) -> list[str]:
    return [c for c in names if c in ("symbol", "ts", "halted") or c in LEVEL_COLUMNS]


def positions(name: str, unit: str, nos: np.ndarray) -> pa.Array:
    """``<name> <unit> <n>`` per number, built in Arrow (a million origins cost milliseconds, not seconds)."""
    return pc.binary_join_element_wise(f"{name} {unit} ", pc.cast(pa.array(nos, pa.int64()), pa.string()), "")


Frame = tuple[list[str], pa.Table, pa.Array]  # all column names, the used columns, origin per row


def _csv_frames(path: Path) -> Iterator[Frame]:
    """The used columns as text, in batches of exactly BATCH_ROWS rows (fewer when the rows are long: at most
    BATCH_BYTES of text), so a failure can name exactly what was kept before it."""
    names: list[str] | None = None
    buf: list[bytes] = []
    nos: list[np.ndarray] = []
    held = 0  # bytes in buf

    def frame() -> Frame:
        assert names is not None
        line_nos = np.concatenate(nos)
        t = _parse_csv(names, buf, line_nos.tolist(), path.name)
        used = _used(names)
        _check_fields(t, used, lambda i: f"{path.name} line {line_nos[i]}")
        buf.clear()
        nos.clear()
        return names, t.select(used), positions(path.name, "line", line_nos)

    with BoundedStream(path) as fh:
        for first, parts in line_chunks(fh, path.name):
            start = 0
            if names is None:  # the header: the first line that is not blank
                while start < len(parts) and not parts[start].strip(b"\r\n\t \xef\xbb\xbf"):
                    start += 1
                if start == len(parts):
                    continue
                names = _csv_header(parts[start], path.name)
                start += 1
            lines = parts[start:]
            if b"" in lines or b"\r" in lines:  # blank lines are skipped, their numbers kept for the others
                keep = [i for i, ln in enumerate(lines) if ln and ln != b"\r"]
                lines = [lines[i] for i in keep]
                line_nos = first + start + np.array(keep, dtype=np.int64)
            else:
                line_nos = np.arange(first + start, first + start + len(lines), dtype=np.int64)
            sizes = np.cumsum(np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)))
            at = 0
            while at < len(lines):
                room = BATCH_ROWS - len(buf)
                # How many lines fit: the row room, and the byte room (at least one line, or nothing moves).
                base = sizes[at - 1] if at else 0
                by_bytes = int(np.searchsorted(sizes, base + BATCH_BYTES - held, side="right")) - at
                take = max(1, min(room, by_bytes, len(lines) - at))
                buf.extend(lines[at:at + take])
                nos.append(line_nos[at:at + take])
                held += int(sizes[at + take - 1] - base)
                at += take
                if len(buf) >= BATCH_ROWS or held >= BATCH_BYTES:
                    yield frame()
                    held = 0
    if names is None:
        raise FileFormatError(f"{path.name}: the file is empty")
    if buf:
        yield frame()


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise FileFormatError(f"{path.name}: not a readable Parquet file ({why(e)})") from None
    md = pf.metadata
    for i in range(md.num_row_groups):
        size = md.row_group(i).total_byte_size
        if size > MAX_ROW_GROUP_BYTES:
            raise FileFormatError(f"{path.name}: row group {i} holds {size:,} bytes uncompressed, more than "
                                  f"{MAX_ROW_GROUP_BYTES:,} (MAX_ROW_GROUP_BYTES); rewrite it with smaller row groups")
    return pf


def _parquet_batches(path: Path, pf: pq.ParquetFile, columns: list[str]) -> Iterator[tuple[pa.Table, pa.Array]]:
    """(batch, origin per row: ``<file> row <n>``) of the columns asked for, never the whole file."""
    row = 0
    try:
        for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            where = positions(path.name, "row", np.arange(row + 1, row + b.num_rows + 1))
            row += b.num_rows
            yield pa.Table.from_batches([b]), where
    except (pa.ArrowException, OSError) as e:
        raise FileFormatError(f"{path.name} after row {row:,}: cannot read it ({why(e)})") from None


def _frames(path: Path) -> Iterator[Frame]:
    """The file in batches of about BATCH_ROWS rows, never whole."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        pf = _parquet(path)
        names = pf.schema_arrow.names
        strings = [c for c in _used(names) if pa.types.is_string(pf.schema_arrow.field(c).type)
                   or pa.types.is_large_string(pf.schema_arrow.field(c).type)]
        for t, where in _parquet_batches(path, pf, _used(names)):
            _check_fields(t, strings, lambda i, where=where: where[i].as_py())
            yield names, t, where
        return
    if suffix in (".csv", ".gz", ".txt", ".zst"):
        yield from _csv_frames(path)
        return
    raise FileFormatError(f"{path.name}: expected .csv (optionally .gz / .zst) or .parquet")


_TRUE = {"true", "t", "1", "yes", "y"}
_FALSE = {"false", "f", "0", "no", "n"}
# A number as text (what pandas' to_numeric reads): anything else in a level column is a missing value, and the
# book is then judged by validation (an incomplete level), never the whole file refused.
_NUMBER = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$"


def _floats(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return col.cast(pa.float64())
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    ok = pc.match_substring_regex(text, _NUMBER, ignore_case=True)
    return pc.if_else(ok, text, pa.scalar(None, pa.string())).cast(pa.float64())


def _bools(col: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_boolean(col.type):
        return col.combine_chunks()
    low = [None if v is None else str(v).strip().lower() for v in col.to_pylist()]
    return pa.array([True if v in _TRUE else False if v in _FALSE else None for v in low], pa.bool_())


def read_wide(path: Path, symbol: str | None = None, source: str = "wide") -> Iterator[Batch]:
    """Wide rows in batches; rows with an unreadable or implausible time go to quarantine with the raw value."""
    first = True
    loaded = file_time(path)
    for names, t, origin in _frames(path):
        if first:
            _check_columns(path, names, symbol)
            first = False
        ts_col = t.column("ts").to_pandas()
        if pd.api.types.is_string_dtype(ts_col) or ts_col.dtype == object:
            # A text column that is all numbers is epoch time.
            as_num = pd.to_numeric(ts_col, errors="coerce")
            if as_num.notna().sum() == ts_col.notna().sum():
                ts_col = as_num
        ts, why_ = parse_ts(ts_col)
        cols: dict[str, object] = {
            "symbol": pa.array([symbol] * t.num_rows, pa.string()) if symbol else t.column("symbol").cast(pa.string()),
            "event_ts": ts, "received_ts": ts, "source": [source] * t.num_rows,
        }
        if "halted" in t.column_names:
            cols["halted"] = _bools(t.column("halted"))
        for c in (c for c in t.column_names if c in LEVEL_COLUMNS):
            cols[c] = _floats(t.column(c)).combine_chunks()
        raw = raw_table({k: v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v for k, v in cols.items()})
        bad = np.array([r is not None for r in why_], dtype=bool)
        rejected = QUARANTINE_SCHEMA.empty_table()
        if bad.any():
            mask = pa.array(bad)
            q = raw.filter(mask)
            # received_ts: the file's time, the same on every run (a re-run finds the same quarantine keys).
            now = pa.array([loaded] * q.num_rows, TS_TYPE)
            q = q.set_column(q.schema.get_field_index("received_ts"), "received_ts", now)
            q = q.append_column("reason", pa.array(list(why_[bad]), pa.string()))
            q = q.append_column("detail", pa.array([f"ts={v!r}" if isinstance(v, str) else f"ts={v}"
                                                      for v in ts_col.to_numpy()[bad]], pa.string()))
            q = q.append_column("origin", origin.filter(mask))
            rejected = q.cast(QUARANTINE_SCHEMA)
        keep = pa.array(~bad)
        yield Batch(raw.filter(keep), rejected, origin.filter(keep), loaded)
    if first:
        raise FileFormatError(f"{path.name}: the file has no rows")


def _check_columns(path: Path, names: list[str], symbol: str | None) -> None:
    missing = [c for c in ("ts",) + (() if symbol else ("symbol",)) if c not in names]
    if missing:
        raise FileFormatError(f"{path.name}: missing column(s) {missing}; a wide file has symbol, ts, "
                              "bid_px_1.., bid_sz_1.., ask_px_1.., ask_sz_1..")
    levels = [c for c in names if c in LEVEL_COLUMNS]
    if not levels:
        raise FileFormatError(f"{path.name}: no level columns (bid_px_1 .. ask_sz_{MAX_LEVELS})")
    extra = [c for c in names if c.startswith(("bid_", "ask_")) and c not in LEVEL_COLUMNS]
    if extra:
        raise FileFormatError(f"{path.name}: unexpected column(s) {[snippet(c, 20) for c in extra[:5]]} "
                              f"(at most {MAX_LEVELS} levels)")


# ---- our own snapshots -----------------------------------------------------------------------------------------
def read_snapshot_file(path: Path) -> Iterator[Batch]:
    """Our own snapshot Parquet (``lake/snapshots`` files, or exports of them), re-validated on the way in (an
    implausible time included), in batches."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    files = [f for f in files if "_schema" not in f.parts and not f.name.startswith(".")]
    if not files:
        raise FileFormatError(f"no .parquet files under {path}")
    for f in files:
        pf = _parquet(f)
        names = pf.schema_arrow.names
        missing = [c for c in ("symbol", "event_ts", "received_ts", "source") if c not in names]
        if missing:
            raise FileFormatError(f"{f.name}: not a snapshot file (missing {missing})")
        loaded = file_time(f)
        columns = [c for c in names if c in RAW_SCHEMA.names]
        strings = [c for c in ("symbol", "source") if pa.types.is_string(pf.schema_arrow.field(c).type)]
        for t, where in _parquet_batches(f, pf, columns):
            _check_fields(t, strings, lambda i, where=where: where[i].as_py())
            try:
                raw = raw_table({c: t.column(c).combine_chunks() for c in t.column_names})
            except (pa.ArrowException, ValueError) as e:
                raise FileFormatError(f"{f.name}: columns are not the snapshot schema's ({why(e)})") from None
            yield Batch(raw, QUARANTINE_SCHEMA.empty_table(), where, loaded)
