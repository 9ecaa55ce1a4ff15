"""The feature declaration: every column of ``transforms/features.sql``, read from the SQL itself.

The SQL is the one place a feature is written. Each output column of its final SELECT carries an annotation on
the line that names it (its bare name, or ``... AS name``)::

    (best_ask - best_bid) / mid * 10000 AS spread_bps,  -- feature: unit=bps range=[0,) not_null | ...

    -- <role>: [unit=<word>] [range=<interval>] [not_null] | <description>

* role: ``entity`` (Feast's join key), ``timestamp`` (Feast's event time) or ``feature`` (served); exactly one
  entity and one timestamp.
* ``range``: interval notation, ``[`` / ``]`` closed and ``(`` / ``)`` open; an empty side is unbounded and must
  be open: ``[0,)``, ``(0,)``, ``[-1,1]`` (no spaces). Numeric columns only. It becomes the column's range expectation.
* ``not_null``: the feature is never null (a not-null expectation).
* The description may name a trailing window, ``{HALT_WINDOW}``, and reads "30 minutes" wherever it is shown.

A trailing window is declared where the SQL writes its interval: the line holding the ``INTERVAL`` literal carries
``-- window: <NAME>`` (every ``INTERVAL`` in the file must). Python reads the windows from there (``GAP_WINDOW``,
``HALT_WINDOW``), so the history the online buffer and the offline build carry cannot disagree with the SQL.

Types are not annotated: they are what DuckDB returns for the SQL run over an empty snapshot table. The parse is
strict: a column without exactly one annotation, an annotation naming no output column, an unknown attribute or a
malformed range is a :class:`DeclarationError` when ``microstructure.contract.schemas`` is imported.

This module stays light (no pyarrow or DuckDB at import): ``FRESHNESS_S`` is read by the CLI's option defaults.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

# A served row older than this (by its event_ts) is stale: the online read, the scorer, the service and Feast's
# on-demand ``freshness`` view all compare against this one number (the service's is overridable per config).
FRESHNESS_S = 10.0

_TAG = re.compile(r"--\s*(entity|timestamp|feature|window)\s*:(.*)$")
_NAME = re.compile(r"(?:^|[\s.(])([A-Za-z_][A-Za-z0-9_]*)\s*,?$")
_ATTR = re.compile(r"(unit|range)=(\S+)$|(not_null)$")
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_INTERVAL_NOTATION = re.compile(rf"^([\[(])\s*({_NUM})?\s*,\s*({_NUM})?\s*([\])])$")
_INTERVAL_SQL = re.compile(r"\bINTERVAL\s+'?(\d+)'?\s+(SECONDS?|MINUTES?|HOURS?)\b", re.IGNORECASE)
_UNITS = {"SECOND": "seconds", "MINUTE": "minutes", "HOUR": "hours"}


class DeclarationError(ValueError):
    """The feature SQL's annotations are missing, ambiguous or malformed."""


@dataclass(frozen=True)
class Interval:
    """A range in interval notation; ``None`` is an unbounded side (always open)."""

    lo: float | None
    hi: float | None
    lo_closed: bool
    hi_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = _INTERVAL_NOTATION.match(text)
        if not m:
            raise ValueError(f"range {text!r} is not interval notation such as [0,) or (-1,1]")
        lo = float(m.group(2)) if m.group(2) is not None else None
        hi = float(m.group(3)) if m.group(3) is not None else None
        out = cls(lo, hi, m.group(1) == "[", m.group(4) == "]")
        if (lo is None and out.lo_closed) or (hi is None and out.hi_closed):
            raise ValueError(f"range {text!r}: an unbounded side is open, write ( or )")
        if lo is not None and hi is not None and (lo > hi or (lo == hi and not (out.lo_closed and out.hi_closed))):
            raise ValueError(f"range {text!r} is empty")
        return out

    def __str__(self) -> str:
        def num(v: float) -> str:
            return f"{v:g}".replace("-", "−")

        lo = "−∞" if self.lo is None else num(self.lo)
        hi = "∞" if self.hi is None else num(self.hi)
        return f"{'[' if self.lo_closed else '('}{lo}, {hi}{']' if self.hi_closed else ')'}"


