"""How results leave the program: strict JSON and tables a person can read at 80 columns.

Strict JSON: NaN and infinities become ``null`` (``json.dumps`` would print bare ``NaN``, which is not JSON),
timestamps are ISO-8601 with microseconds (``event_ts`` is part of a key), numpy and pandas scalars become
plain numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any


def plain(v: Any) -> Any:
    """``v`` with every value JSON can hold exactly as itself (recursively)."""
    import numpy as np
    import pandas as pd

    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return [plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NaT:
        return None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, pd.Timestamp):
        v = v.to_pydatetime()
    if isinstance(v, dt.datetime):
        return v.isoformat(timespec="microseconds")
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, bool | int | str):
        return v
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(plain(obj), indent=indent, allow_nan=False)


def number(v: float | int) -> str:
    """A number at its full precision, with thousands separators: bid 328.29 and ask 328.3 stay apart,
    1234567.5 reads 1,234,567.5. Fifteen significant digits: every decimal a vendor sends (≤ 15 digits)
    reads back exactly, and arithmetic noise (27491.699999999997 for a sum of px × size) does not show."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    text = format(float(v), ".15g")
    if "e" in text or "E" in text:
        return text
    whole, _, frac = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    whole = f"{int(whole.lstrip('-')):,}"
    return f"{sign}{whole}" + (f".{frac}" if frac.strip("0") else "")


def cell(v: Any) -> str:
    import numpy as np

    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return number(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ", timespec="microseconds")
    if isinstance(v, dict):
        return ", ".join(f"{k} {cell(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list | tuple):
        return ", ".join(cell(x) for x in v) or "-"
    return str(v)


def is_numeric(values: list[Any]) -> bool:
    import numpy as np

    seen = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return bool(seen) and all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in seen)


class InputError(ValueError):
    """A file or value the user gave cannot be used; the message says why in plain words (exit code 2)."""


def read_frame(path: Path, what: str) -> Any:
    """A CSV (optionally gzipped), JSON or Parquet file as a DataFrame, or InputError in plain words."""
    import gzip
    import zlib

    import pandas as pd
    import pyarrow as pa

    if not path.exists():
        raise InputError(f"no such {what} file: {path}")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif name.endswith((".json", ".json.gz")):
            df = pd.read_json(path)
        else:
            df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise InputError(f"{what} file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path} is not readable CSV: {str(e).splitlines()[0]}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise InputError(f"{what} file {path} is truncated or not what its name says ({type(e).__name__})") from None
    except (pa.ArrowInvalid, ValueError) as e:
        raise InputError(f"{what} file {path} cannot be read: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise InputError(f"{what} file {path} has no rows")
    return df
