"""Times in a recorded table: ISO-8601 text (naive = UTC) or epoch seconds, ms, us or ns, told apart by magnitude
per value. A time that cannot be read is ``unparseable_time``; one outside the plausible range (``book.EARLIEST``
.. a day ahead of the clock) is ``implausible_time``.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa

from microstructure.contract.book import AHEAD, EARLIEST, TS_TYPE


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
