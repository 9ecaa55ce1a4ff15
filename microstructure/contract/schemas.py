"""Our datasets' schemas: the features (derived from their declaration in ``features.sql``), the lake's empty
schemas, and the SQL files that define them.

``transforms/`` (installed as ``microstructure.transforms``) holds the SQL; this module only names and loads it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from microstructure.contract.book import QUARANTINE_SCHEMA, SNAPSHOT_SCHEMA
from microstructure.contract.catalogue import DeclarationError, declare
from microstructure.contract.outcomes import OUTCOMES_SCHEMA

if TYPE_CHECKING:
    import duckdb


def package_dir(name: str) -> Path:
    """Where an installed data package lives (``transforms/`` and ``feature_repo/`` install as
    ``microstructure.transforms`` and ``microstructure.feature_repo``; a checkout's editable install maps them)."""
    import importlib

    return Path(importlib.import_module(name).__file__ or "").resolve().parent


TRANSFORMS_DIR = package_dir("microstructure.transforms")


@cache
def sql(name: str) -> str:
    return (TRANSFORMS_DIR / f"{name}.sql").read_text()


# Every feature is declared once, in features.sql: its name, role, unit, range and description on the line that
# computes it (contract.catalogue reads them), its type from a zero-row run of the SQL over an empty snapshot
# table. Everything below, the Feast fields, the range checks and the docs' table are derived from that.
DECLARATION = declare(sql("features"), SNAPSHOT_SCHEMA)
# What the published feature rows are cast to (compute.compute_features, the Spark engine, the lake's empty file).
FEATURES_SCHEMA = DECLARATION.schema
FEATURE_NAMES = [c.name for c in DECLARATION.features]  # what Feast serves: all but the entity and the timestamp
ENTITY = DECLARATION.role("entity")  # Feast's join key
EVENT_TIMESTAMP = DECLARATION.role("timestamp")  # Feast's event time: what a point-in-time join compares

# The trailing windows the feature SQL looks back over, read from its INTERVALs. The online buffer and the
# offline per-date build must carry at least this much history for the windows to see it all.
GAP_WINDOW = DECLARATION.window("GAP_WINDOW")
HALT_WINDOW = DECLARATION.window("HALT_WINDOW")

# The five roadmap features, in the order models take them (Feast service ``scoring``, ``scoring.py``).
ML_FEATURES = ["order_imbalance", "bid_depth", "ask_depth", "spread_bps", "depth_imbalance"]
if not set(ML_FEATURES) <= set(FEATURE_NAMES):
    raise DeclarationError(f"ML_FEATURES names undeclared features: {sorted(set(ML_FEATURES) - set(FEATURE_NAMES))}")

EMPTY = {"snapshots": SNAPSHOT_SCHEMA, "quarantine": QUARANTINE_SCHEMA, "features": FEATURES_SCHEMA,
         "outcomes": OUTCOMES_SCHEMA}


def to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """A DuckDB relation as an Arrow table (DuckDB 2 returns a RecordBatchReader)."""
    out = rel.arrow()
    return out.read_all() if isinstance(out, pa.RecordBatchReader) else out
