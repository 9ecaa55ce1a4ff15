"""The catalogue of our datasets: the feature schema, the lake's empty schemas and the SQL files that define them.

``transforms/`` (installed as ``microstructure.transforms``) holds the SQL; this module only names and loads it.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from microstructure.contract.book import QUARANTINE_SCHEMA, SNAPSHOT_SCHEMA, TS_TYPE
from microstructure.contract.outcomes import OUTCOMES_SCHEMA

if TYPE_CHECKING:
    pass


def package_dir(name: str) -> Path:
    """Where an installed data package lives (``transforms/`` and ``feature_repo/`` install as
    ``microstructure.transforms`` and ``microstructure.feature_repo``; a checkout's editable install maps them)."""
    import importlib

    return Path(importlib.import_module(name).__file__ or "").resolve().parent


TRANSFORMS_DIR = package_dir("microstructure.transforms")

# The trailing windows the feature SQL looks back over (w5 and w30 in features.sql). The online buffer and
# the offline per-date build must carry at least this much history for the windows to see it all.
GAP_WINDOW = dt.timedelta(minutes=5)
HALT_WINDOW = dt.timedelta(minutes=30)

FEATURES_SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string()),
        pa.field("event_ts", TS_TYPE),
        pa.field("received_ts", TS_TYPE),
        pa.field("source", pa.string()),
        pa.field("book_levels", pa.int32()),
        pa.field("halted", pa.bool_()),
        pa.field("locked", pa.bool_()),
        pa.field("best_bid", pa.float64()),
        pa.field("best_ask", pa.float64()),
        pa.field("bid_size", pa.float64()),
        pa.field("ask_size", pa.float64()),
        pa.field("mid", pa.float64()),
        pa.field("spread_bps", pa.float64()),
        pa.field("bid_depth", pa.float64()),
        pa.field("ask_depth", pa.float64()),
        pa.field("order_imbalance", pa.float64()),
        pa.field("depth_imbalance", pa.float64()),
        pa.field("bid_depth_dollars", pa.float64()),
        pa.field("ask_depth_dollars", pa.float64()),
        pa.field("depth_dollars", pa.float64()),
        pa.field("microprice", pa.float64()),
        pa.field("gap_pct", pa.float64()),
        pa.field("has_recent_halt", pa.bool_()),
    ]
)
FEATURE_NAMES = [f.name for f in FEATURES_SCHEMA if f.name not in ("symbol", "received_ts")]
# The five roadmap features, in the order models take them (Feast service ``scoring``, ``scoring.py``).
ML_FEATURES = ["order_imbalance", "bid_depth", "ask_depth", "spread_bps", "depth_imbalance"]

EMPTY = {"snapshots": SNAPSHOT_SCHEMA, "quarantine": QUARANTINE_SCHEMA, "features": FEATURES_SCHEMA,
         "outcomes": OUTCOMES_SCHEMA}


@cache
def sql(name: str) -> str:
    return (TRANSFORMS_DIR / f"{name}.sql").read_text()


def to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """A DuckDB relation as an Arrow table (DuckDB 2 returns a RecordBatchReader)."""
    out = rel.arrow()
    return out.read_all() if isinstance(out, pa.RecordBatchReader) else out
