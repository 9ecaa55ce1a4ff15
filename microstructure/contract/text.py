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
from collections.abc import Callable
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


# A person reads at most this many decimals. Seven and beyond are float noise (27491.699999999997 for a sum of
# px x size) or precision no reader acts on; --json and --csv keep every digit.
MAX_DECIMALS = 6


def _grouped(v: float, decimals: int, trim: bool = False) -> str:
    """``v`` with thousands separators and ``decimals`` decimals (trailing zeros dropped when ``trim``); a negative
    number that rounds to zero loses its sign (-0.0001 at 2 decimals reads 0.00, not -0.00)."""
    s = f"{v:,.{decimals}f}"
    if trim and "." in s:
        s = s.rstrip("0").rstrip(".")
    return s[1:] if s.startswith("-") and not s.strip("-0.,") else s


def number(v: float | int) -> str:
    """A number for a person, with thousands separators: 1234567.5 reads 1,234,567.5, bid 328.29 and ask 328.3 stay
    apart, at most ``MAX_DECIMALS`` decimals (27491.699999999997 reads 27,491.7). A non-zero number too small to
    show in six decimals keeps its magnitude in scientific notation (1.5e-09), never reads 0."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    v = float(v)
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v != 0 and abs(v) < 0.5 * 10**-MAX_DECIMALS:
        return f"{v:.2e}"
    return _grouped(v, MAX_DECIMALS, trim=True)


def price(v: float) -> str:
    """A price at its instrument's tick precision, derived from the price itself (the online row carries no tick
    size): at or above $1, cents (the US tick of $0.01 for stocks priced at $1 or more); below $1, the digits the
    price carries, at least 4 (the sub-dollar tick of $0.0001) and at most 6 (crypto quotes in fractions of a
    cent). Mid and microprice can fall between ticks; at the tick's precision they read as the book does."""
    if abs(v) >= 1:
        return _grouped(v, 2)
    s = _grouped(v, MAX_DECIMALS, trim=True)
    decimals = len(s.partition(".")[2])
    return _grouped(v, max(4, decimals))


# How a person reads a number of each unit: one rule per unit declared in transforms/features.sql (``unit=``;
# "none" for a feature declaring none: the imbalances, ratios in [-1, 1]) and for the CLI's own "s" (age). A
# column without a unit reads as ``number``.
UNIT_FORMATS: dict[str, Callable[[float], str]] = {
    "bps": lambda v: _grouped(v, 2),  # basis points: 2 decimals, as the reason texts say "146.5 bps"
    # The imbalances: 3 decimals of a ratio in [-1, 1]. A unitless integer (a count, an epoch) is no ratio.
    "none": lambda v: number(v) if isinstance(v, int) else _grouped(v, 3),
    "USD": lambda v: "$" + _grouped(v, 0) if v >= 0 else "-$" + _grouped(-v, 0),  # notional: whole dollars
    "USD/share": price,  # a price: its tick's precision
    "shares": number,  # whole shares, or fractions of a coin: as many decimals as it has (<= 6)
    "levels": number,
    "fraction": lambda v: _grouped(v * 100, 2) + "%",  # gap_pct 0.0123 reads 1.23%
    "s": lambda v: _grouped(v, 3),  # seconds to the millisecond
    "µs": lambda v: str(int(v)),  # an epoch in microseconds (event_ts_us): the digits, as a program reads them
}


def formatted(v: Any, unit: str | None) -> str:
    """``v`` as a table cell (``cell``), a number by its unit's rule in ``UNIT_FORMATS``."""
    import numpy as np

    if isinstance(v, np.generic):
        v = v.item()
    rule = UNIT_FORMATS.get(unit) if unit is not None else None
    if rule is not None and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return rule(v)
    return cell(v)


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
        # UTC as "Z": six characters shorter than "+00:00", which keeps a 3-symbol online table in 120 columns.
        s = v.isoformat(sep=" ", timespec="microseconds")
        return s[:-6] + "Z" if s.endswith("+00:00") else s
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
