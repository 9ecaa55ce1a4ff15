"""Reading the lake: its views for DuckDB (``transforms/views.sql``), and snapshots by time range.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

import duckdb
import pyarrow as pa

from microstructure.contract.book import SNAPSHOT_SCHEMA
from microstructure.contract.schemas import sql
from microstructure.lake.paths import SNAPSHOTS, LakePaths, with_retry


def read_snapshots(paths: LakePaths, lo: dt.datetime, hi: dt.datetime, symbols: Iterable[str] | None = None,
                   con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Snapshots with ``lo <= event_ts < hi`` (optionally only ``symbols``), read from the date partitions
    the window touches, in the lake's snapshot schema."""
    from microstructure.contract.schemas import to_arrow

    days = [lo.date() + dt.timedelta(days=i) for i in range((hi.date() - lo.date()).days + 1)]
    con = con or duckdb.connect()
    con.execute("SET TimeZone='UTC'")

    def read() -> pa.Table:
        files = paths.files(SNAPSHOTS, days)
        if not files:
            return SNAPSHOT_SCHEMA.empty_table()
        sql = "SELECT * FROM read_parquet(?, union_by_name = true) WHERE event_ts >= ? AND event_ts < ?"
        params: list[object] = [files, lo, hi]
        if symbols is not None:
            sql += " AND symbol IN (SELECT unnest(?))"
            params.append(list(symbols))
        return to_arrow(con.sql(sql, params=params))

    return with_retry(read).select(SNAPSHOT_SCHEMA.names).cast(SNAPSHOT_SCHEMA)


def connect(paths: LakePaths) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the lake's views (``transforms/views.sql``) loaded."""
    from microstructure.lake.views import load_views

    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    load_views(con, paths)
    return con


def load_views(con: duckdb.DuckDBPyConnection, paths: LakePaths) -> None:
    """Create the lake's views (snapshots, features, quarantine, outcomes) from ``views.sql``.

    Each view reads the dataset's files as one consistent list (``LakePaths.files``: never a compacted file
    beside the files it replaced) instead of ``views.sql``'s folder glob, which a plain DuckDB client uses.
    A dataset with no files yet reads its zero-row schema file, so queries still run.
    """
    from microstructure.lake.paths import ensure_schemas, schema_file

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
