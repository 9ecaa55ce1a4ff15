"""Thin glue for ML scoring: the five microstructure features, in the order a model expects."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microstructure import lake
from microstructure.transforms import ML_FEATURES


def ml_features(symbols: Sequence[str], data_dir: Path | None = None, freshness_s: float = 10.0) -> np.ndarray:
    """A ``(len(symbols), 5)`` float array of ``ML_FEATURES`` from the online store (feature service ``scoring``).

    Missing-value policy: a symbol with no online row, or whose row is older than ``freshness_s``, gets NaN
    in all five columns (never a stale or imputed value); models that cannot take NaN must drop or impute
    those rows themselves. Rows are in the order of ``symbols``.
    """
    from microstructure.store import open_store, read_online

    store = open_store((data_dir or lake.data_dir_default()).resolve())
    rows = read_online(store, list(symbols), freshness_s)
    out = np.full((len(symbols), len(ML_FEATURES)), np.nan)
    for i, r in enumerate(rows):
        if r.found and not r.stale:
            out[i] = [np.nan if r.features.get(k) is None else float(r.features[k]) for k in ML_FEATURES]
    return out


MODEL_PATH = Path("models") / "entry_model.pkl"


class ModelMissing(Exception):
    pass


def score_picks(rows: list[dict[str, Any]], paths: lake.LakePaths) -> list[dict[str, Any]]:
    """Add ``model_p_up`` (P(mid up over the model's horizon)) and ``model_score`` (P(the pick's side is
    right)) to picks rows that carry the five features; base features (60 s return, 5 min volatility) come
    from the lake's published features up to the pick's time, with the same SQL as training."""
    import pickle

    import pandas as pd

    from microstructure.evaluate import base_feature_rows

    f = paths.data_dir / MODEL_PATH
    if not f.exists():
        raise ModelMissing(f"no entry model at {f}: run `microstructure evaluate` first")
    bundle = pickle.loads(f.read_bytes())
    syms = sorted({r["symbol"] for r in rows if r.get("symbol")})
    con = lake.connect(paths)
    con.execute("CREATE TEMP TABLE recent AS SELECT * FROM features WHERE symbol IN (SELECT unnest(?)) "
                "AND event_ts >= (SELECT max(event_ts) FROM features) - INTERVAL 20 MINUTE", [syms])
    base = base_feature_rows(con, "recent")
    for r in rows:
        r["model_p_up"] = r["model_score"] = None
        if r.get("status") == "error" or any(r.get(k) is None for k in ML_FEATURES):
            continue
        b = base[base["symbol"] == r["symbol"]]
        if r.get("as_of"):
            b = b[b["event_ts"] <= pd.Timestamp(r["as_of"])]
        b = b.dropna()
        if b.empty:
            continue
        last = b.iloc[-1]
        x = pd.DataFrame([{**{k: last[k] for k in bundle["features"] if k in last}, **{k: r[k] for k in ML_FEATURES}}])
        p_up = float(bundle["model"].predict_proba(x[bundle["features"]])[:, 1][0])
        r["model_p_up"] = p_up
        r["model_score"] = p_up if r.get("side") == "buy" else 1 - p_up
    return rows
