"""Day-trading picks meet the order book: attach features, apply filters, mark microstructure risk.

Input columns: ``symbol, side, score, mode`` and optional ``notional``, ``as_of``. A row with ``as_of`` gets
its features point-in-time from the offline store through Feast (what a backtest sees); a row without one
gets them from the online store through ``MicrostructureService``. A bad row gets a per-row error and the
good rows still go through.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from microstructure.sources.symbol_lists import MAX_SYMBOL_CHARS
from microstructure.trading.filters import apply_filters, risk_marking
from microstructure.trading.service import MicrostructureService
from microstructure.trading.thresholds import normalise_mode

SIDES = {"buy": "buy", "long": "buy", "sell": "sell", "short": "sell"}
SHOWN = ["spread_bps", "depth_dollars", "order_imbalance", "depth_imbalance", "bid_depth", "ask_depth", "gap_pct",
         "has_recent_halt",
         "book_levels", "age_s"]


REQUIRED = ("symbol", "side", "score")


# A picks file is a day's candidates: tens to thousands of rows. The caps keep a crafted file (a gzip bomb, one
# huge field) from reaching memory or the screen; they are far above any real list.
MAX_PICKS = 100_000
MAX_PICKS_BYTES = 32 << 20  # decompressed
MAX_FIELD_CHARS = 256  # any other text cell (side, mode, as_of, ...)


def read_picks(path: Path) -> pd.DataFrame:
    """The picks file, or one InputError for the file (missing columns are a file problem, not a row's).
    Bounded: ``MAX_PICKS`` rows, ``MAX_PICKS_BYTES`` decompressed, symbols of ``MAX_SYMBOL_CHARS`` and other
    text of ``MAX_FIELD_CHARS`` characters at most."""
    from microstructure.contract.inputs import InputError, read_frame

    df = read_frame(path, "picks", max_rows=MAX_PICKS, max_bytes=MAX_PICKS_BYTES)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"picks file {path} lacks column(s) {missing}; a picks file has symbol, side, score "
                         "(and optional mode, notional, as_of)")
    for col in df.columns:
        if df[col].dtype != object:
            continue
        cap = MAX_SYMBOL_CHARS if col == "symbol" else MAX_FIELD_CHARS
        lengths = df[col].map(lambda v: len(v) if isinstance(v, str) else 0)
        if lengths.max() > cap:
            i = int(lengths.to_numpy().argmax())
            raise InputError(f"picks file {path} row {i + 1}: {str(col)[:40]} is {lengths.iloc[i]:,} characters "
                             f"long; at most {cap} are allowed")
    return df


def _check_row(r: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    sym = r.get("symbol")
    if sym is None or (isinstance(sym, float) and math.isnan(sym)) or not str(sym).strip():
        return None, "missing symbol"
    side = SIDES.get(str(r.get("side", "")).strip().lower())
    if side is None:
        return None, f"unknown side {r.get('side')!r}: use buy or sell"
    try:
        mode = normalise_mode(r.get("mode", ""))
    except ValueError as e:
        return None, str(e)
    try:
        score = float(r["score"])
    except (KeyError, TypeError, ValueError):  # no score, None, or not a number
        return None, f"score {r.get('score')!r} is not a number"
    if not math.isfinite(score):
        return None, f"score {r.get('score')!r} is not a finite number"
    notional = r.get("notional")
    if notional is not None and not (isinstance(notional, float) and math.isnan(notional)):
        try:
            notional = float(notional)
        except (TypeError, ValueError):
            return None, f"notional {r.get('notional')!r} is not a number"
        if notional < 0 or math.isnan(notional):
            return None, f"notional must be >= 0, got {notional:g}"
    else:
        notional = None
    as_of = r.get("as_of")
    if as_of is not None and not (isinstance(as_of, float) and math.isnan(as_of)) and str(as_of).strip():
        ts = pd.to_datetime(as_of, utc=True, errors="coerce")
        if pd.isna(ts):
            return None, f"as_of {as_of!r} is not a time"
        as_of = ts
    else:
        as_of = None
    return {"symbol": str(sym).strip(), "side": side, "mode": mode, "score": score, "notional": notional,
            "as_of": as_of}, None


def check_picks(picks: pd.DataFrame, service: MicrostructureService) -> list[dict[str, Any]]:
    rows = picks.to_dict("records")
    checked = [_check_row(r) for r in rows]
    pit = _point_in_time(service, [c for c, _ in checked if c is not None and c["as_of"] is not None])
    out = []
    t = service.thresholds
    for i, (c, error) in enumerate(checked):
        if c is None:
            out.append({"row": i, **{k: rows[i].get(k) for k in ("symbol", "side", "score", "mode")},
                        "status": "error", "filter": None, "reason": error, "microstructure_risky": None,
                        "risk_reasons": []})
            continue
        f = pit[(c["symbol"], c["as_of"])] if c["as_of"] is not None else service.get_order_book_features(c["symbol"])
        base = {"row": i, **c, "as_of": c["as_of"].isoformat() if c["as_of"] is not None else None,
                **{k: f.get(k) for k in SHOWN}}
        if not f.get("found"):
            out.append({**base, "status": "dropped", "filter": "no_data",
                        "reason": f.get("error") or "no order-book data", "microstructure_risky": True,
                        "risk_reasons": ["no order-book data"]})
            continue
        if f["stale"]:
            out.append({**base, "status": "dropped", "filter": "stale",
                        "reason": (f"book is {f['age_s']:.0f} s old" if f.get("age_s") is not None
                                   else "book age unknown") + f" (limit {t.freshness_s:g} s)",
                        "microstructure_risky": True, "risk_reasons": ["book is stale"]})
            continue
        v = apply_filters(f, c["mode"], t)
        risk = risk_marking(f, c["side"], t, stale=False)
        out.append({**base, "status": "kept" if v.kept else "dropped", "filter": v.filter, "reason": v.reason,
                    "microstructure_risky": risk.risky, "risk_reasons": risk.reasons})
    return out


def _point_in_time(service: MicrostructureService, rows: list[dict[str, Any]]
                   ) -> dict[tuple[str, dt.datetime], dict[str, Any]]:
    """(symbol, as_of) -> the features Feast's point-in-time join found for it, with found/age_s/stale."""
    if not rows:
        return {}
    from microstructure.store.training import training_set

    ents = pd.DataFrame({"symbol": [r["symbol"] for r in rows], "event_timestamp": [r["as_of"] for r in rows]})
    joined = training_set(service.store, ents)
    out = {}
    for r, (_, j) in zip(rows, joined.iterrows(), strict=True):
        f = {k: (None if _isna(v) else v) for k, v in j.items()}
        ev = f.get("event_ts")
        found = ev is not None
        age = (r["as_of"] - ev).total_seconds() if found else None
        out[(r["symbol"], r["as_of"])] = {**f, "found": found, "age_s": age,
                                          "stale": age is None or age > service.thresholds.freshness_s}
    return out


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    status = Counter(r["status"] for r in results)
    by_filter = Counter(r["filter"] for r in results if r["status"] == "dropped")
    return {"picks": len(results), "kept": status["kept"], "dropped": status["dropped"], "errors": status["error"],
            "risky_kept": sum(1 for r in results if r["status"] == "kept" and r["microstructure_risky"]),
            "dropped_by_filter": dict(by_filter)}
