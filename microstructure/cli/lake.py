"""Commands over the lake: build-features, validate, compact, coverage, sql.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

import typer

from microstructure.cli.app import (
    DEFAULT_DATA,
    DataDir,
    Engine,
    JsonOut,
    UserError,
    _connect,
    _date,
    _parse_ts,
    _paths,
    _quiet_libraries,
    _writes,
    app,
    out,
)
from microstructure.cli.render import _emit, _table
from microstructure.contract.text import dumps, text


def _days(paths: Any, dates: list[str] | None) -> list[dt.date]:
    from microstructure.lake.paths import SNAPSHOTS

    if dates:
        return [_date(d) for d in dates]
    days = paths.dates(SNAPSHOTS)
    if not days:
        raise UserError(f"the lake at {paths.root} has no snapshots yet: run `microstructure poll` or `run` first")
    return days


@app.command("build-features")
@_writes
def build_features_cmd(data_dir: DataDir = DEFAULT_DATA,
                       date: Annotated[list[str] | None, typer.Option(help="Date(s) to build; default all.")] = None,
                       engine: Annotated[Engine, typer.Option(help="duckdb (in process) or spark (the same SQL on "
                                                                   "$MICROSTRUCTURE_SPARK_MASTER, default "
                                                                   "local[2]).")] = Engine.duckdb,
                       as_json: JsonOut = False) -> None:
    """Build features from the lake with transforms/features.sql, check them, publish to Feast's offline store."""
    _quiet_libraries()
    from microstructure.checks.ge import Checker
    from microstructure.jobs import build as pipeline

    paths = _paths(data_dir, must_exist=True)
    res = pipeline.build_and_publish(paths, _days(paths, date), Checker(paths.data_dir / "gx"),
                                     engine=Engine(engine).value)
    _emit([r.as_dict() for r in res], "feature batches", as_json)
    if not all(r.published for r in res):
        raise typer.Exit(1)


@app.command()
@_writes
def validate(data_dir: DataDir = DEFAULT_DATA,
             date: Annotated[list[str] | None, typer.Option(help="Date(s) to check; default all.")] = None,
             as_json: JsonOut = False) -> None:
    """Run the GE suites on the lake's snapshots and published features; write Data Docs; show quarantine."""
    _quiet_libraries()
    from microstructure.checks.ge import Checker

    paths = _paths(data_dir, must_exist=True)
    checker = Checker(paths.data_dir / "gx")
    con = _connect(paths)
    results = []
    for day in _days(paths, date):
        for kind in ("snapshots", "features"):
            df = con.sql(f"SELECT * EXCLUDE (date) FROM {kind} WHERE date = ?", params=[day]).df()
            r = checker.check(kind, df, batch=f"{kind} {day.isoformat()}")
            results.append({"date": day.isoformat(), "suite": kind, "rows": r.rows, "success": r.success,
                            "reason": r.reason})
    reasons = con.sql("SELECT reason, count(*) AS n FROM quarantine GROUP BY ALL ORDER BY n DESC").fetchall()
    batches = [json.loads(f.read_text()) for f in sorted(paths.dataset("features_quarantine").glob("*/*.json"))]
    if as_json:
        print(dumps({"checks": results, "quarantine": dict(reasons), "quarantined_feature_batches": batches,
                     "data_docs": str(checker.docs_index())}))
    else:
        out.print(_table("checks", ["date", "suite", "rows", "success", "reason"],
                         [list(r.values()) for r in results]))
        out.print(_table("quarantined snapshots by reason", ["reason", "rows"], [list(r) for r in reasons]))
        if batches:
            out.print(_table("quarantined feature batches", ["date", "reasons"],
                             [[b["date"], "; ".join(b["reasons"])] for b in batches]))
        out.print(text(f"Data Docs: {checker.docs_index()}"))
    if not all(r["success"] for r in results):
        raise typer.Exit(1)