@dataclass(frozen=True)
class Annotation:
    """One column's annotation, as written."""

    name: str
    role: str
    unit: str | None
    range: Interval | None
    not_null: bool
    description: str
    line: int


@dataclass(frozen=True)
class Column:
    """One output column of the feature SQL: its annotation and the Arrow type DuckDB gives it."""

    name: str
    role: str
    type: pa.DataType
    unit: str | None
    range: Interval | None
    not_null: bool
    description: str


@dataclass(frozen=True)
class Declaration:
    columns: tuple[Column, ...]  # in the SQL's output order
    windows: dict[str, dt.timedelta]

    @property
    def schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema([pa.field(c.name, c.type) for c in self.columns])

    @property
    def features(self) -> tuple[Column, ...]:
        """The served columns (all but the entity and the timestamp), in output order."""
        return tuple(c for c in self.columns if c.role == "feature")

    def role(self, role: str) -> str:
        return next(c.name for c in self.columns if c.role == role)

    def window(self, name: str) -> dt.timedelta:
        if name not in self.windows:
            raise DeclarationError(f"the feature SQL declares no window {name} (a line with an INTERVAL and "
                                   f"'-- window: {name}'); it declares {sorted(self.windows)}")
        return self.windows[name]


def say(window: dt.timedelta) -> str:
    """A window as prose: "5 minutes", "90 seconds"."""
    s = int(window.total_seconds())
    for unit, n in (("hour", 3600), ("minute", 60), ("second", 1)):
        if s % n == 0:
            k = s // n
            return f"{k} {unit}{'' if k == 1 else 's'}"
    raise AssertionError("unreachable")  # n = 1 divides every whole number of seconds


def parse(text: str, source: str = "features.sql") -> tuple[list[Annotation], dict[str, dt.timedelta]]:
    """The column annotations and the windows written in ``text``; DeclarationError names the line."""
    notes: list[Annotation] = []
    windows: dict[str, dt.timedelta] = {}
    for no, line in enumerate(text.splitlines(), 1):
        code, sep, comment = line.partition("--")
        where = f"{source} line {no}"
        intervals = _INTERVAL_SQL.findall(code)
        tag = _TAG.match(sep + comment)
        if re.search(r"\bINTERVAL\b", code, re.IGNORECASE) and not (tag and tag.group(1) == "window"):
            raise DeclarationError(f"{where}: an INTERVAL must declare its window: end the line with "
                                   f"'-- window: <NAME>'")
        if not tag:
            continue
        role, rest = tag.group(1), tag.group(2).strip()
        if role == "window":
            name = rest
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                raise DeclarationError(f"{where}: a window's name is one UPPER_CASE word, got {name!r}")
            if len(intervals) != 1:
                raise DeclarationError(f"{where}: window {name} needs exactly one INTERVAL <n> SECONDS|MINUTES|HOURS"
                                       f" literal on its line, found {len(intervals)}")
            if name in windows:
                raise DeclarationError(f"{where}: window {name} is declared twice")
            n, unit = intervals[0]
            windows[name] = dt.timedelta(**{_UNITS[unit.upper().rstrip("S")]: int(n)})
            continue
        notes.append(_annotation(role, rest, code, where, no))
    for a in notes:
        for ref in re.findall(r"\{([^}]*)\}", a.description):
            if ref not in windows:
                raise DeclarationError(f"{source} line {a.line}: the description of {a.name} names {{{ref}}}, "
                                       f"which is no declared window ({sorted(windows)})")
    return notes, windows


