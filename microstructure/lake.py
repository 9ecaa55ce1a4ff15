"""The Parquet lake: hive-partitioned by date, written atomically, deduplicated on its key.

Layout under ``<data-dir>/lake/``::

    snapshots/date=YYYY-MM-DD/part-*.parquet     clean snapshots (book.SNAPSHOT_SCHEMA)
    quarantine/date=YYYY-MM-DD/part-*.parquet    rejected snapshots with a reason
    features/date=YYYY-MM-DD/features.parquet    published features (what Feast reads)
    features_quarantine/date=.../*.parquet       feature batches that failed their checks (+ .json reason)
    outcomes/date=YYYY-MM-DD/part-*.parquet      per cycle and symbol: source used, levels, latency, error

A file becomes visible only by ``rename`` of a fully written, fsynced temporary file, so a reader (or a
crash) never sees half a file. A snapshot is *acknowledged* once its file has been renamed into place.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SNAPSHOTS = "snapshots"
QUARANTINE = "quarantine"
FEATURES = "features"
FEATURES_QUARANTINE = "features_quarantine"
OUTCOMES = "outcomes"
ROW_GROUP_SIZE = 256_000


def data_dir_default() -> Path:
    return Path(os.environ.get("MICROSTRUCTURE_DATA_DIR", "data"))


@dataclass(frozen=True)
class LakePaths:
    data_dir: Path

    @property
    def root(self) -> Path:
        return self.data_dir / "lake"

    def dataset(self, name: str) -> Path:
        return self.root / name

    def partition(self, name: str, day: dt.date) -> Path:
        return self.dataset(name) / f"date={day.isoformat()}"

    def glob(self, name: str) -> str:
        return str(self.dataset(name) / "*" / "*.parquet")

    def has(self, name: str) -> bool:
        d = self.dataset(name)
        return d.exists() and any(d.glob("*/*.parquet"))

    def dates(self, name: str) -> list[dt.date]:
        d = self.dataset(name)
        if not d.exists():
            return []
        parts = [p for p in d.glob("date=*") if any(p.glob("*.parquet"))]
        return sorted(dt.date.fromisoformat(p.name.split("=", 1)[1]) for p in parts)


def atomic_write_parquet(table: pa.Table, path: Path, row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Write to a hidden temporary name, fsync, then rename: the file appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _day_of(table: pa.Table) -> pa.Array:
    """The date partition of each row: by event time, else receive time (quarantine rows may lack one),
    else the poll cycle's time (outcomes)."""
    names = [c for c in ("event_ts", "received_ts", "cycle_ts") if c in table.column_names]
    ts = pc.coalesce(*(table.column(c) for c in names))
    return pc.strftime(ts, format="%Y-%m-%d").combine_chunks()


def _keys(table: pa.Table, key: tuple[str, ...]) -> list[tuple]:
    cols = []
    for k in key:
        c = table.column(k)
        cols.append(c.cast(pa.int64()).to_pylist() if pa.types.is_timestamp(c.type) else c.to_pylist())
    return list(zip(*cols, strict=True))


class PartitionWriter:
    """Appends tables to a dataset, one new file per date per call, skipping keys already in the lake.

    The set of keys already written is read once per partition (the first time this writer touches
    it) and then kept up to date in memory, so each write costs O(rows written), not O(partition).
    """

    def __init__(self, paths: LakePaths, dataset: str, key: tuple[str, ...], schema: pa.Schema) -> None:
        self.paths = paths
        self.dataset = dataset
        self.key = key
        self.schema = schema
        self._seen: dict[dt.date, set[tuple]] = {}

    def _seen_for(self, day: dt.date) -> set[tuple]:
        if day not in self._seen:
            part = self.paths.partition(self.dataset, day)
            seen: set[tuple] = set()
            if any(part.glob("*.parquet")):
                cols = ", ".join(f"epoch_us({k})" if k.endswith("_ts") else k for k in self.key)
                rows = duckdb.sql(f"SELECT {cols} FROM read_parquet('{part}/*.parquet')").fetchall()
                seen = set(rows)
            self._seen[day] = seen
        return self._seen[day]

    def write(self, table: pa.Table) -> pa.Table:
        """Write ``table``; return the rows newly acknowledged (rows whose key the lake holds are skipped)."""
        if table.num_rows == 0:
            return self.schema.empty_table()
        table = table.cast(self.schema)
        days = _day_of(table)
        written: list[pa.Table] = []
        for day_s in pc.unique(days).to_pylist():
            day = dt.date.fromisoformat(day_s)
            part = table.filter(pc.equal(days, day_s))
            seen = self._seen_for(day)
            keys = _keys(part, self.key)
            fresh_mask, batch_keys = [], set()
            for k in keys:
                new = k not in seen and k not in batch_keys
                fresh_mask.append(new)
                batch_keys.add(k)
            part = part.filter(pa.array(fresh_mask))
            if part.num_rows == 0:
                continue
            name = f"part-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            atomic_write_parquet(part, self.paths.partition(self.dataset, day) / name)
            seen.update(k for k, f in zip(keys, fresh_mask, strict=True) if f)
            written.append(part)
        return pa.concat_tables(written) if written else self.schema.empty_table()


