"""The same suites compiled to one DuckDB query per batch, for the online path's per-cycle budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from microstructure.checks.suites import CheckResult, _expectations

# ---- the same suites as one DuckDB query: the per-cycle online check ---------------------------------------
# GE validating a 150-row pandas frame costs ~0.2 s, most of a live cycle's budget. The online path evaluates the
# *same expectation objects* (``_expectations``, the one definition) compiled to SQL aggregates, one query per
# batch, with GE's pandas semantics: NaN counts as missing, value checks skip missing values, pair checks skip
# rows where either side is missing. ``tests/test_checks_sql.py`` holds both to the same verdicts and counts.
# An expectation type the compiler does not know raises at start-up, so the two can never silently diverge.


def _missing(col: str, floats: set[str]) -> str:
    return f'("{col}" IS NULL OR isnan("{col}"))' if col in floats else f'("{col}" IS NULL)'


class _Params(dict[str, Any]):
    """The values one expectation compares against, as named parameters: its SQL holds only ``$<name>``
    (house rule: no value is ever SQL text, not even a threshold of our own)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def bind(self, value: Any) -> str:
        name = f"{self.prefix}_{len(self)}"
        self[name] = value
        return f"${name}"


def _unexpected_sql(exp: Any, floats: set[str], bind: Callable[[Any], str]) -> tuple[str, str | None, str]:
    """(label, the row condition GE would call unexpected or None for a batch-level expectation, the SQL
    aggregate counting GE's unexpected rows) for one expectation; its values go through ``bind``."""
    label, cond, agg = _unexpected(exp, floats, bind)
    return label, cond, agg if agg is not None else f"count(*) FILTER (WHERE {cond})"


def _unexpected(exp: Any, floats: set[str], bind: Callable[[Any], str]) -> tuple[str, str | None, str | None]:
    kind = exp.expectation_type
    kw = exp.configuration.kwargs
    if kind == "expect_column_values_to_not_be_null":
        c = kw["column"]
        return f"{kind}({c})", _missing(c, floats), None
    if kind == "expect_column_values_to_be_between":
        c = kw["column"]
        conds = []
        if kw.get("min_value") is not None:
            conds.append(f'"{c}" {">" if kw.get("strict_min") else ">="} {bind(float(kw["min_value"]))}')
        if kw.get("max_value") is not None:
            conds.append(f'"{c}" {"<" if kw.get("strict_max") else "<="} {bind(float(kw["max_value"]))}')
        ok = " AND ".join(conds) or "TRUE"
        return f"{kind}({c})", f"(NOT {_missing(c, floats)} AND NOT ({ok}))", None
    if kind == "expect_column_pair_values_a_to_be_greater_than_b":
        a, b = kw["column_A"], kw["column_B"]
        if kw.get("ignore_row_if") != "either_value_is_missing":
            raise NotImplementedError(f"{kind} with ignore_row_if={kw.get('ignore_row_if')!r}")
        op = ">=" if kw.get("or_equal") else ">"
        return (f"{kind}({a}>{b})", f"(NOT {_missing(a, floats)} AND NOT {_missing(b, floats)} "
                                    f'AND NOT ("{a}" {op} "{b}"))', None)
    if kind == "expect_compound_columns_to_be_unique":
        cols = kw["column_list"]
        parts = ", ".join(f'"{c}"' for c in cols)
        # GE counts every row of a duplicated combination (rows whose values are all missing are ignored).
        return (f"{kind}({cols})", None,
                f"(SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM batch "
                f"WHERE NOT ({' AND '.join(_missing(c, floats) for c in cols)}) GROUP BY {parts} "
                f"HAVING count(*) > 1))")
    raise NotImplementedError(f"no SQL form for expectation {kind}")


def _whole_batch(res: CheckResult, table: Any) -> tuple[CheckResult, Any, Any]:
    """Serve the whole batch if it passed, else quarantine all of it with the batch's reasons."""
    import pyarrow as pa

    if res.success:
        return res, table, table.slice(0, 0).append_column("reason", pa.array([], pa.string()))
    return res, table.slice(0, 0), table.append_column("reason", pa.array([res.reason] * table.num_rows))


@dataclass(frozen=True)
class _Compiled:
    labels: list[str]  # one per expectation, in suite order
    batch_level: frozenset[str]  # labels of expectations about the batch, not a row (uniqueness)
    counts_sql: str  # one row: GE's unexpected count per expectation
    reasons_sql: str  # per row: the row-level labels it fails ('' when none)
    counts_params: dict[str, Any]  # the named parameters of counts_sql (thresholds)
    reasons_params: dict[str, Any]  # ... of reasons_sql (the row-level thresholds and the labels)


