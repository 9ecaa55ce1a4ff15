"""``microstructure``: the command line. Heavy imports (Feast, GE, Prefect) happen inside commands."""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from microstructure.output import dumps, text

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Order-book features for intraday signals: poll -> lake -> DuckDB -> GE -> Feast.")
out = Console()
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="MICROSTRUCTURE_DATA_DIR",
                                       help="Where the lake, Feast stores and docs live.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DEFAULT_DATA = Path("data")


class Source(enum.StrEnum):
    simulated = "simulated"
    polygon = "polygon"
    alpaca = "alpaca"
    chain = "chain"
    polygon_market = "polygon-market"  # every US stock from one snapshot-all call


class Engine(enum.StrEnum):
    duckdb = "duckdb"
    spark = "spark"


class Format(enum.StrEnum):
    snapshots = "snapshots"
    wide = "wide"
    lobster = "lobster"
    iex_deep = "iex-deep"
    binance_depth = "binance-depth"
    hyperliquid_l2 = "hyperliquid-l2"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import duckdb

        print(f"microstructure {version('microstructure')} (duckdb {duckdb.__version__})")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Order-book features for intraday signals: poll -> lake -> DuckDB -> GE -> Feast."""


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def _in_range(lo: float, hi: float, lo_open: bool = False) -> Any:
    """A callback for a float option: a finite number in [lo, hi] ((lo, hi] with ``lo_open``). The parser's
    float() takes "nan" and "inf", and a NaN compares false with every limit (``--freshness nan`` called any book
    fresh): they are usage errors, one line, exit 2."""

    def check(value: float | None) -> float | None:
        from microstructure.config import bounded
        from microstructure.output import InputError

        if value is None:
            return None
        try:
            return bounded("value", value, lo, hi, lo_open=lo_open)
        except InputError as e:
            raise typer.BadParameter(str(e).removeprefix("value ")) from None

    return check


DAY_S = 86_400.0


_CREATES = {"run", "poll_cmd", "backfill"}  # writers that may start a new data dir


def _writes(fn: Any) -> Any:
    """Make a command a data-dir writer: it holds the data dir's writer lock for its whole run
    (``datadir.writer``) and gains ``--wait`` (wait for another writer instead of exit 2). Commands that
    need an existing lake never create a mistyped data dir just to lock it."""
    import functools
    import inspect

    sig = inspect.signature(fn, eval_str=True)  # the module uses postponed annotations
    wait_param = inspect.Parameter(
        "wait", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option("--wait", help="If another command is writing this data dir, "
                                                               "wait for it instead of exiting.")])
    params = list(sig.parameters.values())
    params.append(wait_param.replace(kind=params[-1].kind if params else inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def wrapper(*args: Any, wait: bool = False, **kwargs: Any) -> Any:
        from microstructure import datadir

        data_dir = kwargs.get("data_dir", DEFAULT_DATA)
        try:
            if kwargs.get("fresh") and Path(data_dir).exists():  # refuse before touching a foreign folder at all
                datadir.ensure_marker(Path(data_dir))
                datadir.require_ours(Path(data_dir))
            with datadir.writer(Path(data_dir), wait=wait, create=fn.__name__ in _CREATES):
                return fn(*args, **kwargs)
        except (datadir.DataDirBusy, datadir.NotOurs) as e:
            raise UserError(str(e)) from None

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, "return": sig.return_annotation}
    return wrapper


def _paths(data_dir: Path, must_exist: bool = False) -> Any:
    """The lake of ``data_dir``. Read commands pass ``must_exist``: a mistyped data dir is an error, never
    silently created and answered with "not found"."""
    from microstructure.lake import LakePaths

    if must_exist and not (data_dir / "lake").exists():
        hint = "no such folder" if not data_dir.exists() else "it holds no lake"
        raise UserError(f"{data_dir} is not a data dir ({hint}): run `microstructure run` or `poll` first, or "
                        "pass --data-dir / MICROSTRUCTURE_DATA_DIR")
    return LakePaths(data_dir.resolve())


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("feast", "great_expectations", "prefect", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    """A table, numbers right-aligned at full precision; when it would not fit the terminal (80 columns
    included) it folds into a vertical layout: one block per row, a ``column  value`` line per column."""
    from rich.cells import cell_len
    from rich.console import Group
    from rich.text import Text

    from microstructure.output import cell, is_numeric, visible

    # Data as data: titles, headers (a query's column names) and cells are Text, never parsed as markup, with
    # control characters shown escaped by ``cell`` / ``visible``.
    columns = [visible(str(c)) for c in columns]
    texts = [[cell(v) for v in r] for r in rows]
    numeric = [is_numeric([r[i] for r in rows]) for i in range(len(columns))]
    width = sum(max([cell_len(c), *(cell_len(t[i]) for t in texts)]) + 3 for i, c in enumerate(columns)) + 1
    if width <= out.width or len(columns) <= 2:
        t = Table(title=Text(visible(title), style="table.title") if title else None, title_justify="left")
        for c, num in zip(columns, numeric, strict=True):
            t.add_column(Text(c), justify="right" if num else "left", overflow="fold")
        for r in texts:
            t.add_row(*(Text(v) for v in r))
        return t
    name_w = max(cell_len(c) for c in columns)
    blocks: list[Any] = [Text(visible(title), style="italic")] if title else []
    for k, r in enumerate(texts):
        blocks.append(Text(f"-- {k + 1} " + "-" * max(0, min(out.width, 60) - 5 - len(str(k + 1))), style="dim"))
        blocks += [Text(c + " " * (name_w - cell_len(c)) + f"  {v}") for c, v in zip(columns, r, strict=True)]
    return Group(*blocks)


def _progress(total: int | None, label: str, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                 transient=True, disable=not enabled)
    return p


# ---- poll / run --------------------------------------------------------------------------------
def _do_poll(data_dir: Path, cycles: int | None, interval: float, step: float | None, symbols: int,
             seed: int | None, fresh: bool, online: bool, show_progress: bool, **kw: Any) -> Any:
    """``runner.poll`` with a progress bar; its PollError is a user error (one line, exit 2)."""
    from microstructure import runner

    with _progress(cycles, "polling", show_progress) as prog:
        task = prog.add_task("poll", total=cycles)
        try:
            return runner.poll(data_dir.resolve(), cycles, interval, step, symbols, seed, fresh, online,
                               on_cycle=lambda i, s: prog.update(task, completed=i + 1), **kw)
        except runner.PollError as e:
            raise UserError(str(e)) from None


@app.command()
@_writes
def run(
    data_dir: DataDir = DEFAULT_DATA,
    cycles: Annotated[int, typer.Option(help="Poll cycles.")] = 300,
    interval: Annotated[float, typer.Option(help="Wall-clock seconds between cycles; 0 = replay as fast as "
                                                 "possible on a simulated clock.", callback=_in_range(0, DAY_S))] = 0.0,
    step: Annotated[float, typer.Option(help="Simulated seconds per cycle when --interval is 0.",
                                        callback=_in_range(0, DAY_S, lo_open=True))] = 2.0,
    symbols: Annotated[int, typer.Option(help="How many simulated symbols (max 150).")] = 150,
    seed: Annotated[int | None, typer.Option(help="Seed of a new simulated market (default 7).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start a new market: removes the data dir's lake, "
                                                        "market state and online store first.")] = False,
    prefect: Annotated[bool, typer.Option("--prefect/--no-prefect",
                                          help="Run through the Prefect flows (local server).")] = False,
    as_json: JsonOut = False,
) -> None:
    """The main job on the embedded simulated source: poll, lake, features, checks, Feast; then a summary.

    A data dir that already holds a market is continued (up to now), never mixed with a new one."""
    _quiet_libraries()
    paths = _paths(data_dir)
    if prefect:
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from microstructure.flows.pipeline import main_flow

        summary = main_flow(str(paths.data_dir), cycles, interval, step, symbols, seed, fresh)
    else:
        stats = _do_poll(paths.data_dir, cycles, interval, step, symbols, seed, fresh=fresh, online=True,
                         show_progress=not as_json)
        summary = _offline(paths, sorted(stats.dates), not as_json)
        summary["poll"] = stats.as_dict()
        summary["symbols"] = symbols
        online_syms = [] if stats.last_features is None else stats.last_features.column("symbol").to_pylist()
        from microstructure.runner import online_sample

        summary.update(online_sample(paths.data_dir, online_syms))
    _print_summary(summary, data_dir, as_json)


def _offline(paths: Any, days: list[dt.date], show: bool) -> dict[str, Any]:
    from microstructure import pipeline
    from microstructure.checks import Checker

    with err.status("building features, checking, publishing...", spinner="dots") if show else _null():
        builds = pipeline.build_and_publish(paths, days, Checker(paths.data_dir / "gx"))
        compacted = pipeline.compact_all(paths, days)
    return {"builds": [b.as_dict() for b in builds], "compacted": {k: list(v) for k, v in compacted.items()}}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _print_summary(summary: dict[str, Any], data_dir: Path, as_json: bool) -> None:
    if as_json:
        print(dumps(summary))
        return
    p = summary["poll"]
    rows = [
        ["symbols polled", summary.get("symbols")],
        ["cycles", p["cycles"]],
        ["snapshots written", p["written"]],
        ["duplicates skipped (stale quotes, re-runs)", p["duplicates"]],
        ["quarantined", sum(p["quarantined"].values())],
        *[[f"  - {r}", n] for r, n in sorted(p["quarantined"].items())],
        ["feature rows per symbol", summary["features_per_symbol"]],
        ["online rows pushed", p["online_pushed"]],
        *[[f"  online batch rejected: {r}", n] for r, n in p["online_rejected"].items()],
        ["poll seconds", p["seconds"]],
        ["symbols with L2 (>= 5 levels) / shallow / L1 only / none",
         " / ".join(str(p["coverage"][k]) for k in ("l2", "shallow", "l1_only", "none"))],
        *[[f"  served by {k}", n] for k, n in sorted(p["served_by"].items())],
        *[[f"  missing: {k}", n] for k, n in sorted(p["missing"].items())],
    ]
    out.print(_table(f"microstructure run  (data: {data_dir})", ["", "value"], rows))
    out.print(_table("feature batches", ["date", "snapshots", "features", "published", "reasons"],
                     [[b["date"], b["snapshots"], b["features"], b["published"], "; ".join(b["reasons"]) or "-"]
                      for b in summary["builds"]]))
    sample = summary["online_sample"]
    if sample:
        cols = ["symbol", "age_s", "stale", "spread_bps", "order_imbalance", "depth_imbalance", "depth_dollars",
                "book_levels", "has_recent_halt"]
        out.print(_table("online sample (Feast)", cols, [[r.get(c) for c in cols] for r in sample]))
    out.print(text(f"Data Docs: {summary['data_docs']}"))


@app.command("poll")
@_writes
def poll_cmd(
    data_dir: DataDir = DEFAULT_DATA,
    source: Annotated[Source, typer.Option(help="simulated, a vendor, chain (the fallback chain of "
                                                "--sources-config), or polygon-market (every US stock, "
                                                "one call a cycle).")] = Source.simulated,
    cycles: Annotated[int | None, typer.Option(help="Poll cycles (default 30 unless --until/--session).")] = None,
    until: Annotated[str | None, typer.Option(help="Live: stop at HH:MM New York time today.")] = None,
    session: Annotated[bool, typer.Option("--session", help="Live: poll today's exchange session (open to "
                                                            "close, holidays and half days from the "
                                                            "exchange calendar).")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between cycles; 0 = simulated clock.",
                                            callback=_in_range(0, DAY_S))] = 2.0,
    step: Annotated[float, typer.Option(help="Simulated seconds per cycle when --interval is 0.",
                                        callback=_in_range(0, DAY_S, lo_open=True))] = 2.0,
    symbols: Annotated[int, typer.Option(help="How many simulated symbols.")] = 150,
    symbol: Annotated[list[str] | None, typer.Option(help="A symbol to poll (repeatable); crypto as BTC/USD.")]
    = None,
    symbols_file: Annotated[Path | None, typer.Option(help="File with one symbol per line.")] = None,
    sources_config: Annotated[Path | None, typer.Option(help="Fallback chain TOML (default "
                                                             "<data-dir>/sources.toml, else built-in).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of a new simulated market (refused if the data dir "
                                                  "holds another).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start a new simulated market: removes the data dir's "
                                                        "lake, market state and online store first.")] = False,
    start: Annotated[str | None, typer.Option(help="ISO time of the first cycle (default: now).")] = None,
    online: Annotated[bool, typer.Option("--online/--no-online", help="Push each cycle to Feast.")] = True,
    ack_log: Annotated[Path | None, typer.Option(help="Append a line per acknowledged write.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Poll a source into the lake: the simulated book (continues the saved one unless --seed) or real vendors."""
    _quiet_libraries()
    start_ts = _parse_ts(start) if start else None
    syms = list(symbol or [])
    if syms or symbols_file is not None:
        from microstructure.sources.chain import check_symbols, read_symbols_file
        from microstructure.sources.vendor import ConfigError

        # Capped (count, length); a list for a vendor holds only characters a vendor symbol has.
        vendor = Source(source) is not Source.simulated
        try:
            if symbols_file is not None:
                syms += read_symbols_file(symbols_file, vendor=vendor)
            syms = check_symbols(syms, "--symbol/--symbols-file", vendor=vendor)
        except ConfigError as e:
            raise UserError(str(e)) from None
    end = _poll_end(until, session, interval, as_json)
    if end is False:
        return
    if cycles is None and end is None:
        cycles = 30
    stats = _do_poll(data_dir, cycles, interval, step, symbols, seed, fresh=fresh, online=online,
                     show_progress=not as_json, ack_log=ack_log, start=start_ts, source_kind=Source(source).value,
                     symbol_list=syms or None, sources_config=sources_config, until=end or None)
    d = stats.as_dict()
    if as_json:
        print(dumps(d))
    else:
        out.print(_table("poll", ["", "value"], [[k, v] for k, v in d.items()]))


