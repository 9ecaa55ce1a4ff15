"""Runs the SQL in ``transforms/``. Python only executes it; the SQL is the definition of every feature."""

from __future__ import annotations

import datetime as dt
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from microstructure.book import QUARANTINE_SCHEMA, SNAPSHOT_SCHEMA, TS_TYPE
from microstructure.sources.base import OUTCOMES_SCHEMA

if TYPE_CHECKING:
    from microstructure.lake import LakePaths

def package_dir(name: str) -> Path:
    """Where an installed data package lives (``transforms/`` and ``feature_repo/`` install as
    ``microstructure.sql`` and ``microstructure.feature_repo``; a checkout's editable install maps them)."""
    import importlib

    return Path(importlib.import_module(name).__file__ or "").resolve().parent


TRANSFORMS_DIR = package_dir("microstructure.sql")

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


def compute_features(snapshots: pa.Table, con: duckdb.DuckDBPyConnection | None = None,
                     only: pa.Table | None = None) -> pa.Table:
    """Run ``features.sql`` over an in-memory snapshot table.

    ``only`` (snapshot rows) restricts the output to those rows' (symbol, event_ts), while the windows
    still see all of ``snapshots``: this is how the online path computes one cycle against its history.
    """
    con = con or duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    con.register("snapshots", snapshots)
    query = f"WITH f AS ({sql('features')})\nSELECT f.* FROM f"
    if only is not None:
        con.register("only_rows", only.select(["symbol", "event_ts"]))
        query += " SEMI JOIN only_rows USING (symbol, event_ts)"
    try:
        out = to_arrow(con.sql(query + "\nORDER BY symbol, event_ts"))
    finally:
        con.unregister("snapshots")
        if only is not None:
            con.unregister("only_rows")
    return out.select(FEATURES_SCHEMA.names).cast(FEATURES_SCHEMA)


def load_views(con: duckdb.DuckDBPyConnection, paths: LakePaths) -> None:
    """Create the lake's views (snapshots, features, quarantine, outcomes) from ``views.sql``.

    Each view reads the dataset's files as one consistent list (``LakePaths.files``: never a compacted file
    beside the files it replaced) instead of ``views.sql``'s folder glob, which a plain DuckDB client uses.
    A dataset with no files yet reads its zero-row schema file, so queries still run.
    """
    from microstructure.lake import ensure_schemas, schema_file

    ensure_schemas(paths)
    con.execute("SET VARIABLE lake = ?", [str(paths.root)])
    text = "\n".join(line for line in sql("views").splitlines() if not line.strip().startswith("--"))
    for body in filter(None, (s.strip() for s in text.split(";"))):
        name = re.search(r"VIEW\s+(\w+)", body, re.I).group(1)  # type: ignore[union-attr]
        glob = f"coalesce(getvariable('lake'), 'data/lake') || '/{name}/*/*.parquet'"
        if glob not in body:
            raise ValueError(f"views.sql: view {name} does not read {glob}")
        files = paths.files(name) or [str(schema_file(paths, name))]
        con.execute(f"SET VARIABLE {name}_files = ?", [files])
        con.execute(body.replace(glob, f"getvariable('{name}_files')"))
