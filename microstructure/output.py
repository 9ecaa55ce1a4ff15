"""How results leave the program: strict JSON and tables a person can read at 80 columns.

Strict JSON: NaN and infinities become ``null`` (``json.dumps`` would print bare ``NaN``, which is not JSON),
timestamps are ISO-8601 with microseconds (``event_ts`` is part of a key), numpy and pandas scalars become
plain numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
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
    """``v`` as the text of a table cell, shown as data: control characters escaped (``visible``). The caller
    renders it as ``rich.text.Text``, never as markup."""
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
        return ", ".join(f"{visible(str(k))} {cell(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list | tuple):
        return ", ".join(cell(x) for x in v) or "-"
    return visible(str(v))


# What a terminal acts on instead of showing: C0 and C1 controls (ESC starts a terminal command: clear the
# screen, set the title, a hyperlink), DEL, line and paragraph separators, and the bidirectional overrides and
# isolates that reorder what a line appears to say ("Trojan Source"). Shown as Python-style escapes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def visible(s: str) -> str:
    """``s`` with every control character shown as its escape: ESC as the four characters ``\\x1b``, a
    newline as ``\\n``. Printed data can then neither drive the terminal nor fake a line of output."""
    return _CONTROL.sub(_escaped, s)


def text(s: Any) -> Any:
    """``s`` as a ``rich.text.Text`` of its visible characters: Rich never parses a Text for markup
    (``[/x]`` crashes a markup parse, ``[link=...]`` makes a hyperlink), emoji codes or highlighting."""
    from rich.text import Text

    return Text(visible(str(s)))


# Spreadsheet formula injection: Excel, LibreOffice and Google Sheets run a cell that starts with one of these as
# a formula (``=HYPERLINK(...)``, ``@SUM(...)``, DDE via ``=cmd|...``); tab and CR are in OWASP's list because
# some importers strip them and then see the next character. A leading ``'`` makes the cell text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_RE = "^[=+\\-@\t\r]"


def csv_text(v: Any) -> Any:
    """One CSV cell value: a string that a spreadsheet would run as a formula gets a leading ``'``; numbers
    (a negative price included) and everything else are unchanged."""
    return "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v


def csv_frame(df: Any) -> Any:
    """``df`` ready for ``to_csv``: text cells and column names guarded by ``csv_text``; numeric columns untouched
    (only text can be a formula, and -1.5 must stay a number)."""
    import pandas as pd

    out = df.rename(columns={c: csv_text(c) for c in df.columns if isinstance(c, str)})
    for c in out.columns:
        col = out[c]
        if not (pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col)):
            continue
        if pd.api.types.infer_dtype(col, skipna=True) == "string":  # the common case, vectorised
            bad = col.str.startswith(FORMULA_START, na=False).astype(bool)
        else:
            bad = pd.Series([isinstance(v, str) and v.startswith(FORMULA_START) for v in col], index=col.index)
        if bad.any():
            col = col.astype(object).copy()
            col[bad] = "'" + col[bad].astype(str)
            out[c] = col
    return out


def csv_table(table: Any) -> Any:
    """The Arrow form of ``csv_frame`` for batch writers: string columns guarded, column names too."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = []
    for col in table.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            bad = pc.fill_null(pc.match_substring_regex(col, _FORMULA_RE), False)
            if pc.any(bad).as_py():
                col = pc.if_else(bad, pc.binary_join_element_wise("'", col, ""), col)
        cols.append(col)
    return pa.table(cols, names=[csv_text(n) for n in table.column_names])


def is_numeric(values: list[Any]) -> bool:
    import numpy as np

    seen = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return bool(seen) and all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in seen)


class InputError(ValueError):
    """A file or value the user gave cannot be used; the message says why in plain words (exit code 2)."""


FRAME_MAX_ROWS = 1_000_000  # rows of a file read whole (picks and JSON entity files pass their own)
FRAME_MAX_BYTES = 256 << 20  # its size once decompressed
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


def _bounded_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """The file's bytes, decompressed (gzip, bz2, xz: told by their magic bytes, whatever the name) while
    counting: InputError as soon as they pass ``max_bytes``, so a small bomb never expands in memory."""
    import bz2
    import gzip
    import lzma

    with open(path, "rb") as fh:
        magic = fh.read(6)
    kind = next((k for m, k in _MAGIC.items() if magic.startswith(m)), None)
    if kind in ("zstd", "zip"):
        raise InputError(f"{what} file {path} is {kind}-compressed; use plain, gzip, bz2 or xz")
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(kind or "", open)
    chunks, size = [], 0
    with opener(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise InputError(f"{what} file {path} is larger than {max_bytes >> 20:,} MiB"
                                 f"{' decompressed' if kind else ''} (the cap for a {what} file)")
            chunks.append(chunk)
    return b"".join(chunks)


def read_frame(path: Path, what: str, max_rows: int = FRAME_MAX_ROWS, max_bytes: int = FRAME_MAX_BYTES) -> Any:
    """A CSV (optionally gzipped), JSON or Parquet file as a DataFrame, or InputError in plain words.

    Bounded before anything is parsed: at most ``max_bytes`` decompressed (counted while decompressing) and
    ``max_rows`` rows (lines counted in the bytes; a Parquet file's row count and size read from its footer)."""
    import io
    import lzma
    import zlib

    import pandas as pd
    import pyarrow as pa

    if not path.is_file():
        raise InputError(f"no such {what} file: {path}")
    name = path.name.lower()
    too_many = f"{what} file {path} has more than {max_rows:,} rows (the cap for a {what} file)"
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            if meta.num_rows > max_rows:
                raise InputError(too_many)
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if size > max_bytes:
                raise InputError(f"{what} file {path} holds {size >> 20:,} MiB of data; the cap for a {what} file "
                                 f"is {max_bytes >> 20:,} MiB")
            df = pd.read_parquet(path)
        else:
            data = _bounded_bytes(path, what, max_bytes)
            if name.endswith((".json", ".json.gz")):
                df = pd.read_json(io.BytesIO(data))
            else:
                # Lines bound the rows (a quoted field may hold a line break: counted as a row, on the safe side).
                if data.count(b"\n") - data.endswith(b"\n") > max_rows:
                    raise InputError(too_many)
                df = pd.read_csv(io.BytesIO(data))
            del data
    except pd.errors.EmptyDataError:
        raise InputError(f"{what} file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path} is not readable CSV: {str(e).splitlines()[0]}") from None
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        raise InputError(f"{what} file {path} is truncated or not what its name says ({type(e).__name__})") from None
    except (pa.ArrowInvalid, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{what} file {path} cannot be read: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise InputError(f"{what} file {path} has no rows")
    if len(df) > max_rows:
        raise InputError(too_many)
    return df
