"""Statistics for the evaluation: weighted means and correlations, and the cluster bootstrap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

B = 1000  # bootstrap replicates


# ---- bootstrap -------------------------------------------------------------------------------
@dataclass
class Boot:
    clusters: np.ndarray  # cluster id per row
    rng: np.random.Generator
    weights: np.ndarray = field(init=False)  # (B, rows): how often each row is drawn per replicate
    by_row: bool = field(init=False)

    def __post_init__(self) -> None:
        ids, inv = np.unique(self.clusters, return_inverse=True)
        self.by_row = len(ids) < 20
        if self.by_row:
            n = len(self.clusters)
            self.weights = self.rng.multinomial(n, np.full(n, 1 / n), size=B).astype(float) if n else np.zeros((B, 0))
        else:
            w = self.rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=B).astype(float)
            self.weights = w[:, inv]

    def ci(self, stat: Callable[[np.ndarray], np.ndarray], alpha: float = 0.05) -> tuple[float, float]:
        """``stat(weights)`` maps a (B, rows) weight matrix to B values; returns the percentile interval."""
        with np.errstate(divide="ignore", invalid="ignore"):  # a replicate without a group gives inf/NaN
            vals = stat(self.weights)
        vals = vals[np.isfinite(vals)]
        if len(vals) < B // 2:
            return (float("nan"), float("nan"))
        return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def wmean(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: (w @ x) / w.sum(axis=1)


def wcorr(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def f(w: np.ndarray) -> np.ndarray:
        s = w.sum(axis=1)
        ma, mb = (w @ a) / s, (w @ b) / s
        cov = (w @ (a * b)) / s - ma * mb
        va, vb = (w @ (a * a)) / s - ma**2, (w @ (b * b)) / s - mb**2
        return cov / np.sqrt(va * vb)
    return f


def ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank().to_numpy()


# ---- headline ---------------------------------------------------------------------------------
def verdict(ci: tuple[float, float] | None, target: float, enough: bool = True) -> str:
    if not enough or ci is None or not all(np.isfinite(ci)):
        return "insufficient data"
    if ci[0] >= target:
        return "met"
    if ci[1] < target:
        return "not met"
    return "inconclusive"
