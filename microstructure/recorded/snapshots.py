"""Backfill from our own snapshots: a lake's ``snapshots`` Parquet files, or exports of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from microstructure.contract.book import QUARANTINE_SCHEMA, RAW_SCHEMA, raw_table
from microstructure.recorded.batch import Batch, file_time, origin_at
from microstructure.recorded.bounds import FileFormatError, check_fields, why
from microstructure.recorded.streams import open_parquet, parquet_batches


def read_snapshot_file(path: Path) -> Iterator[Batch]:
    """Our own snapshot Parquet (``lake/snapshots`` files, or exports of them), re-validated on the way in (an
    implausible time included), in batches."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    files = [f for f in files if "_schema" not in f.parts and not f.name.startswith(".")]
    if not files:
        raise FileFormatError(f"no .parquet files under {path}")
    for f in files:
        pf = open_parquet(f)
        names = pf.schema_arrow.names
        missing = [c for c in ("symbol", "event_ts", "received_ts", "source") if c not in names]
        if missing:
            raise FileFormatError(f"{f.name}: not a snapshot file (missing {missing})")
        loaded = file_time(f)
        columns = [c for c in names if c in RAW_SCHEMA.names]
        strings = [c for c in ("symbol", "source") if pa.types.is_string(pf.schema_arrow.field(c).type)]
        for t, where in parquet_batches(f, pf, columns):
            check_fields(t, strings, origin_at(where))
            try:
                raw = raw_table({c: t.column(c).combine_chunks() for c in t.column_names})
            except (pa.ArrowException, ValueError) as e:
                raise FileFormatError(f"{f.name}: columns are not the snapshot schema's ({why(e)})") from None
            yield Batch(raw, QUARANTINE_SCHEMA.empty_table(), where, loaded)
