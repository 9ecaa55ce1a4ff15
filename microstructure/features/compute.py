"""Computing features: ``transforms/features.sql`` run by DuckDB over snapshot rows (the one computation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

if TYPE_CHECKING:
    pass
from microstructure.contract.schemas import FEATURES_SCHEMA, sql, to_arrow


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
