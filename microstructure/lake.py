"""The Parquet lake: hive-partitioned by date, written atomically, deduplicated on its key.

Layout under ``<data-dir>/lake/``::

    snapshots/date=YYYY-MM-DD/part-*.parquet     clean snapshots (book.SNAPSHOT_SCHEMA)
    quarantine/date=YYYY-MM-DD/part-*.parquet    rejected snapshots with a reason
    features/date=YYYY-MM-DD/features.parquet    published features (what Feast reads)
    features_quarantine/date=.../*.parquet       feature batches that failed their checks (+ .json reason)
    outcomes/date=YYYY-MM-DD/part-*.parquet      per cycle and symbol: source used, levels, latency, error

A file becomes visible only by ``rename`` of a fully written, fsynced temporary file, so a reader (or a
crash) never sees half a file. A snapshot is *acknowledged* once its file has been renamed into place.

Compaction replaces many files by one, which no rename makes atomic for a reader that lists a folder. So
each partition carries a generation number (``.gen``) and, while a compaction is under way or was cut
short by a crash, its plan (``.compacting/plan.json``: the merged file and the files it replaces). A
reader lists the files between two reads of the generation and drops the replaced files whenever the
merged one is in its list (:func:`partition_files`); if the generation moved, it lists again. Readers take
no lock and never wait for a compaction; a crashed compaction is finished by the next one. We measured
this against moving the lake to Delta Lake (docs/lake.md, "Why not Delta Lake?"): this costs two tiny reads
per partition.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
GEN = ".gen"
STAGING = ".compacting"
SMALL_PREFIX = "part-"
MERGED_PREFIX = "compacted-"
# Rolling compaction's levels: level-1 files merge writers' small files, level-2 files merge level-1 files and
# are not merged again during the session, so no merge ever grows with the day (a full `compact` merges all).
LEVEL_PREFIX = {0: SMALL_PREFIX, 1: f"{MERGED_PREFIX}L1-", 2: f"{MERGED_PREFIX}L2-"}
DEDUP_HORIZON = dt.timedelta(minutes=15)  # keys newer than this stay in memory; older ones are checked on disk
READ_RETRIES = 8
COMPACT_MEMORY = "256MB"  # DuckDB's limit for one compaction; it spills beyond
T = TypeVar("T")


def _crash_point(stage: str) -> None:
    """Fault injection for the crash tests: ``MICROSTRUCTURE_CRASH_AT=<stage>`` kills this process with
    SIGKILL at that stage of a compaction (a real kill -9, no clean-up runs)."""
    if os.environ.get("MICROSTRUCTURE_CRASH_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


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
        return d.exists() and any(d.glob("date=*/*.parquet"))

    def files(self, name: str, days: Iterable[dt.date] | None = None) -> list[str]:
        """A consistent list of the dataset's files (see :func:`partition_files`), optionally some dates."""
        d = self.dataset(name)
        if not d.exists():
            return []
        parts = sorted(d.glob("date=*"))
        if days is not None:
            wanted = {f"date={x.isoformat()}" for x in days}
            parts = [p for p in parts if p.name in wanted]
        return [str(f) for p in parts for f in partition_files(p)]

    def dates(self, name: str) -> list[dt.date]:
        d = self.dataset(name)
        if not d.exists():
            return []
        parts = [p for p in d.glob("date=*") if any(p.glob("*.parquet"))]
        return sorted(dt.date.fromisoformat(p.name.split("=", 1)[1]) for p in parts)


SCHEMA_DIR = "_schema"  # not a date partition: our listings skip it, folder globs see an empty, typed file


def schema_file(paths: LakePaths, name: str) -> Path:
    return paths.dataset(name) / SCHEMA_DIR / "empty.parquet"


def ensure_schemas(paths: LakePaths) -> None:
    """Give every dataset its zero-row schema file, so ``views.sql`` works in any DuckDB client on a lake
    where a dataset has no rows yet (a folder glob that matches nothing is an error in DuckDB)."""
    from microstructure.transforms import EMPTY

    for name, schema in EMPTY.items():
        f = schema_file(paths, name)
        if not f.exists():
            atomic_write_parquet(schema.empty_table(), f)


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


