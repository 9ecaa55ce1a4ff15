"""microstructure: order-book features for intraday signals (poll -> lake -> DuckDB -> GE -> Feast).

The public API, importable from the package itself::

    from microstructure import MicrostructureService, ml_features, open_store, read_online

Names load on first use (PEP 562), so ``import microstructure`` stays cheap: the command line imports Feast,
Prefect and Great Expectations only for the commands that need them. Each name lives in its layer's package
(``docs/architecture.md`` maps them); importing it from there works the same.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it (one place; the layers' own modules never import from here)
_API = {
    "MicrostructureService": "microstructure.trading.service",
    "load_threshold_set": "microstructure.trading.thresholds",
    "Thresholds": "microstructure.trading.thresholds",
    "ml_features": "microstructure.trading.scoring",
    "load_model": "microstructure.trading.scoring",
    "p_up": "microstructure.trading.scoring",
    "open_store": "microstructure.store.repo",
    "read_online": "microstructure.store.lookup",
    "OnlineRow": "microstructure.store.lookup",
    "training_set": "microstructure.store.training",
    "write_training_set": "microstructure.store.training",
    "LakePaths": "microstructure.lake.paths",
    "compute_features": "microstructure.features.compute",
    "FEATURES_SCHEMA": "microstructure.contract.schemas",
    "FEATURE_NAMES": "microstructure.contract.schemas",
    "ML_FEATURES": "microstructure.contract.schemas",
    "SNAPSHOT_SCHEMA": "microstructure.contract.book",
}
__all__ = [
    "FEATURES_SCHEMA",
    "FEATURE_NAMES",
    "ML_FEATURES",
    "SNAPSHOT_SCHEMA",
    "LakePaths",
    "MicrostructureService",
    "OnlineRow",
    "Thresholds",
    "compute_features",
    "load_model",
    "load_threshold_set",
    "ml_features",
    "open_store",
    "p_up",
    "read_online",
    "training_set",
    "write_training_set",
]

if TYPE_CHECKING:  # the type checker sees the real objects
    from microstructure.contract.book import SNAPSHOT_SCHEMA
    from microstructure.contract.schemas import FEATURE_NAMES, FEATURES_SCHEMA, ML_FEATURES
    from microstructure.features.compute import compute_features
    from microstructure.lake.paths import LakePaths
    from microstructure.store.lookup import OnlineRow, read_online
    from microstructure.store.repo import open_store
    from microstructure.store.training import training_set, write_training_set
    from microstructure.trading.scoring import load_model, ml_features, p_up
    from microstructure.trading.service import MicrostructureService
    from microstructure.trading.thresholds import Thresholds, load_threshold_set


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'microstructure' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
