"""Wide tables (CSV or Parquet) of books, one row a book, read in batches.

Columns: ``symbol, ts, bid_px_1..N, bid_sz_1..N, ask_px_1..N, ask_sz_1..N`` with N <= 10 (a missing level column
is a missing level). ``ts`` is read by ``recorded.timestamps``: a row whose time cannot be read, or lies outside
the plausible range, is quarantined (``unparseable_time`` / ``implausible_time``) and the rest go in. Files are
read in batches, so a file of any size loads in bounded memory. The recorded time is both ``event_ts`` and
``received_ts``: a file does not say when it was received, and using the book's own time keeps point-in-time
joins honest.

A CSV row is one line (a quoted newline is not supported: it ends the row, as in pyarrow's default). Every
rejected row carries its ``origin`` (``<file> line 12``, ``<file> row 12`` for Parquet) and, when its time is
what is wrong, the file's modification time as ``received_ts`` (see ``recorded.batch``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from microstructure.contract.book import LEVEL_COLUMNS, MAX_LEVELS, QUARANTINE_SCHEMA, TS_TYPE, raw_table
from microstructure.recorded.batch import Batch, file_time, origin_at, positions
from microstructure.recorded.bounds import (
    BATCH_BYTES,
    BATCH_ROWS,
    MAX_FIELD_BYTES,
    MAX_LINE_BYTES,
    FileFormatError,
    check_fields,
    snippet,
    why,
)
from microstructure.recorded.streams import BoundedStream, line_chunks, open_parquet, parquet_batches
from microstructure.recorded.timestamps import parse_ts


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



def _used(names: list[str]) -> list[str]:
    return [c for c in names if c in ("symbol", "ts", "halted") or c in LEVEL_COLUMNS]



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
        check_fields(t, used, lambda i: f"{path.name} line {line_nos[i]}")
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



def _frames(path: Path) -> Iterator[Frame]:
    """The file in batches of about BATCH_ROWS rows, never whole."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        pf = open_parquet(path)
        names = pf.schema_arrow.names
        strings = [c for c in _used(names) if pa.types.is_string(pf.schema_arrow.field(c).type)
                   or pa.types.is_large_string(pf.schema_arrow.field(c).type)]
        for t, where in parquet_batches(path, pf, _used(names)):
            check_fields(t, strings, origin_at(where))
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