@app.command()
@_writes
def compact(data_dir: DataDir = DEFAULT_DATA,
            date: Annotated[list[str] | None, typer.Option(help="Date(s) to compact; default all.")] = None,
            as_json: JsonOut = False) -> None:
    """Merge each date's small snapshot files into one sorted file with large row groups."""
    from microstructure.jobs import build as pipeline

    paths = _paths(data_dir, must_exist=True)
    res = pipeline.compact_all(paths, _days(paths, date))
    _emit([{"partition": k, "files_before": v[0], "files_after": v[1]} for k, v in res.items()], "compaction", as_json)


@app.command()
def sql(query: Annotated[str | None, typer.Argument(help="SQL over views snapshots, features, quarantine, "
                                                         "outcomes.")] = None,
        data_dir: DataDir = DEFAULT_DATA,
        as_json: JsonOut = False,
        as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
        timeout: Annotated[float, typer.Option("--timeout", envvar="MICROSTRUCTURE_SQL_TIMEOUT",
                                               help="Stop a statement after this many seconds.")] = 60.0,
        memory_limit: Annotated[str, typer.Option("--memory-limit", envvar="MICROSTRUCTURE_SQL_MEMORY_LIMIT",
                                                  help="DuckDB's working memory, and separately the largest "
                                                       "result, e.g. 512MB or 4GB.")] = "1GB") -> None:
    """Ad-hoc DuckDB over the lake, read-only (it cannot write any file); without a query, a DuckDB prompt."""
    from microstructure.cli import sql_shell as shell

    limits = shell.Limits.parse(timeout, memory_limit)
    paths = _paths(data_dir, must_exist=True)
    if query is None:
        shell.repl(paths, limits)
        return
    df = shell.run(paths, query, limits)  # a refused or failed statement is an InputError: one line, exit 2
    if df is None:
        return
    if as_json:
        print(df.to_json(orient="records", date_format="iso", date_unit="us"))
    elif as_csv:
        from microstructure.contract.text import csv_frame

        print(csv_frame(df).to_csv(index=False), end="")
    else:
        out.print(_table("", list(df.columns), df.astype(object).where(df.notna(), None).values.tolist()))


@app.command()
def coverage(data_dir: DataDir = DEFAULT_DATA,
             since: Annotated[str | None, typer.Option(help="ISO time, UTC unless it carries an offset: window "
                                                           "start (default: all data).")] = None,
             until: Annotated[str | None, typer.Option(help="ISO time, UTC unless it carries an offset: window "
                                                           "end.")] = None,
             as_json: JsonOut = False) -> None:
    """Per source and overall: symbols with L2 (>= 5 levels), shallow (2-4), L1 only, and none; failed calls and
    the symbols they failed for; and per poll cycle, how many symbols had L2 (min, median, last cycle)."""
    from microstructure.lake.coverage import coverage as cov

    paths = _paths(data_dir, must_exist=True)
    res = cov(paths, _parse_ts(since) if since else None, _parse_ts(until) if until else None)
    if as_json:
        print(dumps(res))
        return
    cols = ["source", "l2", "shallow", "l1_only", "snapshots", "failed_calls", "failed_symbols"]
    out.print(_table("coverage by source (symbols by the most levels served)", cols,
                     [[r[c] for c in cols] for r in res["sources"]]))
    per = ["cycles", "l2_cycle_min", "l2_cycle_median", "l2_cycle_last"]
    out.print(_table("symbols with L2 per poll cycle (min / median / last cycle)", ["source", *per],
                     [[r["source"], *[r[c] for c in per]] for r in res["sources"]]
                     + [["all sources", *[res["all_sources_per_cycle"][c] for c in per]]]))
    o = res["overall"]
    out.print(_table("overall", ["symbols", "l2", "shallow", "l1_only", "none"],
                     [[o["symbols"], o["l2"], o["shallow"], o["l1_only"], o["none"]]]))
    if o["none_symbols"]:
        out.print(text("no source served: " + ", ".join(o["none_symbols"])))
