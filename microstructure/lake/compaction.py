"""Compaction: many small files of a partition merged into one, without a reader ever seeing both or neither.
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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from microstructure.contract.atomic import ROW_GROUP_SIZE, _fsync_dir, atomic_write_bytes
from microstructure.lake.paths import (
    GEN,
    LEVEL_PREFIX,
    MERGED_PREFIX,
    STAGING,
    LakePaths,
    _ident,
    _read_gen,
    _read_plan,
    partition_files,
)

COMPACT_MEMORY = "256MB"  # DuckDB's limit for one compaction; it spills beyond


def _crash_point(stage: str) -> None:
    """Fault injection for the crash tests: ``MICROSTRUCTURE_CRASH_AT=<stage>`` kills this process with
    SIGKILL at that stage of a compaction (a real kill -9, no clean-up runs)."""
    if os.environ.get("MICROSTRUCTURE_CRASH_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _bump_gen(part: Path) -> None:
    atomic_write_bytes(str(_read_gen(part) + 1).encode(), part / GEN)


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


def _finish(part: Path, plan: dict[str, Any], crash_midway: bool = False) -> None:
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
