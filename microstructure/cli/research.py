"""Commands for research and use: evaluate, picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
from microstructure.cli.render import _null, _table
from microstructure.contract.text import dumps, text


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
    from microstructure.research import report
    from microstructure.research.evaluate import evaluate as run_eval

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
        from microstructure.contract.atomic import atomic_write_bytes
        from microstructure.trading.scoring import MODEL_PATH, dump_model

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
          refresh: Annotated[bool, typer.Option("--refresh", help="Poll the source once for a symbol whose online "
                                                                 "book is missing or stale (writes to the lake); "
                                                                 "without it picks only reads.")] = False,
          as_json: JsonOut = False) -> None:
    """Attach order-book features to picks; keep or drop each with the filter and reason; mark risky ones. Exit 1
    if a pick's symbol has no order-book data, after printing every pick."""
    _quiet_libraries()
    from microstructure.trading import picks as pk
    from microstructure.trading.service import MicrostructureService
    from microstructure.trading.thresholds import load_threshold_set

    try:
        df = pk.read_picks(in_path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    svc = MicrostructureService(data_dir, load_threshold_set(config or data_dir / "microstructure.toml"),
                                refresh=refresh)
    res = pk.check_picks(df, svc)
    if score:
        from microstructure.trading.scoring import ModelMissing, score_picks

        try:
            score_picks(res, svc.paths)
        except ModelMissing as e:
            raise UserError(str(e)) from None
    summ = pk.summary(res)
    no_data = [str(r["symbol"]) for r in res if r["filter"] == "no_data"]
    if as_json:
        print(dumps({"summary": summ, "picks": res}))
        _not_found(no_data, "no order-book data; dropped")
        return
    cols = ["symbol", "side", "mode", "status", "filter", "reason", "microstructure_risky", "spread_bps",
            "depth_dollars", "order_imbalance", *(["model_p_up", "model_score"] if score else [])]
    out.print(_table("picks", cols, [[r.get(c) for c in cols] for r in res]))
    risky = [[r["symbol"], "; ".join(r["risk_reasons"])] for r in res if r["status"] == "kept" and r["risk_reasons"]]
    if risky:
        out.print(_table("kept but microstructure risky", ["symbol", "why"], risky))
    out.print(_table("summary", ["", "value"], [[k, v] for k, v in summ.items()]))
    _not_found(no_data, "no order-book data; dropped")
