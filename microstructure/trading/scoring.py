"""Thin glue for ML scoring: the five microstructure features, in the order a model expects."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microstructure.contract.catalogue import FRESHNESS_S
from microstructure.contract.inputs import InputError
from microstructure.contract.schemas import ML_FEATURES
from microstructure.features.model_inputs import BASE_FEATURES, LOG1P_FEATURES
from microstructure.lake.paths import LakePaths, data_dir_default
from microstructure.lake.views import connect


def ml_features(symbols: Sequence[str], data_dir: Path | None = None, freshness_s: float = FRESHNESS_S) -> np.ndarray:
    """A ``(len(symbols), 5)`` float array of ``ML_FEATURES`` from the online store (feature service ``scoring``).

    Missing-value policy: a symbol with no online row, or whose row is older than ``freshness_s``, gets NaN
    in all five columns (never a stale or imputed value); models that cannot take NaN must drop or impute
    those rows themselves. Rows are in the order of ``symbols``.
    """
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    store = open_store((data_dir or data_dir_default()).resolve())
    rows = read_online(store, list(symbols), freshness_s)
    out = np.full((len(symbols), len(ML_FEATURES)), np.nan)
    for i, r in enumerate(rows):
        if r.found and not r.stale:
            out[i] = [np.nan if r.features.get(k) is None else float(r.features[k]) for k in ML_FEATURES]
    return out


# ---- the entry model, saved as data -------------------------------------------------------------
# ``evaluate`` trains a standardised logistic regression; ``picks --score`` applies it. What passes between
# them is numbers in JSON, never a pickle: a file under a data dir may come from anyone, and unpickling runs
# whatever code the file names. P(up) = sigmoid(((x - mean) / scale) . coef + intercept), with the columns in
# ``log1p`` first replaced by log(1 + max(x, 0)) (depths span orders of magnitude).
MODEL_PATH = Path("models") / "entry_model.json"
OLD_PICKLE = Path("models") / "entry_model.pkl"  # what versions before issue 17 wrote; never loaded
MODEL_FORMAT = "microstructure-entry-model"
MODEL_VERSION = 1
MAX_MODEL_BYTES = 64 * 1024  # ~7 features need ~1 KB; anything this big is not ours
KNOWN_FEATURES = (*BASE_FEATURES, *ML_FEATURES)
MODEL_KEYS = {"format", "version", "features", "log1p", "mean", "scale", "coef", "intercept", "horizon_s",
              "data", "auc", "trained"}


class ModelError(InputError):
    """The entry model cannot be used: one line for the user, exit 2."""


class ModelMissing(ModelError):
    pass


def export_model(pipeline: Any, features: Sequence[str], horizon_s: int, data: str, auc: float,
                 trained: str) -> dict[str, Any]:
    """The fitted ``evaluate`` pipeline (log-depth transform, StandardScaler, LogisticRegression) as plain
    JSON-able numbers; checked by the same rules as a loaded file, so we never write one we would refuse."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from microstructure.features.model_inputs import _log_depth

    steps = [s for _, s in getattr(pipeline, "steps", [])]
    if (len(steps) != 3 or not isinstance(steps[0], FunctionTransformer) or steps[0].func is not _log_depth
            or not isinstance(steps[1], StandardScaler) or not isinstance(steps[2], LogisticRegression)):
        raise ValueError("the entry model must be log-depth -> StandardScaler -> LogisticRegression")
    scaler, lr = steps[1], steps[2]
    if list(lr.classes_) != [0, 1] or lr.coef_.shape != (1, len(features)):
        raise ValueError("the entry model must be a binary (0/1) logistic regression on its features")
    fitted_on = getattr(steps[1], "feature_names_in_", None)
    if fitted_on is not None and list(fitted_on) != list(features):
        raise ValueError("the entry model's features are not the columns it was fitted on, in that order")
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(len(features))
    mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(len(features))
    model = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "features": list(features),
             "log1p": [f for f in features if f in LOG1P_FEATURES],
             "mean": [float(v) for v in mean], "scale": [float(v) for v in scale],
             "coef": [float(v) for v in lr.coef_[0]], "intercept": float(lr.intercept_[0]),
             "horizon_s": int(horizon_s), "data": str(data), "auc": float(auc), "trained": str(trained)}
    return validate_model(model, "the trained entry model")


def dump_model(model: dict[str, Any]) -> bytes:
    return json.dumps(validate_model(model, "the entry model"), allow_nan=False, indent=1).encode()


