"""The lake's layout and its consistent file lists.

Each dataset is hive-partitioned by date (``<lake>/<dataset>/date=YYYY-MM-DD/*.parquet``). A reader lists a
partition's files under its generation counter so that it never sees a compacted file beside the files it replaced
(see :func:`partition_files`); readers never block on writers or compactors.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from microstructure.contract.atomic import atomic_write_parquet

SNAPSHOTS = "snapshots"
QUARANTINE = "quarantine"
FEATURES = "features"
FEATURES_QUARANTINE = "features_quarantine"
OUTCOMES = "outcomes"
GEN = ".gen"
STAGING = ".compacting"
SMALL_PREFIX = "part-"
MERGED_PREFIX = "compacted-"
# Rolling compaction's levels: level-1 files merge writers' small files, level-2 files merge level-1 files and
# are not merged again during the session, so no merge ever grows with the day (a full `compact` merges all).
LEVEL_PREFIX = {0: SMALL_PREFIX, 1: f"{MERGED_PREFIX}L1-", 2: f"{MERGED_PREFIX}L2-"}
READ_RETRIES = 8
T = TypeVar("T")


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
    from microstructure.contract.schemas import EMPTY

    for name, schema in EMPTY.items():
        f = schema_file(paths, name)
        if not f.exists():
            atomic_write_parquet(schema.empty_table(), f)


def _read_gen(part: Path) -> int:
    try:
        return int((part / GEN).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


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


def _read_plan(part: Path) -> dict[str, Any] | None:
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