def _annotation(role: str, rest: str, code: str, where: str, no: int) -> Annotation:
    attrs, bar, description = rest.partition("|")
    description = description.strip()
    if not bar or not description:
        raise DeclarationError(f"{where}: an annotation reads '-- {role}: [attributes] | <description>'")
    m = _NAME.search(code.rstrip())
    if not m:
        raise DeclarationError(f"{where}: the annotation is on a line that names no column (put it on the line "
                               "with the column's name or its 'AS name')")
    unit: str | None = None
    rng: Interval | None = None
    not_null = False
    seen: set[str] = set()
    for word in attrs.split():
        a = _ATTR.match(word)
        if not a:
            raise DeclarationError(f"{where}: unknown attribute {word!r} (unit=<word>, range=<interval>, not_null)")
        key = a.group(1) or a.group(3)
        if key in seen:
            raise DeclarationError(f"{where}: {key} is given twice")
        seen.add(key)
        if key == "unit":
            unit = a.group(2)
        elif key == "range":
            try:
                rng = Interval.parse(a.group(2))
            except ValueError as e:
                raise DeclarationError(f"{where}: {e}") from None
        else:
            not_null = True
    if role != "feature" and (rng or not_null):
        raise DeclarationError(f"{where}: the {role} is checked by the snapshot contract; range and not_null "
                               "are for features")
    return Annotation(m.group(1), role, unit, rng, not_null, description, no)


# Arrow -> DuckDB, for the empty input table (DDL rather than an Arrow scan: DuckDB's scan of a Python object
# imports pandas, ~0.4 s on every import of the schemas). Checked by reading the table back, below.
def _duckdb_type(t: pa.DataType) -> str:
    import pyarrow as pa

    if pa.types.is_timestamp(t) and t.unit == "us" and t.tz == "UTC":
        return "TIMESTAMPTZ"
    names = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
             pa.bool_(): "BOOLEAN"}
    if t not in names:
        raise DeclarationError(f"no DuckDB type for the input column type {t}")
    return names[t]


def output_schema(query: str, inputs: pa.Schema, relation: str = "snapshots") -> pa.Schema:
    """The Arrow schema of ``query`` run over an empty table ``relation`` of schema ``inputs`` (zero rows)."""
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")  # timestamptz comes back as timestamp[us, tz=UTC]
        # Identifiers from our own schema, quoted; no value is ever part of this text.
        cols = ", ".join(f'"{f.name}" {_duckdb_type(f.type)}' for f in inputs)
        con.execute(f'CREATE TABLE "{relation}" ({cols})')
        got = con.table(relation).arrow().schema
        if got != pa.schema([f.with_nullable(True) for f in inputs]):
            raise DeclarationError(f"the empty {relation} table does not read back as its schema: {got}")
        return con.sql(query).arrow().schema
    finally:
        con.close()


def declare(query: str, inputs: pa.Schema, source: str = "features.sql") -> Declaration:
    """The declaration of ``query``: its annotations joined to the columns a zero-row run gives, one to one."""
    notes, windows = parse(query, source)
    out = output_schema(query, inputs)
    names = out.names
    dup_out = sorted({n for n in names if names.count(n) > 1})
    if dup_out:
        raise DeclarationError(f"{source}: output column(s) {dup_out} appear more than once")
    by_name: dict[str, Annotation] = {}
    for a in notes:
        if a.name in by_name:
            raise DeclarationError(f"{source} lines {by_name[a.name].line} and {a.line}: {a.name} is annotated twice")
        if a.name not in names:
            raise DeclarationError(f"{source} line {a.line}: the annotation names {a.name}, which is no output column "
                                   f"of the query ({', '.join(names)})")
        by_name[a.name] = a
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DeclarationError(f"{source}: output column(s) {', '.join(missing)} have no annotation "
                               "('-- feature: [unit=..] [range=..] [not_null] | description' on the column's line)")
    for role in ("entity", "timestamp"):
        have = [a.name for a in notes if a.role == role]
        if len(have) != 1:
            raise DeclarationError(f"{source}: exactly one column must be the {role}, found {have}")
    cols = []
    for field in out:
        a = by_name[field.name]
        if a.range is not None and not _numeric(field.type):
            raise DeclarationError(f"{source} line {a.line}: {a.name} is {field.type}; a range needs a number")
        text = re.sub(r"\{([^}]*)\}", lambda m: say(windows[m.group(1)]), a.description)
        cols.append(Column(a.name, a.role, field.type, a.unit, a.range, a.not_null, text))
    return Declaration(tuple(cols), windows)


def _numeric(t: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))