def _finite(v: Any) -> bool:
    # bool is an int in Python; a true/false where a number belongs is a tampered file.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def validate_model(m: Any, where: str) -> dict[str, Any]:
    """``m`` if it is exactly a model this version writes (types, lengths, finite numbers, known feature
    names), else ModelError with one line saying what is wrong."""

    def bad(why: str) -> ModelError:
        return ModelError(f"{where} is not a valid entry model ({why}): re-run `microstructure evaluate`")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != MODEL_FORMAT or m.get("version") != MODEL_VERSION:
        raise bad(f"format must be {MODEL_FORMAT!r} version {MODEL_VERSION}")
    if set(m) != MODEL_KEYS:
        missing, extra = sorted(MODEL_KEYS - set(m)), sorted(set(m) - MODEL_KEYS)
        raise bad(f"missing {missing[:5]}" if missing else f"{len(extra)} unknown key(s)")
    feats = m["features"]
    if (not isinstance(feats, list) or not feats or len(feats) > len(KNOWN_FEATURES)
            or not all(isinstance(f, str) and f in KNOWN_FEATURES for f in feats) or len(set(feats)) != len(feats)):
        raise bad(f"features must be distinct names from {list(KNOWN_FEATURES)}")
    n = len(feats)
    if not isinstance(m["log1p"], list) or not all(f in feats and f in LOG1P_FEATURES for f in m["log1p"]):
        raise bad(f"log1p must name model features among {list(LOG1P_FEATURES)}")
    for k in ("mean", "scale", "coef"):
        v = m[k]
        if not isinstance(v, list) or len(v) != n or not all(_finite(x) for x in v):
            raise bad(f"{k} must be {n} finite numbers")
    if not all(x > 0 for x in m["scale"]):
        raise bad("scale must be > 0")
    if not _finite(m["intercept"]):
        raise bad("intercept must be a finite number")
    h = m["horizon_s"]
    if not isinstance(h, int) or isinstance(h, bool) or not 0 < h <= 86_400:
        raise bad("horizon_s must be whole seconds in 1..86400")
    if not _finite(m["auc"]) or not 0 <= m["auc"] <= 1:
        raise bad("auc must be in [0, 1]")
    for k in ("data", "trained"):
        if not isinstance(m[k], str) or len(m[k]) > 2000:
            raise bad(f"{k} must be text")
    return m


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_model(data_dir: Path) -> dict[str, Any]:
    """The entry model of ``data_dir``, read as data: at most MAX_MODEL_BYTES of strict JSON, validated.

    An old ``entry_model.pkl`` is refused, never opened: unpickling a file runs the code it names."""
    f = data_dir / MODEL_PATH
    if not f.exists():
        if (data_dir / OLD_PICKLE).exists():
            raise ModelMissing(f"{data_dir / OLD_PICKLE} is a pickle from an older version and is never loaded "
                               "(it could run code): re-run `microstructure evaluate`")
        raise ModelMissing(f"no entry model at {f}: run `microstructure evaluate` first")
    try:
        with f.open("rb") as fh:  # read at most the bound: the size on disk may change under us
            raw = fh.read(MAX_MODEL_BYTES + 1)
    except OSError as e:
        raise ModelError(f"cannot read the entry model {f}: {e.strerror}") from None
    if len(raw) > MAX_MODEL_BYTES:
        raise ModelError(f"{f} is larger than {MAX_MODEL_BYTES // 1024} KiB: not an entry model this tool wrote; "
                         "re-run `microstructure evaluate`")
    try:
        m = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{f} is not valid JSON ({type(e).__name__}): re-run `microstructure evaluate`") from None
    return validate_model(m, str(f))


def p_up(model: dict[str, Any], x: Any) -> np.ndarray:
    """P(mid up over the model's horizon) for the rows of ``x`` (a DataFrame with the model's features):
    the fitted pipeline's ``predict_proba(x)[:, 1]``, recomputed with numpy from the saved numbers."""
    cols = model["features"]
    a = np.asarray(x[cols], dtype=np.float64).reshape(-1, len(cols)).copy()
    for j, c in enumerate(cols):
        if c in model["log1p"]:
            a[:, j] = np.log1p(np.clip(a[:, j], 0, None))
    z = ((a - np.asarray(model["mean"])) / np.asarray(model["scale"])) @ np.asarray(model["coef"])
    z = z + model["intercept"]
    from scipy.special import expit  # what scikit-learn's logistic regression uses

    return np.asarray(expit(z), dtype=np.float64)


def score_picks(rows: list[dict[str, Any]], paths: LakePaths) -> list[dict[str, Any]]:
    """Add ``model_p_up`` (P(mid up over the model's horizon)) and ``model_score`` (P(the pick's side is
    right)) to picks rows that carry the five features; base features (60 s return, 5 min volatility) come
    from the lake's published features up to the pick's time, with the same SQL as training."""
    import pandas as pd

    from microstructure.features.model_inputs import base_feature_rows

    model = load_model(paths.data_dir)
    syms = sorted({r["symbol"] for r in rows if r.get("symbol")})
    con = connect(paths)
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
        x = pd.DataFrame([{**{k: last[k] for k in model["features"] if k in last}, **{k: r[k] for k in ML_FEATURES}}])
        p = float(p_up(model, x)[0])
        if not math.isfinite(p):
            continue
        r["model_p_up"] = p
        r["model_score"] = p if r.get("side") == "buy" else 1 - p
    return rows