def _poll_end(until: str | None, session: bool, interval: float, as_json: bool) -> dt.datetime | bool | None:
    """When a live poll stops: ``--until`` today, or today's session close. False: nothing to poll today
    (the reason is printed, exit 0: a scheduled run on a holiday is not a failure)."""
    from microstructure import session as sess

    if (until or session) and interval <= 0:
        raise UserError("--until and --session are for live polls (--interval > 0)")
    if until and session:
        raise UserError("give --until or --session, not both")
    now = dt.datetime.now(dt.UTC)
    if until:
        try:
            end = sess.until_today(until, now)
        except ValueError as e:
            raise UserError(str(e)) from None
        if end <= now:
            raise UserError(f"--until {until} New York time has already passed today")
        return end
    if not session:
        return None
    end = sess.await_session(now, on_wait=lambda start: err.print(f"waiting for the open at {start:%H:%M} UTC"))
    if isinstance(end, str):
        print(dumps({"polled": False, "reason": end}) if as_json else f"nothing to poll: {end}")
        return False
    return end


def _parse_ts(s: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError as e:
        raise UserError(f"not an ISO-8601 time: {s!r}") from e
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _date(s: str) -> dt.date:
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        raise UserError(f"not a date (YYYY-MM-DD): {s!r}") from None


def _days(paths: Any, dates: list[str] | None) -> list[dt.date]:
    from microstructure.lake import SNAPSHOTS

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
    from microstructure import pipeline
    from microstructure.checks import Checker

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
    from microstructure.checks import Checker

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
    from microstructure import pipeline

    paths = _paths(data_dir, must_exist=True)
    res = pipeline.compact_all(paths, _days(paths, date))
    _emit([{"partition": k, "files_before": v[0], "files_after": v[1]} for k, v in res.items()], "compaction", as_json)


@app.command()
def online(symbols: Annotated[list[str], typer.Argument(help="Symbols to look up.")],
           data_dir: DataDir = DEFAULT_DATA,
           freshness: Annotated[float, typer.Option(help="Seconds after which a row is stale.",
                                                    callback=_in_range(1e-3, 366 * DAY_S))] = 10.0,
           as_json: JsonOut = False) -> None:
    """Online features from Feast, with event time, age and a stale flag."""
    _quiet_libraries()
    from microstructure.sources.chain import check_symbols
    from microstructure.sources.vendor import ConfigError
    from microstructure.store import open_store, read_online

    try:
        symbols = check_symbols(symbols, "symbols", vendor=False)  # count and length capped, as for poll
    except ConfigError as e:
        raise UserError(str(e)) from None
    _paths(data_dir, must_exist=True)
    rows = [r.as_dict() for r in read_online(open_store(data_dir), symbols, freshness)]
    if as_json:
        print(dumps(rows))
        return
    cols = ["symbol", "found", "event_ts", "age_s", "stale", "source", "book_levels", "best_bid", "best_ask",
            "spread_bps", "order_imbalance", "depth_imbalance", "bid_depth", "ask_depth", "depth_dollars",
            "gap_pct", "has_recent_halt", *(["error"] if any(r.get("error") for r in rows) else [])]
    out.print(_table("online features", cols, [[r.get(c) for c in cols] for r in rows]))


@app.command("training-set")
def training_set_cmd(entities: Annotated[Path, typer.Option(help="CSV (optionally gzipped), Parquet or JSON: "
                                                                  "symbol, event_timestamp, labels...")],
                     out_path: Annotated[Path, typer.Option("--out", help="Parquet (.parquet) or CSV output.")],
                     data_dir: DataDir = DEFAULT_DATA,
                     batch_rows: Annotated[int, typer.Option(help="Entity rows joined at a time (memory follows "
                                                                  "this, not the file's size).", min=1_000,
                                                             max=10_000_000)] = 1_000_000) -> None:
    """Point-in-time-correct join of an entity file against the offline store, through Feast. The file is read
    as a stream and joined --batch-rows rows at a time; rows come out in the entity file's order."""
    _quiet_libraries()

    from microstructure.store import open_store, write_training_set

    if not entities.is_file():
        raise UserError(f"no such entity file: {entities}")
    if not _paths(data_dir, must_exist=True).has("features"):
        raise UserError("no published features yet: run `microstructure run` or `build-features` first")
    # CSV output: text cells that a spreadsheet would run as a formula are guarded (output.csv_table).
    rows, joined = write_training_set(open_store(data_dir), entities, out_path, batch_rows=batch_rows)
    err.print(text(f"{rows} rows, {joined} with features -> {out_path}"))


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
    from microstructure import shell

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
        from microstructure.output import csv_frame

        print(csv_frame(df).to_csv(index=False), end="")
    else:
        out.print(_table("", list(df.columns), df.astype(object).where(df.notna(), None).values.tolist()))




@app.command()
@_writes
def backfill(files: Annotated[list[Path], typer.Argument(help="Recorded file(s) (or a LOBSTER / snapshot folder); "
                                                             "binance-depth: the files of one continuous stream.")],
             data_dir: DataDir = DEFAULT_DATA,
             fmt: Annotated[Format, typer.Option("--format", help="What the file is.")] = Format.lobster,
             symbol: Annotated[str | None, typer.Option(help="Set (wide, lobster) or select (iex-deep) the symbol.")]
             = None,
             cadence: Annotated[float, typer.Option(help="Seconds between sampled snapshots (lobster, iex-deep, "
                                                            "binance-depth).",
                                                       callback=_in_range(0, DAY_S, lo_open=True))]
             = 1.0,
             as_json: JsonOut = False) -> None:
    """Load a recorded order-book file into the lake through the same validation and quarantine. Idempotent."""
    from microstructure.ingest import backfill as load

    fmt = Format(fmt).value
    for path in files:
        if not path.exists():
            raise UserError(f"no such file or folder: {path}")
    from microstructure.sources.files import check_cadence

    check_cadence(cadence)  # the sane minimum (1 ms) and maximum: one `error:` line before anything is read
    paths = _paths(data_dir)
    with _progress(None, "loading", not as_json) as prog:  # streamed: the row count is not known upfront
        task = prog.add_task("load", total=None)
        if fmt == "binance-depth":
            from microstructure.sources.binance import read_binance_depth

            batches: Any = read_binance_depth(list(files), cadence, symbol)
        elif fmt == "hyperliquid-l2":
            from microstructure.sources.binance import read_hyperliquid_l2

            batches = read_hyperliquid_l2(list(files), cadence, symbol)
        else:
            batches = (b for f in files for b in _read_recorded(f, fmt, symbol, cadence))
        # Readers raise FileFormatError (an InputError) naming the file and position; ``load`` adds what the lake
        # kept before it. main prints it as one `error:` line, exit 2.
        st = load(paths, batches, on_batch=lambda s: prog.update(task, completed=s.sampled))
    res = {"file": ", ".join(str(f) for f in files), "format": fmt, "sampled": st.sampled, "written": st.written,
           "already_in_lake_or_unchanged": st.duplicates, "quarantined": dict(st.quarantined),
           "symbols": len(st.symbols), "dates": sorted(st.dates)}
    _emit([res], "backfill", as_json)


def _read_recorded(path: Path, fmt: str, symbol: str | None, cadence: float) -> Any:
    """The file as a stream of ``Batch``es: every format is read batch by batch, in bounded memory."""
    if fmt == "wide":
        from microstructure.sources.files import read_wide

        return read_wide(path, symbol)
    if fmt == "snapshots":
        from microstructure.sources.files import read_snapshot_file

        return read_snapshot_file(path)
    if fmt == "lobster":
        from microstructure.sources.lobster import iter_lobster

        return iter_lobster(path, cadence, symbol)
    from microstructure.sources.iex_deep import iter_iex_deep

    return iter_iex_deep(path, cadence, {symbol} if symbol else None)


@app.command()
def coverage(data_dir: DataDir = DEFAULT_DATA,
             since: Annotated[str | None, typer.Option(help="ISO time: window start (default: all data).")] = None,
             until: Annotated[str | None, typer.Option(help="ISO time: window end.")] = None,
             as_json: JsonOut = False) -> None:
    """Per source and overall: symbols with L2 (>= 5 levels), shallow (2-4), L1 only, and none."""
    from microstructure.coverage import coverage as cov

    paths = _paths(data_dir, must_exist=True)
    res = cov(paths, _parse_ts(since) if since else None, _parse_ts(until) if until else None)
    if as_json:
        print(dumps(res))
        return
    cols = ["source", "l2", "shallow", "l1_only", "snapshots", "failed_calls"]
    out.print(_table("coverage by source (symbols by the most levels served)", cols,
                     [[r[c] for c in cols] for r in res["sources"]]))
    o = res["overall"]
    out.print(_table("overall", ["symbols", "l2", "shallow", "l1_only", "none"],
                     [[o["symbols"], o["l2"], o["shallow"], o["l1_only"], o["none"]]]))
    if o["none_symbols"]:
        out.print(text("no source served: " + ", ".join(o["none_symbols"])))


@app.command()
def evaluate(data_dir: DataDir = DEFAULT_DATA,
             out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default "
                                                                       "<data-dir>/report).")] = None,
             horizon: Annotated[int, typer.Option(help="ML label horizon, seconds.")] = 60,
             order_notional: Annotated[float, typer.Option(help="Order size for the headline, dollars.",
                                                           callback=_in_range(0, 1e12, lo_open=True))] = 50_000,
             source: Annotated[str | None, typer.Option(help="Only snapshots from this source.")] = None,
             symbol: Annotated[list[str] | None, typer.Option(help="Only these symbols (repeatable).")] = None,
             seed: Annotated[int, typer.Option(help="Seed of the random picks and bootstraps.")] = 0,
             as_json: JsonOut = False) -> None:
    """Measure the roadmap's claims on what is in the lake; write report.md, PNG plots and the headline table."""
    _quiet_libraries()
    from microstructure import report
    from microstructure.evaluate import evaluate as run_eval

    paths = _paths(data_dir, must_exist=True)
    if not paths.has("features"):
        raise UserError(f"no published features in {paths.root}: run `microstructure run` or `build-features`")
    if horizon <= 0 or order_notional <= 0:
        raise UserError("--horizon and --order-notional must be > 0")
    with err.status("evaluating...", spinner="dots") if not as_json else _null() as st:
        res = run_eval(paths, horizon_s=horizon, order_notional=order_notional, seed=seed, source=source,
                       symbols=symbol or None,
                       progress=(lambda s: st.update(f"evaluating: {s}...")) if st else (lambda s: None))
        target = report.write_report(res, out_dir or paths.data_dir / "report")
        _save_model(res, paths)
    if as_json:
        print(dumps({"data": res["data"]["label"], "report": str(target), "headline": res["headline"]}))
        return
    out.print(text(f"data: {res['data']['label']}"))
    out.print(_table("roadmap claims", ["claim", "target", "measured", "95% CI", "verdict"],
                     report.headline_rows(res)))
    out.print(text(f"report: {target}"))


