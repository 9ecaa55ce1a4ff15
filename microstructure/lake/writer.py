"""Appending to the lake: one writer per partition, atomic files, and each key stored once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.atomic import atomic_write_parquet
from microstructure.lake.paths import SMALL_PREFIX, LakePaths, _ident, ensure_schemas, partition_files, with_retry

DEDUP_HORIZON = dt.timedelta(minutes=15)  # keys newer than this stay in memory; older ones are checked on disk


def _day_of(table: pa.Table) -> pa.Array:
    """The date partition of each row: by event time, else receive time (quarantine rows may lack one),
    else the poll cycle's time (outcomes)."""
    names = [c for c in ("event_ts", "received_ts", "cycle_ts") if c in table.column_names]
    ts = pc.coalesce(*(table.column(c) for c in names))
    return pc.strftime(ts, format="%Y-%m-%d").combine_chunks()


# A row's key: its key columns' values in key order, timestamps as epoch microseconds (ints).
Key = tuple[Any, ...]


def _keys(table: pa.Table, key: tuple[str, ...]) -> list[Key]:
    cols = []
    for k in key:
        c = table.column(k)
        cols.append(c.cast(pa.int64()).to_pylist() if pa.types.is_timestamp(c.type) else c.to_pylist())
    return list(zip(*cols, strict=True))


class PartitionWriter:
    """Appends tables to a dataset, one new file per date per call, skipping keys already in the lake.

    Dedup state is bounded by time: the keys of the last ``DEDUP_HORIZON`` (by the key's timestamp) and the
    newest key of every symbol stay in memory (a stale quote repeats a recent key, a halted book its newest
    one); a row older than that is checked against the partition on disk. So a session of any length holds
    a constant number of keys, and a re-run or backfill of old data still never writes a key twice.
    """

    def __init__(self, paths: LakePaths, dataset: str, key: tuple[str, ...], schema: pa.Schema,
                 horizon: dt.timedelta = DEDUP_HORIZON) -> None:
        self.paths = paths
        self.dataset = dataset
        self.key = key
        self.schema = schema
        self.ts_col = next(k for k in key if k.endswith("_ts"))
        self.ts_pos = key.index(self.ts_col)
        self.horizon_us = int(horizon.total_seconds() * 1e6)
        # The key as DuckDB selects it (timestamps as epoch µs), to compare with _keys() tuples. Column names
        # are our schemas' constants, quoted; file lists and values are always bound parameters.
        self._key_sql = ", ".join(f"epoch_us({_ident(k)})" if k.endswith("_ts") else _ident(k) for k in key)
        self._seen: dict[dt.date, dict[Key, int]] = {}  # key -> its timestamp (epoch us)
        self._floor: dict[dt.date, int] = {}  # keys older than this may be on disk only
        self._newest: dict[Key, Key] = {}  # key without its time -> newest key written
        self._pruned_at: dict[dt.date, int] = {}
        ensure_schemas(paths)
        self.small_files: dict[dt.date, int] = {}  # files this writer added since the last compaction

    def _state_for(self, day: dt.date) -> dict[Key, int]:
        if day not in self._seen:
            if len(self._seen) >= 2:  # a poller moves on to the next day; old days are checked on disk
                oldest = min(self._seen)
                del self._seen[oldest], self._floor[oldest]
                self._pruned_at.pop(oldest, None)
            part = self.paths.partition(self.dataset, day)
            cols, ts = self._key_sql, _ident(self.ts_col)

            def load() -> list[Key] | None:
                files = [str(f) for f in partition_files(part)]  # listed again on every retry
                if not files:
                    return None
                con = duckdb.connect()
                top = con.execute(f"SELECT epoch_us(max({ts})) FROM read_parquet($files)", {"files": files}).fetchall()
                lo = (top[0][0] or 0) - self.horizon_us
                rows = con.execute(f"SELECT {cols} FROM {self._scan(con)} WHERE epoch_us({ts}) >= $lo",
                                   {"files": files, "lo": lo}).fetchall()
                return [(lo,), *rows]

            got = with_retry(load)
            seen: dict[Key, int] = {}
            floor = -(2**63)
            if got is not None:
                floor = got[0][0]
                seen = {k: k[self.ts_pos] for k in got[1:]}
            self._seen[day], self._floor[day] = seen, floor
        return self._seen[day]

    def _scan(self, con: duckdb.DuckDBPyConnection) -> str:
        """The partition's files ($files) with every column of the writer's schema: a file written before a
        column joined the key (quarantine's ``origin``) reads it as NULL instead of failing the bind."""
        con.register("_typed", self.schema.empty_table())
        return "(SELECT * FROM _typed UNION ALL BY NAME SELECT * FROM read_parquet($files, union_by_name = true))"

    def _on_disk(self, day: dt.date, keys: list[Key]) -> set[Key]:
        """Which of ``keys`` the partition on disk already holds (for rows older than the memory horizon)."""
        if not keys:
            return set()
        ts = [k[self.ts_pos] for k in keys]
        cols = self._key_sql
        part = self.paths.partition(self.dataset, day)

        def look() -> set[Key]:
            files = [str(f) for f in partition_files(part)]
            if not files:
                return set()
            con = duckdb.connect()
            rows = con.execute(
                f"SELECT {cols} FROM {self._scan(con)} WHERE epoch_us({_ident(self.ts_col)}) BETWEEN $lo AND $hi",
                {"files": files, "lo": min(ts), "hi": max(ts)}).fetchall()
            return set(rows)

        return with_retry(look) & set(keys)

    def _prune(self, day: dt.date, newest_us: int) -> None:
        """Every half horizon, forget keys older than the horizon (memory stays ~1.5 horizons of keys)."""
        last = self._pruned_at.setdefault(day, newest_us)
        if newest_us - last < self.horizon_us // 2:
            return
        self._pruned_at[day] = newest_us
        seen = self._seen[day]
        lo = newest_us - self.horizon_us
        self._seen[day] = {k: t for k, t in seen.items() if t >= lo}
        self._floor[day] = max(self._floor[day], lo)

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
            seen = self._state_for(day)
            floor = self._floor[day]
            keys = _keys(part, self.key)
            old = [k for k in keys if k[self.ts_pos] < floor and k not in seen]
            on_disk = self._on_disk(day, old) if old else set()
            fresh_mask, batch_keys = [], set()
            for k in keys:
                rest = k[: self.ts_pos] + k[self.ts_pos + 1:]
                new = (k not in seen and k not in batch_keys and k not in on_disk
                       and self._newest.get(rest) != k)
                fresh_mask.append(new)
                batch_keys.add(k)
            part = part.filter(pa.array(fresh_mask, pa.bool_()))
            if part.num_rows == 0:
                continue
            name = f"{SMALL_PREFIX}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            atomic_write_parquet(part, self.paths.partition(self.dataset, day) / name)
            self.small_files[day] = self.small_files.get(day, 0) + 1
            newest = floor
            for k, f in zip(keys, fresh_mask, strict=True):
                if f:
                    t = k[self.ts_pos]
                    if t >= floor:
                        seen[k] = t
                    newest = max(newest, t)
                    rest = k[: self.ts_pos] + k[self.ts_pos + 1:]
                    if rest not in self._newest or self._newest[rest][self.ts_pos] < t:
                        self._newest[rest] = k
            self._prune(day, newest)
            written.append(part)
        return pa.concat_tables(written) if written else self.schema.empty_table()
