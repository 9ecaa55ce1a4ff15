"""Commands that bring books into the lake: run, poll, backfill.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from microstructure.cli.app import (
    DEFAULT_DATA,
    DataDir,
    Format,
    JsonOut,
    Source,
    UserError,
    _in_range,
    _not_found,
    _parse_ts,
    _paths,
    _quiet_libraries,
    _writes,
    app,
    err,
    out,
)
from microstructure.cli.render import _emit, _null, _print_summary, _progress, _table
from microstructure.contract.text import dumps
from microstructure.trading.thresholds import DAY_S


# ---- poll / run --------------------------------------------------------------------------------
def _do_poll(data_dir: Path, cycles: int | None, interval: float, step: float | None, symbols: int,
             seed: int | None, fresh: bool, online: bool, show_progress: bool, **kw: Any) -> Any:
    """``runner.run_poll`` with a progress bar; its PollError is a user error (one line, exit 2)."""
    from microstructure.jobs import runner

    with _progress(cycles, "polling", show_progress) as prog:
        task = prog.add_task("poll", total=cycles)
        try:
            return runner.run_poll(data_dir.resolve(), cycles, interval, step, symbols, seed, fresh, online,
                               on_cycle=lambda i, s: prog.update(task, completed=i + 1), **kw)
        except runner.PollError as e:
            raise UserError(str(e)) from None


OnlineStore = Annotated[str | None, typer.Option(
    "--online-store", metavar="URL|sqlite",
    help="Change the data dir's recorded online store (redis://host:6379/0, rediss://..., or sqlite). Without "
         "it the data dir keeps the store it was made with; a password stays in the environment.")]


def _change_online_store(data_dir: Path, url: str | None) -> None:
    """``--online-store``: rewrite the data dir's record (we hold its writer lock) and say so on stderr."""
    if url is None:
        return
    from microstructure.lake.settings import change_online

    old, new = change_online(data_dir, url)
    if old != new:
        err.print(f"online store: {old} -> {new}", markup=False, highlight=False)


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
    online_store: OnlineStore = None,
    as_json: JsonOut = False,
) -> None:
    """The main job on the embedded simulated source: poll, lake, features, checks, Feast; then a summary.

    A data dir that already holds a market is continued (up to now), never mixed with a new one."""
    _quiet_libraries()
    paths = _paths(data_dir)
    _change_online_store(paths.data_dir, online_store)
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
        from microstructure.jobs.runner import online_sample

        summary.update(online_sample(paths.data_dir, online_syms))
    _print_summary(summary, data_dir, as_json)