def _save_model(res: dict[str, Any], paths: Any) -> None:
    """Keep the scoring model trained by ``evaluate`` for ``picks --score``."""
    model = res.get("_model")
    if model is not None:
        from microstructure.lake import atomic_write_bytes
        from microstructure.scoring import MODEL_PATH, dump_model

        # JSON numbers, never a pickle: a data dir's files are data, and unpickling one runs code.
        atomic_write_bytes(dump_model(model), paths.data_dir / MODEL_PATH)


@app.command()
def picks(in_path: Annotated[Path, typer.Option("--in", help="Picks: CSV, JSON or Parquet (symbol, side, score, "
                                                              "mode[, notional, as_of]).")],
          data_dir: DataDir = DEFAULT_DATA,
          config: Annotated[Path | None, typer.Option(help="Thresholds TOML (default <data-dir>/microstructure.toml)")]
          = None,
          score: Annotated[bool, typer.Option("--score", help="Add the entry model's P(up over H) and a side-aware "
                                                             "score (train it with `evaluate`).")] = False,
          as_json: JsonOut = False) -> None:
    """Attach order-book features to picks; keep or drop each with the filter and reason; mark risky ones."""
    _quiet_libraries()
    from microstructure import picks as pk
    from microstructure.config import load_threshold_set
    from microstructure.service import MicrostructureService

    try:
        df = pk.read_picks(in_path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    svc = MicrostructureService(data_dir, load_threshold_set(config or data_dir / "microstructure.toml"))
    res = pk.evaluate(df, svc)
    if score:
        from microstructure.scoring import ModelMissing, score_picks

        try:
            score_picks(res, svc.paths)
        except ModelMissing as e:
            raise UserError(str(e)) from None
    summ = pk.summary(res)
    if as_json:
        print(dumps({"summary": summ, "picks": res}))
        return
    cols = ["symbol", "side", "mode", "status", "filter", "reason", "microstructure_risky", "spread_bps",
            "depth_dollars", "order_imbalance", *(["model_p_up", "model_score"] if score else [])]
    out.print(_table("picks", cols, [[r.get(c) for c in cols] for r in res]))
    risky = [[r["symbol"], "; ".join(r["risk_reasons"])] for r in res if r["status"] == "kept" and r["risk_reasons"]]
    if risky:
        out.print(_table("kept but microstructure risky", ["symbol", "why"], risky))
    out.print(_table("summary", ["", "value"], [[k, v] for k, v in summ.items()]))


def _connect(paths: Any) -> Any:
    from microstructure.lake import connect

    return connect(paths)


def _emit(rows: list[dict[str, Any]], title: str, as_json: bool) -> None:
    if as_json:
        print(dumps(rows))
    elif rows:
        out.print(_table(title, list(rows[0].keys()), [list(r.values()) for r in rows]))
    else:
        out.print(text(f"{title}: nothing to do"))


def main() -> None:
    # Typer vendors its own click; its public names cover Exit/Abort, the usage errors live here.
    from typer._click import exceptions as cx

    from microstructure.output import InputError, visible  # an error line shows data's control characters escaped
    from microstructure.sources.vendor import scrub  # ...and never a key (a vendor's answer may echo one)

    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except (UserError, InputError) as e:
        print(visible(scrub(f"error: {e}".splitlines()[0])), file=sys.stderr)
        sys.exit(2)
    except cx.NoArgsIsHelpError:
        sys.exit(0)
    except cx.UsageError as e:  # a bad option or choice: one line, with where to look
        cmd = f"microstructure {e.ctx.info_name} --help" if e.ctx and e.ctx.parent else "microstructure --help"
        print(visible(scrub(f"error: {e.format_message()} (see `{cmd}`)".splitlines()[0])), file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # one line for the user; MICROSTRUCTURE_DEBUG=1 for the traceback
        if os.environ.get("MICROSTRUCTURE_DEBUG"):
            raise
        print(visible(scrub(f"error: {type(e).__name__}: {e}".splitlines()[0])), file=sys.stderr)
        sys.exit(1)
