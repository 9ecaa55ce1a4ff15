"""Great Expectations suites for raw snapshots and for features.

Two guards use them:
* the online path checks every cycle's feature rows before they are pushed with the same suites compiled to
  one DuckDB query (``SqlChecker``, the same verdicts and counts as GE): rows failing a row-level expectation
  are quarantined alone and the rest served; a batch-level failure holds the whole cycle;
* the offline ``validate`` step checks a date's snapshots and its freshly built features before the
  features are published to Feast, and writes Data Docs under ``<data-dir>/gx``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

MAX_LAG_S = 300.0  # received_ts - event_ts beyond this: the vendor handed us an old book
# received_ts before event_ts means the two clocks disagree. Up to 5 s is tolerated: a recorder or vendor clock
# without tight NTP drifts by seconds (the shared Binance recordings run 1.3 s behind the exchange's E); beyond
# that neither timestamp can be trusted to order books against each other.
MIN_LAG_S = -5.0
FLOAT_MAX = sys.float_info.max  # the largest finite float: a bound that only the infinities exceed


def _float_features() -> list[str]:
    import pyarrow as pa

    from microstructure.transforms import FEATURES_SCHEMA

    return [f.name for f in FEATURES_SCHEMA if pa.types.is_floating(f.type)]


FLOAT_FEATURES = _float_features()


def _expectations(kind: str) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    common = [
        E.ExpectColumnValuesToNotBeNull(column="symbol"),
        E.ExpectColumnValuesToNotBeNull(column="event_ts"),
        E.ExpectColumnValuesToNotBeNull(column="received_ts"),
        E.ExpectColumnValuesToNotBeNull(column="source"),
        E.ExpectColumnValuesToBeBetween(column="book_levels", min_value=1, max_value=10),
        # Freshness: how old the book was when it reached us (negative = clocks disagree).
        E.ExpectColumnValuesToBeBetween(column="lag_s", min_value=MIN_LAG_S, max_value=MAX_LAG_S),
    ]
    if kind == "snapshots":
        return [
            *common,
            E.ExpectCompoundColumnsToBeUnique(column_list=["symbol", "event_ts", "source"]),
            E.ExpectColumnValuesToBeBetween(column="bid_px_1", min_value=0, strict_min=True),
            E.ExpectColumnValuesToBeBetween(column="ask_px_1", min_value=0, strict_min=True),
            E.ExpectColumnValuesToBeBetween(column="bid_sz_1", min_value=0),
            E.ExpectColumnValuesToBeBetween(column="ask_sz_1", min_value=0),
            # Ordered levels: bids fall and asks rise away from the touch; the touch is not crossed.
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="bid_px_1", column_B="bid_px_2",
                                                       ignore_row_if="either_value_is_missing"),
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="ask_px_2", column_B="ask_px_1",
                                                       ignore_row_if="either_value_is_missing"),
            E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="ask_px_1", column_B="bid_px_1", or_equal=True,
                                                       ignore_row_if="either_value_is_missing"),
        ]
    # Every float feature is finite (a 1e308 price made mid = inf, which was published and passed SAFE). GE has no
    # finiteness expectation; a range with finite bounds on both sides excludes +-inf (NaN is GE's "missing", left
    # to the not-null expectations). So every range below has an upper bound, and each float feature without a
    # range of its own gets [-FLOAT_MAX, FLOAT_MAX]: a feature added later is covered without an edit here.
    ranged = [
        E.ExpectColumnValuesToBeBetween(column="order_imbalance", min_value=-1, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="depth_imbalance", min_value=-1, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="spread_bps", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="bid_depth", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="ask_depth", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="depth_dollars", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="gap_pct", min_value=0, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="best_bid", min_value=0, strict_min=True, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="best_ask", min_value=0, strict_min=True, max_value=FLOAT_MAX),
        E.ExpectColumnValuesToBeBetween(column="mid", min_value=0, strict_min=True, max_value=FLOAT_MAX),
    ]
    have = {e.column for e in ranged}
    finite = [E.ExpectColumnValuesToBeBetween(column=c, min_value=-FLOAT_MAX, max_value=FLOAT_MAX)
              for c in FLOAT_FEATURES if c not in have]
    return [
        *common,
        E.ExpectCompoundColumnsToBeUnique(column_list=["symbol", "event_ts"]),
        *ranged,
        *finite,
        E.ExpectColumnValuesToNotBeNull(column="spread_bps"),
        E.ExpectColumnValuesToNotBeNull(column="order_imbalance"),
        E.ExpectColumnValuesToNotBeNull(column="has_recent_halt"),
    ]


@dataclass
class CheckResult:
    suite: str
    success: bool
    rows: int
    failures: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "ok"


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["lag_s"] = (df["received_ts"] - df["event_ts"]).dt.total_seconds()
    return df


_SITE = "uncommitted/data_docs/local_site/"  # relative to the GE project folder (<docs-dir>/gx)


def _docs_context(docs_dir: Path) -> Any:
    """A file-backed GE context under ``docs_dir`` (a data dir's ``gx/``) whose configuration is ours alone.

    GE imports the ``module_name`` of every store, site and plugin its ``great_expectations.yml`` names, puts the
    ``plugins_directory`` on ``sys.path``, and substitutes ``${VAR}`` from the environment and a variables file.
    A data dir is untrusted data, so the file is rewritten from this configuration before GE opens the project
    and handed to GE as an object too: whatever was planted there is never read. No plugins folder and no
    variables file. Suites, validation definitions and checkpoints live in memory (re-added on every start), so
    their JSON files in the folder are never read either; only validation results (data) and the Data Docs site
    are files, for the docs' history."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults

    from microstructure.lake import atomic_write_bytes

    def files(base: str) -> dict[str, str]:
        return {"class_name": "TupleFilesystemStoreBackend", "base_directory": base}

    stores = InMemoryStoreBackendDefaults()
    stores.stores[stores.validation_results_store_name] = {"class_name": "ValidationResultsStore",
                                                            "store_backend": files("uncommitted/validations/")}
    stores.data_docs_sites = {"local_site": {"class_name": "SiteBuilder", "show_how_to_buttons": True,
                                             "store_backend": files(_SITE),
                                             "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}}
    config = DataContextConfig(store_backend_defaults=stores, plugins_directory=None,
                               config_variables_file_path=None, analytics_enabled=False)
    project = docs_dir / "gx"  # GE's context folder inside the project root
    atomic_write_bytes(config.to_yaml_str().encode(), project / "great_expectations.yml")
    return gx.get_context(mode="file", project_root_dir=str(docs_dir), project_config=config)


class Checker:
    """Holds a GE context and one validation definition per suite; reuse it across cycles."""

    def __init__(self, docs_dir: Path | None = None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        if docs_dir is None:
            self.ctx = gx.get_context(mode="ephemeral")
        else:
            self.ctx = _docs_context(docs_dir)
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.docs = docs_dir is not None
        ds = self.ctx.data_sources.add_or_update_pandas("microstructure")
        self._defs: dict[str, Any] = {}
        for kind in ("snapshots", "features"):
            asset = ds.add_dataframe_asset(kind)
            batch = asset.add_batch_definition_whole_dataframe(f"{kind}_batch")
            suite = self.ctx.suites.add_or_update(gx.ExpectationSuite(name=f"{kind}_suite",
                                                                      expectations=_expectations(kind)))
            vd = gx.ValidationDefinition(data=batch, suite=suite, name=f"{kind}_validation")
            vd = self.ctx.validation_definitions.add_or_update(vd)
            self._defs[kind] = vd

    def check(self, kind: str, df: Any, batch: str | None = None) -> CheckResult:
        """Validate ``df`` (a pandas frame or an Arrow table) against the ``kind`` suite. ``batch`` names what
        was validated (e.g. "snapshots 2026-11-25"): it is the run name Data Docs list the validation under."""
        if not isinstance(df, pd.DataFrame):  # an Arrow table
            df = df.to_pandas()
        if df.empty:
            return CheckResult(kind, True, 0)
        runner = self._defs[kind]
        run_id = None
        if batch is not None or self.docs:
            from great_expectations.core.run_identifier import RunIdentifier

            run_id = RunIdentifier(run_name=batch, run_time=dt.datetime.now(dt.UTC))
        res = runner.run(batch_parameters={"dataframe": _frame(df)}, run_id=run_id)
        if self.docs:
            self._publish(res, run_id, batch or kind)
        failures = []
        for r in res.results:
            if not r.success:
                cfg = r.expectation_config
                col = cfg.kwargs.get("column") or cfg.kwargs.get("column_list") or (
                    f"{cfg.kwargs.get('column_A')}>{cfg.kwargs.get('column_B')}")
                n = (r.result or {}).get("unexpected_count")
                failures.append(f"{cfg.type}({col})" + (f": {n} rows" if n is not None else ""))
        return CheckResult(kind, res.success, len(df), failures)

    def split(self, kind: str, table: Any) -> tuple[CheckResult, Any, Any]:
        """(verdict, rows to serve, rows to quarantine with a ``reason``): GE judges the batch as a whole, so
        a failing batch is quarantined entire (``SqlChecker.split`` separates the rows)."""
        return _whole_batch(self.check(kind, table), table)

    def _publish(self, res: Any, run_id: Any, batch: str) -> None:
        """Store the result under the batch's name and rebuild Data Docs for offline reading.

        A dataframe batch carries no ``data_asset_name`` in its batch spec, so GE's validation page says
        "Data asset: None"; we name the batch (dataset and date) before storing the result."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        from microstructure.datadocs import make_offline

        res.meta.setdefault("batch_spec", {})["data_asset_name"] = batch
        key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=res.suite_name),
                                         run_id=run_id, batch_identifier=res.batch_id)
        self.ctx.validation_results_store.set(key, res)
        self.ctx.build_data_docs()
        make_offline(self.site())

    def site(self) -> Path:
        return Path(self.ctx.root_directory) / _SITE

    def docs_index(self) -> Path | None:
        if not self.docs:
            return None
        idx = self.site() / "index.html"
        return idx if idx.exists() else None


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
            return self.con.execute(sql, params).to_arrow_table()
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
