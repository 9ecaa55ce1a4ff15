"""Recorded files for backfill: our own snapshot Parquet, and wide tables (CSV or Parquet).

Wide table columns: ``symbol, ts, bid_px_1..N, bid_sz_1..N, ask_px_1..N, ask_sz_1..N`` with N <= 10 (a
missing level column is a missing level). ``ts`` is ISO-8601 (naive = UTC) or epoch seconds, ms, us or ns,
told apart by magnitude. The recorded time is both ``event_ts`` and ``received_ts``: a file does not say
when it was received, and using the book's own time keeps point-in-time joins honest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from microstructure.book import LEVEL_COLUMNS, MAX_LEVELS, RAW_SCHEMA, TS_TYPE, raw_table


class FileFormatError(ValueError):
    """The file is not in the format asked for; the message says what is wrong."""


def _read_frame(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.read_table(path).to_pandas()
    if path.suffix.lower() in (".csv", ".gz", ".txt"):
        return pd.read_csv(path)
    raise FileFormatError(f"{path.name}: expected .csv or .parquet")


def parse_ts(col: pd.Series) -> pa.Array:
    """ISO-8601 strings or epoch numbers to ``timestamp[us, UTC]``; a value that cannot be read is NULL
    (validation quarantines the row as ``missing_key``)."""
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = pd.to_datetime(col, utc=True)
    elif pd.api.types.is_numeric_dtype(col):
        mag = np.nanmedian(np.abs(col.to_numpy(dtype="float64"))) if len(col) else 0
        unit = "s" if mag < 1e11 else "ms" if mag < 1e14 else "us" if mag < 1e17 else "ns"
        # Integers stay integers: float64 cannot hold epoch nanoseconds exactly.
        v = col if pd.api.types.is_integer_dtype(col) else col.astype("float64")
        ts = pd.to_datetime(v, unit=unit, utc=True, errors="coerce")
    else:
        # "mixed", not "ISO8601": with ISO8601 pandas applies one row's offset to naive rows after it.
        ts = pd.to_datetime(col, utc=True, errors="coerce", format="mixed")
    return pa.array(ts.dt.floor("us"), TS_TYPE, from_pandas=True)


def read_wide(path: Path, symbol: str | None = None, source: str = "wide") -> pa.Table:
    df = _read_frame(path)
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
    ts = parse_ts(df["ts"])
    cols: dict[str, object] = {
        "symbol": pa.array([symbol] * len(df) if symbol else df["symbol"].astype("string"), pa.string()),
        "event_ts": ts, "received_ts": ts, "source": [source] * len(df),
    }
    if "halted" in df.columns:
        cols["halted"] = pa.array(df["halted"], pa.bool_(), from_pandas=True)
    for c in levels:
        cols[c] = pa.array(pd.to_numeric(df[c], errors="coerce"), pa.float64(), from_pandas=True)
    return raw_table(cols)


def read_snapshot_file(path: Path) -> pa.Table:
    """Our own snapshot Parquet (``lake/snapshots`` files, or exports of them), re-validated on the way in."""
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileFormatError(f"no .parquet files under {path}")
        return pa.concat_tables([read_snapshot_file(f) for f in files])
    t = pq.read_table(path)
    missing = [c for c in ("symbol", "event_ts", "received_ts", "source") if c not in t.column_names]
    if missing:
        raise FileFormatError(f"{path.name}: not a snapshot file (missing {missing})")
    return raw_table({c: t.column(c).combine_chunks() for c in t.column_names if c in RAW_SCHEMA.names})