def _offline(paths: Any, days: list[dt.date], show: bool) -> dict[str, Any]:
    from microstructure.checks.ge import Checker
    from microstructure.jobs import build as pipeline

    with err.status("building features, checking, publishing...", spinner="dots") if show else _null():
        builds = pipeline.build_and_publish(paths, days, Checker(paths.data_dir / "gx"))
        compacted = pipeline.compact_all(paths, days)
    return {"builds": [b.as_dict() for b in builds], "compacted": {k: list(v) for k, v in compacted.items()}}


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
    start: Annotated[str | None, typer.Option(help="ISO time of the first cycle, UTC unless it carries an offset "
                                                                "(default: now).")] = None,
    online: Annotated[bool, typer.Option("--online/--no-online", help="Push each cycle to Feast.")] = True,
    ack_log: Annotated[Path | None, typer.Option(help="Append a line per acknowledged write.")] = None,
    online_store: OnlineStore = None,
    metrics_port: Annotated[int | None, typer.Option(envvar="MICROSTRUCTURE_METRICS_PORT",
                                                     help="Serve Prometheus metrics on this port (/metrics) while "
                                                          "polling.")] = None,
    metrics_host: Annotated[str | None, typer.Option(envvar="MICROSTRUCTURE_METRICS_HOST",
                                                     help="Address the metrics endpoint binds (default 127.0.0.1: "
                                                          "this machine only; 0.0.0.0 for every interface).")]
    = None,
    log_format: Annotated[str | None, typer.Option(envvar="MICROSTRUCTURE_LOG_FORMAT", metavar="text|json",
                                                   help="Progress on stderr: text (a summary line a minute when "
                                                        "stderr is no terminal; a progress bar when it is) or "
                                                        "json (a JSON line per cycle and per warning).")] = None,
    as_json: JsonOut = False,
) -> None:
    """Poll a source into the lake: the simulated book (continues the saved one unless --seed) or real vendors."""
    _quiet_libraries()
    _change_online_store(data_dir, online_store)
    log = _poll_log(log_format)  # checked before a --session waits for the open
    start_ts = _parse_ts(start) if start else None
    syms = list(symbol or [])
    if syms or symbols_file is not None:
        from microstructure.sources.symbol_lists import check_symbols, read_symbols_file
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
    if metrics_port is not None and not as_json:
        from microstructure.jobs.metrics import DEFAULT_HOST

        err.print(f"metrics: http://{metrics_host or DEFAULT_HOST}:{metrics_port}/metrics")
    stats = _do_poll(data_dir, cycles, interval, step, symbols, seed, fresh=fresh, online=online,
                     show_progress=not as_json and log is None, log_format=log,
                     ack_log=ack_log, start=start_ts, source_kind=Source(source).value,
                     symbol_list=syms or None, sources_config=sources_config, until=end or None,
                     metrics_port=metrics_port, metrics_host=metrics_host)
    d = stats.as_dict()
    if as_json:
        print(dumps(d))
    else:
        out.print(_table("poll", ["", "value"], [[k, v] for k, v in d.items()]))
    # A symbol the user named that no source served in any cycle (unknown to every source, or never answered).
    _not_found([s for s in syms if stats.levels.get(s) == 0], "no source served it in any cycle")


def _poll_log(value: str | None) -> str | None:
    """The poll's log lines on stderr: json always when asked; text only when stderr is no terminal (piped, a
    service's log), where the progress bar cannot draw; None: the progress bar."""
    import sys

    from microstructure.jobs.logs import LogFormatError, log_format_from

    try:
        fmt = log_format_from(value)
    except LogFormatError as e:
        raise UserError(f"--log-format: {e}") from None
    if fmt == "json" or not sys.stderr.isatty():
        return fmt
    return None


def _poll_end(until: str | None, session: bool, interval: float, as_json: bool) -> dt.datetime | bool | None:
    """When a live poll stops: ``--until`` today, or today's session close. False: nothing to poll today
    (the reason is printed, exit 0: a scheduled run on a holiday is not a failure)."""
    from microstructure.contract import calendar as sess

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
    close = sess.await_session(now, on_wait=lambda start: err.print(f"waiting for the open at {start:%H:%M} UTC"))
    if isinstance(close, str):
        print(dumps({"polled": False, "reason": close}) if as_json else f"nothing to poll: {close}")
        return False
    return close