def _read_gen(part: Path) -> int:
    try:
        return int((part / GEN).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _bump_gen(part: Path) -> None:
    atomic_write_bytes(str(_read_gen(part) + 1).encode(), part / GEN)


def _ident(name: str) -> str:
    """A column name as a quoted SQL identifier (a file's schema could name a column with a quote in it)."""
    return '"' + name.replace('"', '""') + '"'


def partition_files(part: Path) -> list[Path]:
    """The partition's data files as one consistent state: never a merged file beside the files it
    replaces, whatever a concurrent or crashed compaction is doing."""
    for _ in range(100):
        g1 = _read_gen(part)
        files = sorted(part.glob("*.parquet")) if part.exists() else []
        plan = _read_plan(part)
        if _read_gen(part) != g1:
            continue  # a compaction began or ended while we looked: look again
        if plan is not None and any(f.name == plan["merged"] for f in files):
            gone = set(plan["replaces"])
            files = [f for f in files if f.name not in gone]
        return files
    raise RuntimeError(f"{part}: the partition kept changing while being listed")


def _read_plan(part: Path) -> dict | None:
    try:
        return json.loads((part / STAGING / "plan.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def with_retry(fn: Callable[[], T]) -> T:
    """Run a read, listing the files again if one vanished under it (a compaction deleted a file the
    listing held): the read is retried on a fresh, consistent list."""
    for attempt in range(READ_RETRIES):
        try:
            return fn()
        except (duckdb.IOException, duckdb.InvalidInputException, OSError) as e:  # DuckDB may raise a bare OSError
            if attempt == READ_RETRIES - 1 or not _vanished(e):
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def _vanished(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, FileNotFoundError) or "No such file" in msg or "No files found" in msg or (
        "Cannot open file" in msg)


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
        self._seen: dict[dt.date, dict[tuple, int]] = {}  # key -> its timestamp (epoch us)
        self._floor: dict[dt.date, int] = {}  # keys older than this may be on disk only
        self._newest: dict[tuple, tuple] = {}  # key without its time -> newest key written
        self._pruned_at: dict[dt.date, int] = {}
        ensure_schemas(paths)
        self.small_files: dict[dt.date, int] = {}  # files this writer added since the last compaction

    def _state_for(self, day: dt.date) -> dict[tuple, int]:
        if day not in self._seen:
            if len(self._seen) >= 2:  # a poller moves on to the next day; old days are checked on disk
                oldest = min(self._seen)
                del self._seen[oldest], self._floor[oldest]
                self._pruned_at.pop(oldest, None)
            part = self.paths.partition(self.dataset, day)
            cols, ts = self._key_sql, _ident(self.ts_col)

            def load() -> list[tuple] | None:
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
            seen: dict[tuple, int] = {}
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

    def _on_disk(self, day: dt.date, keys: list[tuple]) -> set[tuple]:
        """Which of ``keys`` the partition on disk already holds (for rows older than the memory horizon)."""
        if not keys:
            return set()
        ts = [k[self.ts_pos] for k in keys]
        cols = self._key_sql
        part = self.paths.partition(self.dataset, day)

        def look() -> set[tuple]:
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


class _PartitionLock:
    """An exclusive, non-blocking ``flock`` on the partition: one compaction at a time (across threads and
    processes); writers and readers never take it."""

    def __init__(self, part: Path) -> None:
        part.mkdir(parents=True, exist_ok=True)
        self.fh = open(part / ".lock", "a")  # noqa: SIM115 - closed in release()

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self.fh.close()
            return False

    def release(self) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def compact(paths: LakePaths, dataset: str, day: dt.date, key: Iterable[str], order: Iterable[str],
            level: int | None = None, min_files: int = 2) -> tuple[int, int]:
    """Merge a date's files into one sorted file with large row groups. Crash-safe, and safe beside readers
    and writers (new files written meanwhile are left alone).

    ``level`` (rolling compaction during a session) merges only the files of that level into one file of the
    next: 0 = the writers' small ``part-*`` files, 1 = level-1 merges; cost bounded by the level's size, not
    the day's. Without it every file of the date is merged (end of day, ``microstructure compact``).

    Steps: bump the generation and record the plan (merged file, files it replaces); write the merged file
    in a hidden staging folder; rename it into the partition (the commit point); delete the replaced
    files; bump the generation; drop the plan. Readers see the old files or the merged one, never both
    (:func:`partition_files`). Returns (files before, files after); (n, n) if another compaction of this
    partition holds its lock.
    """
    part = paths.partition(dataset, day)
    if not part.exists():
        return 0, 0
    lock = _PartitionLock(part)
    if not lock.acquire():
        n = len(partition_files(part))
        return n, n
    try:
        recover(part)
        every = sorted(part.glob("*.parquet"))
        files = every if level is None else [f for f in every if f.name.startswith(LEVEL_PREFIX[level])]
        if len(files) < max(2, min_files):
            return len(every), len(every)
        prefix = MERGED_PREFIX if level is None else LEVEL_PREFIX[level + 1]
        name = f"{prefix}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        key_s, order_s = ", ".join(map(_ident, key)), ", ".join(map(_ident, order))
        # Every column any file has (a partition may mix files from before and after a column was added, like
        # the quarantine's ``origin``): union_by_name fills the older files' rows with NULL, nothing is dropped.
        names = list(dict.fromkeys(n for f in files for n in pq.read_schema(f).names))
        first = "received_ts" if "received_ts" in names else list(order)[-1]  # keep the first arrival
        staging = part / STAGING
        staging.mkdir(exist_ok=True)
        _bump_gen(part)  # odd: a compaction is under way
        atomic_write_bytes(json.dumps({"merged": name, "replaces": [f.name for f in files]}).encode(),
                           staging / "plan.json")
        _fsync_dir(staging)
        _crash_point("after_plan")
        # DuckDB streams the merge straight into the file under a memory limit (spilling to the staging
        # folder if it must): a whole day's partition never sits in this process's memory. The file list is
        # a bound parameter and the target goes through the relation API, so no path (or crafted file name)
        # is ever SQL text. Column names come from the files' schema: quoted, with any quote doubled.
        con = duckdb.connect(config={"threads": 1, "memory_limit": COMPACT_MEMORY,
                                     "temp_directory": str(staging / "spill"), "preserve_insertion_order": False})
        con.execute("SET TimeZone='UTC'")
        cols = ", ".join(_ident(c) for c in names)
        con.sql(f"SELECT {cols} FROM read_parquet($files, union_by_name = true) "
                f"QUALIFY row_number() OVER (PARTITION BY {key_s} ORDER BY {_ident(first)}) = 1 ORDER BY {order_s}",
                params={"files": [str(f) for f in files]}
                ).write_parquet(str(staging / name), compression="zstd", row_group_size=ROW_GROUP_SIZE)
        con.close()
        with open(staging / name, "rb") as fh:
            os.fsync(fh.fileno())
        _crash_point("after_merged_written")
        os.replace(staging / name, part / name)  # commit point
        _fsync_dir(part)
        _crash_point("after_commit")
        _finish(part, _read_plan(part) or {}, crash_midway=True)
        return len(every), len(every) - len(files) + 1
    finally:
        lock.release()


def _finish(part: Path, plan: dict, crash_midway: bool = False) -> None:
    """Delete what the committed plan replaces, then end the compaction (generation, plan, staging)."""
    for i, f in enumerate(plan.get("replaces", [])):
        (part / f).unlink(missing_ok=True)
        if crash_midway and i == 0:
            _crash_point("during_cleanup")
    _fsync_dir(part)
    _crash_point("before_gen_bump")
    _bump_gen(part)  # even again: no compaction under way
    _clear_staging(part)


def _clear_staging(part: Path) -> None:
    staging = part / STAGING
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    # A crashed writer's temporary files; a live writer's are seconds old and must be left alone.
    for f in part.glob(".*.tmp"):
        try:
            if time.time() - f.stat().st_mtime > 3600:
                f.unlink()
        except FileNotFoundError:
            pass


def recover(part: Path) -> None:
    """Finish or discard an interrupted compaction in partition ``part`` (called under its lock)."""
    plan = _read_plan(part)
    if plan is not None:
        if (part / plan["merged"]).exists():
            _finish(part, plan)  # committed: finish the clean-up
            return
        _bump_gen(part)  # never committed: the old files stand
    _clear_staging(part)


def read_snapshots(paths: LakePaths, lo: dt.datetime, hi: dt.datetime, symbols: Iterable[str] | None = None,
                   con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Snapshots with ``lo <= event_ts < hi`` (optionally only ``symbols``), read from the date partitions
    the window touches, in the lake's snapshot schema."""
    from microstructure.book import SNAPSHOT_SCHEMA
    from microstructure.transforms import to_arrow

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
    from microstructure.transforms import load_views

    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    load_views(con, paths)
    return con