def compact(paths: LakePaths, dataset: str, day: dt.date, key: Iterable[str], order: Iterable[str]) -> tuple[int, int]:
    """Merge a date's small files into one sorted file with large row groups. Crash-safe.

    Steps: write the merged file in a hidden staging folder; record the plan (the files it replaces);
    rename the merged file into the partition (the commit point); delete the replaced files. If a crash
    interrupts, ``recover`` finishes the plan when the merged file is in place, and discards it if not.
    Returns (files before, files after).
    """
    part = paths.partition(dataset, day)
    recover(part)
    files = sorted(part.glob("*.parquet"))
    if len(files) <= 1:
        return len(files), len(files)
    staging = part / ".compacting"
    staging.mkdir(exist_ok=True)
    name = f"compacted-{uuid.uuid4().hex[:12]}.parquet"
    file_list = ", ".join(f"'{f}'" for f in files)
    key_s, order_s = ", ".join(key), ", ".join(order)
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    from microstructure.transforms import to_arrow

    schema = pq.read_schema(files[0])
    first = "received_ts" if "received_ts" in schema.names else list(order)[-1]  # keep the first arrival
    table = to_arrow(con.sql(
        f"SELECT * FROM read_parquet([{file_list}], union_by_name=true) "
        f"QUALIFY row_number() OVER (PARTITION BY {key_s} ORDER BY {first}) = 1 ORDER BY {order_s}"
    ))
    atomic_write_parquet(table.select(schema.names).cast(schema), staging / name)
    plan = staging / "plan.json"
    plan.write_text(json.dumps({"merged": name, "replaces": [f.name for f in files]}))
    _fsync_dir(staging)
    os.replace(staging / name, part / name)  # commit point
    _fsync_dir(part)
    recover(part)
    return len(files), 1


def recover(part: Path) -> None:
    """Finish or discard an interrupted compaction in partition ``part``."""
    staging = part / ".compacting"
    plan_f = staging / "plan.json"
    if plan_f.exists():
        plan = json.loads(plan_f.read_text())
        if (part / plan["merged"]).exists():
            for f in plan["replaces"]:
                (part / f).unlink(missing_ok=True)
        plan_f.unlink()
    if staging.exists():
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    for f in part.glob(".*.tmp"):
        f.unlink()


def read_snapshots(paths: LakePaths, lo: dt.datetime, hi: dt.datetime, symbols: Iterable[str] | None = None,
                   con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Snapshots with ``lo <= event_ts < hi`` (optionally only ``symbols``), read from the date partitions
    the window touches, in the lake's snapshot schema."""
    from microstructure.book import SNAPSHOT_SCHEMA
    from microstructure.transforms import to_arrow

    days = [lo.date() + dt.timedelta(days=i) for i in range((hi.date() - lo.date()).days + 1)]
    files = [str(f) for d in days for f in sorted(paths.partition(SNAPSHOTS, d).glob("*.parquet"))]
    if not files:
        return SNAPSHOT_SCHEMA.empty_table()
    con = con or duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    sql = f"SELECT * FROM read_parquet({files!r}, union_by_name = true) WHERE event_ts >= ? AND event_ts < ?"
    params: list[object] = [lo, hi]
    if symbols is not None:
        sql += " AND symbol IN (SELECT unnest(?))"
        params.append(list(symbols))
    tbl = to_arrow(con.sql(sql, params=params))
    return tbl.select(SNAPSHOT_SCHEMA.names).cast(SNAPSHOT_SCHEMA)


def connect(paths: LakePaths) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the lake's views (``transforms/views.sql``) loaded."""
    from microstructure.transforms import load_views

    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    load_views(con, paths)
    return con
