"""Commands that read what is served: online, training-set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microstructure.cli.app import (
    DEFAULT_DATA,
    DataDir,
    JsonOut,
    UserError,
    _in_range,
    _not_found,
    _paths,
    _quiet_libraries,
    app,
    err,
    out,
)
from microstructure.cli.render import _table
from microstructure.contract.catalogue import FRESHNESS_S
from microstructure.contract.text import dumps, text
from microstructure.trading.thresholds import BOUNDS


@app.command()
def online(symbols: Annotated[list[str], typer.Argument(help="Symbols to look up.")],
           data_dir: DataDir = DEFAULT_DATA,
           freshness: Annotated[float, typer.Option(help="Seconds after which a row is stale.",
                                                    callback=_in_range(*BOUNDS["freshness_s"]))] = FRESHNESS_S,
           as_json: JsonOut = False) -> None:
    """Online features from Feast, with event time, age and a stale flag. Exit 1 if a symbol has no online row
    (found false), after printing every row."""
    _quiet_libraries()
    from microstructure.sources.symbol_lists import check_symbols
    from microstructure.sources.vendor import ConfigError
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    try:
        symbols = check_symbols(symbols, "symbols", vendor=False)  # count and length capped, as for poll
    except ConfigError as e:
        raise UserError(str(e)) from None
    _paths(data_dir, must_exist=True)
    read = read_online(open_store(data_dir), symbols, freshness)
    rows = [r.as_dict() for r in read]
    missing = [r.symbol for r in read if not r.found]
    if as_json:
        print(dumps(rows))
        _not_found(missing, "no online row that can be served")
        return
    for r, o in zip(rows, read, strict=True):  # the book's time as a time (as_dict has its ISO text): read as UTC
        r["event_ts"] = o.event_ts
    cols = ["symbol", "found", "event_ts", "age_s", "stale", "source", "book_levels", "best_bid", "best_ask",
            "spread_bps", "order_imbalance", "depth_imbalance", "bid_depth", "ask_depth", "depth_dollars",
            "gap_pct", "has_recent_halt", *(["error"] if any(r.get("error") for r in rows) else [])]
    out.print(_table("online features", cols, [[r.get(c) for c in cols] for r in rows], transpose=True))
    _not_found(missing, "no online row that can be served")


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

    from microstructure.store.repo import open_store
    from microstructure.store.training import write_training_set

    if not entities.is_file():
        raise UserError(f"no such entity file: {entities}")
    if not _paths(data_dir, must_exist=True).has("features"):
        raise UserError("no published features yet: run `microstructure run` or `build-features` first")
    # CSV output: text cells that a spreadsheet would run as a formula are guarded (output.csv_table).
    rows, joined = write_training_set(open_store(data_dir), entities, out_path, batch_rows=batch_rows)
    err.print(text(f"{rows} rows, {joined} with features -> {out_path}"))
