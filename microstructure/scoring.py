"""Thin glue for ML scoring: the five microstructure features, in the order a model expects."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
