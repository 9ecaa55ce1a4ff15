"""Recorded files for backfill: our own snapshot Parquet, and wide tables (CSV or Parquet).

Wide table columns: ``symbol, ts, bid_px_1..N, bid_sz_1..N, ask_px_1..N, ask_sz_1..N`` with N <= 10 (a
missing level column is a missing level). ``ts`` is ISO-8601 (naive = UTC) or epoch seconds, ms, us or ns,
told apart by magnitude per value. A row whose time cannot be read, or lies before 1990 or more than a day
ahead of the clock, is quarantined (``unparseable_time`` / ``implausible_time``) and the rest go in.
Files are read in batches, so a file of any size loads in bounded memory. The recorded time is both
``event_ts`` and ``received_ts``: a file does not say when it was received, and using the book's own time
keeps point-in-time joins honest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from microstructure.book import LEVEL_COLUMNS, MAX_LEVELS, QUARANTINE_SCHEMA, RAW_SCHEMA, TS_TYPE, raw_table


class FileFormatError(ValueError):
    """The file is not in the format asked for; the message says what is wrong."""


# A recorded book from before this, or more than a day ahead of the clock, is a broken timestamp.
EARLIEST = pd.Timestamp("1990-01-01", tz="UTC")
AHEAD = pd.Timedelta(days=1)
BATCH_ROWS = 100_000


@dataclass
class Batch:
    raw: pa.Table  # shaped rows, timestamps plausible (validation judges the book)
    rejected: pa.Table  # QUARANTINE_SCHEMA rows whose time could not be read or is implausible


def _ns_per_unit(v: np.ndarray) -> np.ndarray:
    """Nanoseconds per unit of each epoch number, the unit decided per value by magnitude (s, ms, us, ns):
    a column may mix seconds and milliseconds."""
    a = np.abs(v)
    return np.where(a < 1e11, 10**9, np.where(a < 1e14, 10**6, np.where(a < 1e17, 10**3, 1))).astype("int64")


TOO_LATE = pd.Timestamp("2262-01-01", tz="UTC")  # beyond int64 nanoseconds: implausible by definition


def parse_ts(col: pd.Series, now: pd.Timestamp | None = None) -> tuple[pa.Array, np.ndarray]:
    """ISO-8601 strings or epoch numbers (s, ms, us or ns, per value) to ``timestamp[us, UTC]``, with a
    reason per row: None, ``unparseable_time`` or ``implausible_time`` (before 1990, or more than a day
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
            # "mixed", not "ISO8601": with ISO8601 pandas applies one row's offset to naive rows after it.
            ts[text] = pd.to_datetime(col[text].astype(str), utc=True, errors="coerce", format="mixed")
    reason = np.full(n, None, dtype=object)
    missing = ts.isna().to_numpy()
    reason[missing] = "unparseable_time"
    implausible = ~missing & ((ts < EARLIEST) | (ts > now + AHEAD)).to_numpy()
    reason[implausible] = "implausible_time"
    ts = ts.where(~implausible)
    return pa.array(ts.dt.floor("us"), TS_TYPE, from_pandas=True), reason


def _frames(path: Path) -> Iterator[pd.DataFrame]:
    """The file in batches of about BATCH_ROWS rows: never the whole file in memory."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            pf = pq.ParquetFile(path)
        except pa.ArrowInvalid as e:
            raise FileFormatError(f"{path.name}: not a readable Parquet file ({e})") from None
        for b in pf.iter_batches(batch_size=BATCH_ROWS):
            yield b.to_pandas()
        return
    if suffix in (".csv", ".gz", ".txt"):
        # ts is read as text: pandas would otherwise turn a column mixing numbers and words into floats.
        try:
            reader = pd.read_csv(path, chunksize=BATCH_ROWS, dtype={"ts": "string", "symbol": "string"})
            yield from reader
        except (pd.errors.EmptyDataError, pd.errors.ParserError, EOFError, OSError, UnicodeDecodeError) as e:
            raise FileFormatError(f"{path.name}: cannot read it as CSV ({type(e).__name__}: {e})") from None
        return
    raise FileFormatError(f"{path.name}: expected .csv or .parquet")


def read_wide(path: Path, symbol: str | None = None, source: str = "wide") -> Iterator[Batch]:
    """Wide rows in batches; rows with an unreadable or implausible time go to quarantine with the raw value."""
    first = True
    for df in _frames(path):
        if first:
            _check_columns(path, df, symbol)
            first = False
        if "ts" in df.columns and pd.api.types.is_string_dtype(df["ts"]):
            # A text column that is all numbers is epoch time.
            as_num = pd.to_numeric(df["ts"], errors="coerce")
            if as_num.notna().sum() == df["ts"].notna().sum():
                df["ts"] = as_num
        ts, why = parse_ts(df["ts"])
        cols: dict[str, object] = {
            "symbol": pa.array([symbol] * len(df) if symbol else df["symbol"].astype("string"), pa.string()),
            "event_ts": ts, "received_ts": ts, "source": [source] * len(df),
        }
        if "halted" in df.columns:
            cols["halted"] = pa.array(df["halted"], pa.bool_(), from_pandas=True)
        for c in (c for c in df.columns if c in LEVEL_COLUMNS):
            cols[c] = pa.array(pd.to_numeric(df[c], errors="coerce"), pa.float64(), from_pandas=True)
        raw = raw_table(cols)
        bad = np.array([r is not None for r in why], dtype=bool)
        rejected = QUARANTINE_SCHEMA.empty_table()
        if bad.any():
            q = raw.filter(pa.array(bad))
            # We really had these rows now: received_ts is the load time (the quarantine's date partition).
            now = pa.array([pd.Timestamp.now(tz="UTC")] * q.num_rows, TS_TYPE)
            q = q.set_column(q.schema.get_field_index("received_ts"), "received_ts", now)
            q = q.append_column("reason", pa.array(list(why[bad]), pa.string()))
            q = q.append_column("detail", pa.array([f"ts={v!r}" for v in df["ts"].to_numpy()[bad]], pa.string()))
            rejected = q.cast(QUARANTINE_SCHEMA)
        yield Batch(raw.filter(pa.array(~bad)), rejected)
    if first:
        raise FileFormatError(f"{path.name}: the file is empty")


def _check_columns(path: Path, df: pd.DataFrame, symbol: str | None) -> None:
    missing = [c for c in ("ts",) + (() if symbol else ("symbol",)) if c not in df.columns]
    if missing:
        raise FileFormatError(f"{path.name}: missing column(s) {missing}; a wide file has symbol, ts, "
                              "bid_px_1.., bid_sz_1.., ask_px_1.., ask_sz_1..")
    levels = [c for c in df.columns if c in LEVEL_COLUMNS]
    if not levels:
        raise FileFormatError(f"{path.name}: no level columns (bid_px_1 .. ask_sz_{MAX_LEVELS})")
    extra = [c for c in df.columns if c.startswith(("bid_", "ask_")) and c not in LEVEL_COLUMNS]
    if extra:
        raise FileFormatError(f"{path.name}: unexpected column(s) {extra[:5]} (at most {MAX_LEVELS} levels)")


def read_snapshot_file(path: Path) -> Iterator[Batch]:
    """Our own snapshot Parquet (``lake/snapshots`` files, or exports of them), re-validated on the way in,
    in batches."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileFormatError(f"no .parquet files under {path}")
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise FileFormatError(f"{f.name}: not a readable Parquet file ({e})") from None
        missing = [c for c in ("symbol", "event_ts", "received_ts", "source") if c not in pf.schema_arrow.names]
        if missing:
            raise FileFormatError(f"{f.name}: not a snapshot file (missing {missing})")
        for b in pf.iter_batches(batch_size=BATCH_ROWS):
            t = pa.Table.from_batches([b])
            yield Batch(raw_table({c: t.column(c).combine_chunks() for c in t.column_names if c in RAW_SCHEMA.names}),
                        QUARANTINE_SCHEMA.empty_table())
