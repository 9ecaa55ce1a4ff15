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
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from rich.text import Text

_T = TypeVar("_T")


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


def text(s: object) -> Text:
    """``s`` as a ``rich.text.Text`` of its visible characters: Rich never parses a Text for markup
    (``[/x]`` crashes a markup parse, ``[link=...]`` makes a hyperlink), emoji codes or highlighting."""
    from rich.text import Text

    return Text(visible(str(s)))


# Spreadsheet formula injection: Excel, LibreOffice and Google Sheets run a cell that starts with one of these as
# a formula (``=HYPERLINK(...)``, ``@SUM(...)``, DDE via ``=cmd|...``); tab and CR are in OWASP's list because
# some importers strip them and then see the next character. A leading ``'`` makes the cell text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_RE = "^[=+\\-@\t\r]"


def csv_text(v: _T) -> _T | str:
    """One CSV cell value: a string that a spreadsheet would run as a formula gets a leading ``'``; numbers
    (a negative price included) and everything else are unchanged."""
    return "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
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


def csv_table(table: pa.Table) -> pa.Table:
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