class SqlChecker:
    """The expectation suites evaluated as one DuckDB query per batch (the online path's check)."""

    def __init__(self) -> None:
        import duckdb

        self.con = duckdb.connect()
        self.con.execute("SET threads = 1")  # 150 rows: parallelism costs more than it gives
        self.con.execute("SET python_enable_replacements = false")  # only the registered batch is read
        self._expectations = {kind: _expectations(kind) for kind in ("snapshots", "features")}
        self._sql: dict[tuple[str, Any], _Compiled] = {}
        for kind in self._expectations:  # compile once up front: an unknown expectation fails at start-up
            self._compile(kind, set())

    def _compile(self, kind: str, floats: set[str]) -> _Compiled:
        # Each expectation binds its values under its own prefix, so each query gets exactly its parameters
        # (DuckDB refuses a parameter the query does not use).
        params = [_Params(f"e{i}") for i in range(len(self._expectations[kind]))]
        checks = [_unexpected_sql(e, floats | {"lag_s"}, p.bind) for e, p in zip(self._expectations[kind], params,
                                                                                  strict=True)]
        batch = "WITH batch AS (SELECT *, (epoch_us(received_ts) - epoch_us(event_ts)) / 1e6 AS lag_s FROM src) "
        row_level = [i for i, (_, cond, _) in enumerate(checks) if cond]
        labels = {f"label_{i}": checks[i][0] for i in row_level}
        reasons = ", ".join(f"CASE WHEN {checks[i][1]} THEN $label_{i} END" for i in row_level)
        return _Compiled(
            labels=[label for label, _, _ in checks],
            batch_level=frozenset(label for label, cond, _ in checks if cond is None),
            counts_sql=batch + "SELECT " + ", ".join(f"{agg} AS e{i}" for i, (_, _, agg) in enumerate(checks))
            + " FROM batch",
            reasons_sql=batch + f"SELECT concat_ws('; ', {reasons}) AS reason FROM batch",
            counts_params={k: v for p in params for k, v in p.items()},
            reasons_params={**{k: v for i in row_level for k, v in params[i].items()}, **labels})

    def _query(self, kind: str, schema: Any) -> _Compiled:
        import pyarrow as pa

        key = (kind, schema)
        if key not in self._sql:
            self._sql[key] = self._compile(kind, {f.name for f in schema if pa.types.is_floating(f.type)})
        return self._sql[key]

    def _run(self, sql: str, params: dict[str, Any], table: Any) -> Any:
        self.con.register("src", table)
        try:
            # con.sql, not execute: DuckDB 2 warns that Arrow output of a DB-API result copies the rows once more.
            return self.con.sql(sql, params=params).to_arrow_table()
        finally:
            self.con.unregister("src")

    def _counts(self, kind: str, table: Any) -> dict[str, int]:
        c = self._query(kind, table.schema)
        row = self._run(c.counts_sql, c.counts_params, table).to_pylist()[0]
        return {label: n for label, n in zip(c.labels, row.values(), strict=True) if n}

    def check(self, kind: str, table: Any, batch: str | None = None) -> CheckResult:
        import pyarrow as pa

        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        if table.num_rows == 0:
            return CheckResult(kind, True, 0)
        return self._result(kind, table, self._counts(kind, table))

    @staticmethod
    def _result(kind: str, table: Any, failed: dict[str, int]) -> CheckResult:
        return CheckResult(kind, not failed, table.num_rows, [f"{label}: {n} rows" for label, n in failed.items()])

    def split(self, kind: str, table: Any) -> tuple[CheckResult, Any, Any]:
        """(the batch's verdict, the rows to serve, the rows to quarantine with a ``reason`` column).

        A row failing a row-level expectation (a null, a value out of range, a crossed pair, a stale book)
        is quarantined alone: the good rows of the cycle are still served. A batch-level failure (duplicate
        keys) quarantines the whole batch: it is never served."""
        import pyarrow as pa
        import pyarrow.compute as pc

        failed = self._counts(kind, table)
        res = self._result(kind, table, failed)
        c = self._query(kind, table.schema)
        if res.success or c.batch_level & set(failed):
            return _whole_batch(res, table)
        reason = self._run(c.reasons_sql, c.reasons_params, table).column("reason")
        bad = pc.not_equal(reason, "")
        return (res, table.filter(pc.invert(bad)),
                table.filter(bad).append_column("reason", reason.filter(bad).cast(pa.string())))