@app.command()
@_writes
def backfill(files: Annotated[list[Path] | None, typer.Argument(
                 help="Recorded file(s) (or a LOBSTER / snapshot folder); binance-depth: the files of one "
                      "continuous stream. None with --from databento.")] = None,
             fmt: Annotated[Format | None, typer.Option("--format", help="What the file is (required with files: a "
                                                                        "guess could load a file as the wrong "
                                                                        "format).")] = None,
             data_dir: DataDir = DEFAULT_DATA,
             symbol: Annotated[list[str] | None, typer.Option(
                 help="Repeatable. Set (wide, lobster: one for every file or one per file; binance-depth, "
                      "hyperliquid-l2: one) or select (iex-deep, dbn: every one given) the symbol.")] = None,
             cadence: Annotated[float, typer.Option(help="Seconds between sampled snapshots (lobster, iex-deep, "
                                                            "binance-depth, hyperliquid-l2, dbn, --from databento).",
                                                       callback=_in_range(0, DAY_S, lo_open=True))]
             = 1.0,
             source: Annotated[str | None, typer.Option(
                 "--from", metavar="databento", help="Fetch instead of reading files: databento (historical "
                                                     "MBP-10; key from DATABENTO_API_KEY).")] = None,
             dataset: Annotated[str | None, typer.Option(help="--from databento: the dataset (XNAS.ITCH, ...).")]
             = None,
             symbols: Annotated[str | None, typer.Option(help="--from databento: comma-separated symbols.")] = None,
             start: Annotated[str | None, typer.Option(help="--from databento: ISO-8601 start, inclusive (naive "
                                                            "= UTC).")] = None,
             end: Annotated[str | None, typer.Option(help="--from databento: ISO-8601 end, exclusive (naive = "
                                                          "UTC).")] = None,
             as_json: JsonOut = False) -> None:
    """Load a recorded order-book file (or a Databento historical request) into the lake through the same
    validation and quarantine. Idempotent."""
    from microstructure.jobs.ingest import backfill as load

    _backfill_usage(files, fmt, source, dataset, symbols, start, end, cadence)
    if source is not None:
        from microstructure.recorded.databento_historical import fetch_mbp10

        sym_list = [s.strip() for s in (symbols or "").split(",") if s.strip()]
        assert start is not None and end is not None
        batches = fetch_mbp10(dataset or "", sym_list, _parse_ts(start), _parse_ts(end), cadence)
        name, what = "databento-historical", f"databento {dataset} {','.join(sym_list)} {start} .. {end}"
    else:
        assert files and fmt is not None
        from microstructure.recorded.registry import FORMATS

        name = Format(fmt).value
        batches = FORMATS[name](list(files), cadence, list(symbol or []))
        what = ", ".join(str(f) for f in files)
    paths = _paths(data_dir)
    with _progress(None, "loading", not as_json) as prog:  # streamed: the row count is not known upfront
        task = prog.add_task("load", total=None)
        # Readers raise FileFormatError (an InputError) naming the file and position; ``load`` adds what the lake
        # kept before it. main prints it as one `error:` line, exit 2.
        st = load(paths, batches, on_batch=lambda s: prog.update(task, completed=s.sampled))
    res = {"file": what, "format": name, "sampled": st.sampled, "written": st.written,
           "already_in_lake_or_unchanged": st.duplicates, "quarantined": dict(st.quarantined),
           "symbols": len(st.symbols), "dates": sorted(st.dates)}
    _emit([res], "backfill", as_json)


def _backfill_usage(files: list[Path] | None, fmt: Any, source: str | None, dataset: str | None,
                    symbols: str | None, start: str | None, end: str | None, cadence: float = 1.0,
                    symbol: list[str] | None = None, **_: Any) -> None:
    """backfill's usage checks, run before the data dir is locked (or created): one `error:` line, exit 2."""
    from microstructure.recorded.bounds import check_cadence
    from microstructure.recorded.registry import FORMATS

    check_cadence(cadence)  # the sane minimum (1 ms) and maximum: one `error:` line before anything is read
    if source is not None:
        if source != "databento":
            raise UserError(f"--from {source[:40]!r}: backfill fetches from databento only")
        if files or fmt or symbol:
            raise UserError("--from databento fetches its data: give no files, --format or --symbol (its symbols "
                            "are --symbols A,B)")
        if not (start and end):
            raise UserError("--from databento needs --start and --end")
        from microstructure.recorded.databento_historical import check_config, check_request

        check_request(dataset or "", [s.strip() for s in (symbols or "").split(",") if s.strip()], _parse_ts(start),
                      _parse_ts(end))
        check_config()  # no key, or a refused URL: refused before the data dir is created
        return
    if fmt is None:
        raise UserError(f"Missing option '--format' (one of: {', '.join(FORMATS)}): a guess could load a file as "
                        "the wrong format")
    if not files:
        raise UserError("give the recorded file(s) (or --from databento)")
    if dataset or symbols or start or end:
        raise UserError("--dataset, --symbols, --start and --end go with --from databento")
    for path in files:
        if not path.exists():
            raise UserError(f"no such file or folder: {path}")


backfill.__wrapped__.before_lock = _backfill_usage  # read by _writes before it locks the data dir

