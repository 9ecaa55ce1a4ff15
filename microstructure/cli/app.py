"""The command line's frame: the Typer app, its shared options and the rules every command follows.
"""

from __future__ import annotations

import datetime as dt
import enum
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from microstructure.recorded.registry import FORMATS

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
    databento = "databento"  # live MBP-10 (10 levels) for US stocks
    ccxt = "ccxt"  # the sources file's ccxt venues only
    chain = "chain"
    polygon_market = "polygon-market"  # every US stock from one snapshot-all call


class Engine(enum.StrEnum):
    duckdb = "duckdb"
    spark = "spark"


# `backfill --format`: one member per recorded format, in the registry's order (the one list of formats is
# ``recorded.registry.FORMATS``). Built from it, so mypy cannot see the members: name one with Format("lobster").
Format = enum.StrEnum("Format", [(name.replace("-", "_"), name) for name in FORMATS])  # type: ignore[misc]


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


NOT_FOUND_EXIT = 1  # docs/cli.md "Exit codes": the command ran and printed its answer, but a symbol had no data


def _not_found(symbols: list[str], what: str) -> None:
    """End a command that looked up symbols: if any had no data, one ``not found:`` line on stderr (the answer,
    found false for them, is already printed in full) and exit 1, so a script can tell without parsing it."""
    names = list(dict.fromkeys(symbols))
    if names:
        from microstructure.contract.text import visible

        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        print(visible(f"not found: {', '.join(names[:10])}{more} ({what})"), file=sys.stderr)
        raise typer.Exit(NOT_FOUND_EXIT)


def _in_range(lo: float, hi: float, lo_open: bool = False) -> Any:
    """A callback for a float option: a finite number in [lo, hi] ((lo, hi] with ``lo_open``). The parser's
    float() takes "nan" and "inf", and a NaN compares false with every limit (``--freshness nan`` called any book
    fresh): they are usage errors, one line, exit 2."""

    def check(value: float | None) -> float | None:
        from microstructure.contract.inputs import InputError
        from microstructure.trading.thresholds import bounded

        if value is None:
            return None
        try:
            return bounded("value", value, lo, hi, lo_open=lo_open)
        except InputError as e:
            raise typer.BadParameter(str(e).removeprefix("value ")) from None

    return check




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
        from microstructure.lake import datadir

        data_dir = kwargs.get("data_dir", DEFAULT_DATA)
        try:
            if kwargs.get("fresh") and Path(data_dir).exists():  # refuse before touching a foreign folder at all
                datadir.ensure_marker(Path(data_dir))
                datadir.require_ours(Path(data_dir))
            before = getattr(fn, "before_lock", None)  # usage checks: a mistyped command creates no data dir
            if before is not None:
                before(**kwargs)
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
    from microstructure.lake.paths import LakePaths

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


def _connect(paths: Any) -> Any:
    from microstructure.lake.views import connect

    return connect(paths)
