"""The entry model: fitted walk-forward on features and base rows, and judged against the base rows alone.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from microstructure.contract.schemas import ML_FEATURES
from microstructure.features.model_inputs import BASE_FEATURES, _log_depth, base_feature_rows
from microstructure.research.data import clusters_of
from microstructure.research.stats import Boot

MIN_ML_ROWS = 1000


WALK_FOLDS = 5  # walk-forward: the data cut in time into 6 blocks; fold k trains on blocks <= k, tests on k+1


def _entropy(p: float) -> float:
    return float(-(p * np.log(p) + (1 - p) * np.log(1 - p))) if 0 < p < 1 else 0.0


def fit_entry_model(train: pd.DataFrame, cols: list[str]) -> Any:
    """The entry model fitted on ``train[cols]`` against ``train["label"]``: depths as log(1 + depth), then a
    standardised logistic regression. ``scoring.export_model`` saves exactly these three steps as numbers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return make_pipeline(FunctionTransformer(_log_depth), StandardScaler(),
                         LogisticRegression(C=0.05, max_iter=1000)).fit(train[cols], train["label"])


def ml_study(con: Any, data_dir: Any, horizon_s: int, n_rows: int, rng: np.random.Generator) -> dict[str, Any]:
    """Does adding the five features to a base model improve out-of-sample scoring?

    Label: sign of the H-second forward mid return; rows whose mid did not move (flat) are dropped, so the
    model answers "up or down, given it moved". Model: standardised logistic regression (its log-loss fit
    gives calibrated probabilities; deterministic: lbfgs, no randomness). Evaluation: walk-forward, the
    out-of-sample predictions of every fold pooled; log-loss is compared with the base-rate entropy (the
    score of always predicting the training up-rate). Rows are chosen and sorted deterministically (the
    Feast join is deterministic: ties on the timestamp are settled by ``event_ts``).
    """
    from sklearn.metrics import log_loss, roc_auc_score

    from microstructure.store.repo import open_store
    from microstructure.store.training import training_set

    base = base_feature_rows(con)
    fwd = con.execute("SELECT f.symbol, f.event_ts, ln(g.mid / f.mid) AS fwd FROM f ASOF JOIN f g "
                      "ON g.symbol = f.symbol AND g.event_ts >= f.event_ts + to_seconds(?::DOUBLE)",
                      [float(horizon_s)]).df()
    d = base.merge(fwd, on=["symbol", "event_ts"]).dropna(subset=[*BASE_FEATURES, "fwd"])
    flat = int((d["fwd"] == 0).sum())
    d = d[d["fwd"] != 0].sort_values(["event_ts", "symbol"], kind="stable").reset_index(drop=True)
    if len(d) < MIN_ML_ROWS:
        return {"n": len(d), "enough": False, "horizon_s": horizon_s, "flat_dropped": flat}
    d = d.iloc[np.sort(rng.choice(len(d), size=min(n_rows, len(d)), replace=False))].copy()
    d["label"] = (d["fwd"] > 0).astype(int)
    # The five microstructure features come through Feast's point-in-time join, as in training.
    ents = pd.DataFrame({"symbol": d["symbol"].to_numpy(),
                         "event_timestamp": pd.to_datetime(d["received_ts"], utc=True),
                         **{c: d[c].to_numpy() for c in [*BASE_FEATURES, "label"]}})
    joined = training_set(open_store(data_dir), ents).dropna(subset=ML_FEATURES)
    joined = joined.sort_values(["event_timestamp", "symbol"], kind="stable").reset_index(drop=True)
    n = len(joined)
    edges = np.linspace(0, n, WALK_FOLDS + 2).astype(int)
    preds: dict[str, list[np.ndarray]] = {"base": [], "base+micro": []}
    ys, prior, folds, tests = [], [], [], []
    models: dict[str, Any] = {}
    for k in range(1, WALK_FOLDS + 1):
        train, test = joined.iloc[: edges[k]], joined.iloc[edges[k]: edges[k + 1]]
        if train["label"].nunique() < 2 or len(test) == 0:
            continue
        folds.append({"train": len(train), "test": len(test), "from": str(test["event_timestamp"].iloc[0])})
        ys.append(test["label"].to_numpy())
        tests.append(test)
        prior.append(np.full(len(test), train["label"].mean()))
        for name, cols in (("base", BASE_FEATURES), ("base+micro", [*BASE_FEATURES, *ML_FEATURES])):
            m = fit_entry_model(train, cols)
            preds[name].append(m.predict_proba(test[cols])[:, 1])
            models[name] = (m, cols)
    if not ys:
        return {"n": n, "enough": False, "horizon_s": horizon_s, "flat_dropped": flat}
    y = np.concatenate(ys)
    p_prior = np.concatenate(prior)
    probs = {k: np.concatenate(v) for k, v in preds.items()}
    if len(y) < 200 or len(np.unique(y)) < 2:
        return {"n": n, "enough": False, "horizon_s": horizon_s, "flat_dropped": flat}
    res: dict[str, Any] = {"n": n, "n_test": len(y), "enough": True, "horizon_s": horizon_s, "flat_dropped": flat,
                           "label": "up vs down at H; flat (no mid move) rows dropped",
                           "split": f"walk-forward, {len(folds)} folds (expanding window)", "folds": folds,
                           "model": "StandardScaler + LogisticRegression (lbfgs)", "test_up_rate": float(y.mean()),
                           "base_rate_log_loss": float(log_loss(y, np.clip(p_prior, 1e-6, 1 - 1e-6))),
                           "base_rate_entropy": _entropy(float(y.mean()))}
    for name, pr in probs.items():
        res[name] = {"auc": float(roc_auc_score(y, pr)), "log_loss": float(log_loss(y, pr))}
        bins = np.clip((pr * 10).astype(int), 0, 9)
        res[name]["reliability"] = [{"bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "n": int((bins == b).sum()),
                                     "predicted": float(pr[bins == b].mean()), "observed": float(y[bins == b].mean())}
                                    for b in range(10) if (bins == b).any()]
    m, cols = models["base+micro"]
    res["_model"] = {"model": m, "features": cols, "horizon_s": horizon_s,
                     "trained": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    # The gain's interval: a cluster bootstrap over the pooled out-of-sample rows (symbol x 5-minute blocks).
    boot = Boot(clusters_of(pd.concat(tests), ts="event_timestamp"), np.random.default_rng(12345))
    aucs = []
    for w in boot.weights[:200]:
        i = np.repeat(np.arange(len(y)), w.astype(int))
        if len(np.unique(y[i])) == 2:
            aucs.append(roc_auc_score(y[i], probs["base+micro"][i]) - roc_auc_score(y[i], probs["base"][i]))
    res["auc_gain"] = res["base+micro"]["auc"] - res["base"]["auc"]
    res["auc_gain_ci"] = (float(np.quantile(aucs, 0.025)), float(np.quantile(aucs, 0.975)))
    res["log_loss_gain"] = res["base"]["log_loss"] - res["base+micro"]["log_loss"]
    return res
