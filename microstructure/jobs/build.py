"""The offline build: a date of snapshots to checked, published features, and the lake's compaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from microstructure.contract.atomic import atomic_write_bytes, atomic_write_parquet
from microstructure.contract.book import KEY, SNAPSHOT_SCHEMA
from microstructure.contract.outcomes import OUTCOMES_KEY
from microstructure.contract.schemas import FEATURES_SCHEMA, GAP_WINDOW, HALT_WINDOW
from microstructure.features.compute import compute_features
from microstructure.jobs.ingest import QUARANTINE_KEY
from microstructure.lake.compaction import compact
from microstructure.lake.paths import (
    FEATURES,
    FEATURES_QUARANTINE,
    LEVEL_PREFIX,
    OUTCOMES,
    QUARANTINE,
    SNAPSHOTS,
    LakePaths,
    partition_files,
)
from microstructure.lake.views import read_snapshots

if TYPE_CHECKING:
    from microstructure.checks.ge import Checker

FEATURES_QUARANTINE_SCHEMA = FEATURES_SCHEMA.append(pa.field("reason", pa.string()))
# The lake's datasets a poll appends to: (name, key, compaction order).
DATASETS = ((SNAPSHOTS, KEY, ("symbol", "event_ts")),
            (QUARANTINE, QUARANTINE_KEY, ("symbol", "received_ts")),
            (OUTCOMES, OUTCOMES_KEY, ("symbol", "cycle_ts")))


# ---- offline: build, check, publish -----------------------------------------------------------
@dataclass
class BuildResult:
    day: dt.date
    snapshots: int
    features: int
    published: bool
    reasons: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"date": self.day.isoformat(), "snapshots": self.snapshots, "features": self.features,
                "published": self.published, "reasons": self.reasons, "seconds": round(self.seconds, 2)}


def build_day(paths: LakePaths, day: dt.date, engine: str = "duckdb") -> tuple[pa.Table, pa.Table]:
    """Snapshots of ``day`` and their features, computed over the day plus the 35 minutes before it (the
    windows' reach) with ``features.sql`` on DuckDB in process, or on Spark (``microstructure.features.spark``)."""
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    lo, hi = start - HALT_WINDOW - GAP_WINDOW, start + dt.timedelta(days=1)
    start_s = pa.scalar(start, pa.timestamp("us", tz="UTC"))
    if engine == "spark":
        from microstructure.features import spark

        files = paths.files(SNAPSHOTS, [day - dt.timedelta(days=1), day])
        if not files:
            return SNAPSHOT_SCHEMA.empty_table(), FEATURES_SCHEMA.empty_table()
        feats = spark.compute_features(files, lo, hi)
        snaps = read_snapshots(paths, start, hi)
    elif engine == "duckdb":
        con = duckdb.connect()
        snaps = read_snapshots(paths, lo, hi, con=con)
        if snaps.num_rows == 0:
            return SNAPSHOT_SCHEMA.empty_table(), FEATURES_SCHEMA.empty_table()
        feats = compute_features(snaps, con)
        snaps = snaps.filter(pc.greater_equal(snaps.column("event_ts"), start_s))
    else:
        raise ValueError(f"engine must be duckdb or spark, not {engine!r}")
    return snaps, feats.filter(pc.greater_equal(feats.column("event_ts"), start_s))


def build_and_publish(paths: LakePaths, days: Sequence[dt.date] | None = None,
                      checker: Checker | None = None, engine: str = "duckdb") -> list[BuildResult]:
    """For each date: build features from the lake (``engine``: duckdb, or spark for the same SQL on a Spark
    session), check snapshots and features, then publish the features where Feast reads them, or quarantine
    the batch with the reasons.

    Each date stands alone: a date whose partition cannot be built (a date no real book has, such as a
    year-0001 row an older version wrote, or any error while building or checking it) is reported as not
    published, with its reason, also recorded beside the quarantined batches; the other dates still build and
    publish. Its features already published, if any, are left as they were."""
    if engine not in ("duckdb", "spark"):
        raise ValueError(f"engine must be duckdb or spark, not {engine!r}")
    out = []
    for day in days or paths.dates(SNAPSHOTS):
        t0 = time.perf_counter()
        why = _implausible_day(day)
        if why is not None:
            res = BuildResult(day, _partition_rows(paths, day), 0, False, [why], 0.0)
            _record_reasons(paths, day, res.reasons)
        else:
            try:
                res = _build_and_publish_day(paths, day, checker, engine)
            except Exception as e:  # one bad date never blocks the others: it is reported, they go on
                res = BuildResult(day, 0, 0, False, [f"build failed: {type(e).__name__}: {_first_line(e)}"], 0.0)
                _record_reasons(paths, day, res.reasons)
        res.seconds = time.perf_counter() - t0
        out.append(res)
    return out


def _implausible_day(day: dt.date) -> str | None:
    """Why a date partition cannot hold real books (the readers' ``implausible_time`` range), or None."""
    from microstructure.contract.book import EARLIEST, latest_plausible

    hi = latest_plausible().date()
    if EARLIEST.date() <= day <= hi:
        return None
    return (f"implausible date: no real book is dated {day.isoformat()} (plausible: {EARLIEST.date().isoformat()} "
            f"to {hi.isoformat()}); its rows have broken timestamps, not built")


def _partition_rows(paths: LakePaths, day: dt.date) -> int:
    """The date's snapshot rows, from the files' footers (for the report only: 0 if they cannot be read)."""
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in paths.files(SNAPSHOTS, [day]))
    except (OSError, ValueError, pa.ArrowException):
        return 0


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _record_reasons(paths: LakePaths, day: dt.date, reasons: list[str]) -> None:
    """``features_quarantine/date=.../build-<stamp>.json``: why the date was not built (``validate`` lists
    them with the quarantined batches). Best effort: the report already carries the reason, and a full disk
    must not replace it with another error."""
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
    with contextlib.suppress(OSError):
        atomic_write_bytes(json.dumps({"date": day.isoformat(), "reasons": reasons}).encode(),
                                paths.partition(FEATURES_QUARANTINE, day) / f"build-{stamp}.json")


def _build_and_publish_day(paths: LakePaths, day: dt.date, checker: Checker | None,
                           engine: str) -> BuildResult:
    snaps, feats = build_day(paths, day, engine)
    reasons: list[str] = []
    if checker is not None:
        for kind, table in (("snapshots", snaps), ("features", feats)):
            res = checker.check(kind, table.to_pandas(), batch=f"{kind} {day.isoformat()}")
            if not res.success:
                reasons.append(f"{kind}: {res.reason}")
    target = paths.partition(FEATURES, day) / "features.parquet"
    if reasons:
        qdir = paths.partition(FEATURES_QUARANTINE, day)
        stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
        atomic_write_parquet(
            feats.append_column("reason", pa.array(["; ".join(reasons)] * feats.num_rows, pa.string())),
            qdir / f"batch-{stamp}.parquet")
        atomic_write_bytes(json.dumps({"date": day.isoformat(), "reasons": reasons}).encode(),
                                qdir / f"batch-{stamp}.json")
    else:
        atomic_write_parquet(feats, target)
    return BuildResult(day, snaps.num_rows, feats.num_rows, not reasons, reasons, 0.0)


# The most files a date partition of an appended dataset may hold during a poll, live or replay (docs/lake.md,
# docs/operations.md): readers list and open every file of a partition, so their cost follows this count.
PARTITION_FILES_MAX = 200


class RollingCompactor:
    """Keeps a poll's partitions at a bounded number of files (``PARTITION_FILES_MAX``), off the polling thread.

    Every check, for each of the session's dates and datasets: when the writers' small ``part-*`` files
    reach ``SMALL_MAX`` they are merged into one level-1 file; when ``LEVEL1_MAX`` level-1 files pile up they
    are merged into one level-2 file, which is not merged again during the session. Every merge is bounded
    (64 cycles, or 8 x 64 cycles, of rows), never the whole day, so its time and memory do not grow as the day
    goes on. A partition holds at most SMALL_MAX + LEVEL1_MAX files plus one level-2 file per ~512 cycles
    (~23 in a 11,700-cycle session). Should the level-2 files ever bring the partition within
    ``SMALL_MAX + LEVEL1_MAX`` files of the bound (a day of 30,000 to 65,000 cycles or more), the whole date is
    merged into one file, so the bound holds for a poll of any length. One compaction runs at a time, on a daemon
    thread; readers and the writer carry on (see ``compact``).

    A check finding the previous compaction still running is skipped, except with ``wait`` (a replay) when a
    partition holds ``FILES_MAX - SMALL_MAX`` files or more: then it waits for it and starts the next. A
    replay's cycles run back to back, far faster than a live poll's, and could otherwise outrun the compactor;
    they wait only near the bound, so the compaction runs beside the replay (the other core) nearly always. A
    live poll never waits (its cycles keep the wall clock's schedule).
    """

    SMALL_MAX = 64
    LEVEL1_MAX = 8
    FILES_MAX = PARTITION_FILES_MAX

    def __init__(self, paths: LakePaths, wait: bool = False) -> None:
        self.paths = paths
        self.wait = wait
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.error: BaseException | None = None

    def kick(self, dates: Iterable[dt.date]) -> None:
        days = sorted(dates)[-2:]
        if self._thread is not None and self._thread.is_alive():
            if not self.wait or self._most_files(days) < self.FILES_MAX - self.SMALL_MAX:
                return  # the running compaction catches up at the next check: its level-0 merge takes all
            self._thread.join()
        self._thread = threading.Thread(target=self._run, args=(days,), name="rolling-compaction", daemon=True)
        self._thread.start()

    def _most_files(self, days: list[dt.date]) -> int:
        return max((len(partition_files(self.paths.partition(name, day))) for name, _, _ in DATASETS for day in days),
                   default=0)

    def _run(self, days: list[dt.date]) -> None:
        try:
            for name, key, order in DATASETS:
                for day in days:
                    part = self.paths.partition(name, day)
                    if not part.exists():
                        continue
                    names = [f.name for f in partition_files(part)]
                    small = sum(n.startswith(LEVEL_PREFIX[0]) for n in names)
                    level1 = sum(n.startswith(LEVEL_PREFIX[1]) for n in names)
                    if small >= self.SMALL_MAX:
                        compact(self.paths, name, day, key, order, level=0)
                        self.runs += 1
                    if level1 + (small >= self.SMALL_MAX) >= self.LEVEL1_MAX:
                        compact(self.paths, name, day, key, order, level=1)
                        self.runs += 1
                    if len(partition_files(part)) > self.FILES_MAX - self.SMALL_MAX - self.LEVEL1_MAX:
                        compact(self.paths, name, day, key, order)  # rare: the whole date, once
                        self.runs += 1
        except Exception as e:  # never kill the poll; the next kick tries again, the error is kept
            self.error = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def compact_all(paths: LakePaths, days: Sequence[dt.date] | None = None) -> dict[str, tuple[int, int]]:
    out = {}
    for name, key, order in DATASETS:
        for day in days or paths.dates(name):
            if paths.partition(name, day).exists():
                out[f"{name}/{day}"] = compact(paths, name, day, key, order)
    return out


# ---- nightly: rebuild only what changed ----------------------------------------------------------
# The manifest of what was last built, beside the published features (pyarrow and Feast skip ``_`` names).
MANIFEST = "_published.json"
MANIFEST_VERSION = 1


def manifest_path(paths: LakePaths) -> Path:
    return paths.dataset(FEATURES) / MANIFEST


def fingerprint(paths: LakePaths, day: dt.date) -> str:
    """A digest of the date's appended partitions as a reader sees them (consistent file lists: names and
    sizes). Every write adds a file and every compaction renames, so any change to the date changes it."""
    h = hashlib.sha256()
    for name, _, _ in DATASETS:
        h.update(f"{name}\0".encode())
        for f in partition_files(paths.partition(name, day)):
            with contextlib.suppress(FileNotFoundError):  # compacted away meanwhile: the digest just differs
                h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()[:32]


def read_manifest(paths: LakePaths) -> dict[str, str]:
    """Date (ISO) -> fingerprint at its last build. Whatever is wrong with the file (missing, unreadable, not
    JSON, another shape, another version) reads as empty or drops the bad entries: everything not listed is
    rebuilt, so a bad manifest costs a rebuild, never a failure. Plain JSON, never code."""
    try:
        doc = json.loads(manifest_path(paths).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION or not isinstance(doc.get("dates"), dict):
        return {}
    out = {}
    for day, entry in doc["dates"].items():
        fp = entry.get("fingerprint") if isinstance(entry, dict) else None
        if isinstance(day, str) and isinstance(fp, str):
            out[day] = fp
    return out


def write_manifest(paths: LakePaths, built: Sequence[dt.date]) -> None:
    """Record ``built`` dates' current fingerprints (after their build and compaction), atomically."""
    if not built:
        return
    dates = read_manifest(paths)
    for day in built:
        dates[day.isoformat()] = fingerprint(paths, day)
    doc = {"version": MANIFEST_VERSION, "dates": {d: {"fingerprint": fp} for d, fp in sorted(dates.items())}}
    atomic_write_bytes(json.dumps(doc, indent=1).encode(), manifest_path(paths))


def changed_dates(paths: LakePaths) -> list[dt.date]:
    """Dates whose partitions differ from their last build, plus the date after each (its features' windows
    reach 35 minutes back into the changed date) when the lake holds it."""
    seen = read_manifest(paths)
    days = sorted(set().union(*(paths.dates(name) for name, _, _ in DATASETS)))
    changed = {d for d in days if seen.get(d.isoformat()) != fingerprint(paths, d)}
    have = set(paths.dates(SNAPSHOTS))
    return sorted(changed | {d + dt.timedelta(days=1) for d in changed if d + dt.timedelta(days=1) in have})


@dataclass
class RebuildResult:
    builds: list[BuildResult]
    compacted: dict[str, tuple[int, int]]

    def as_dict(self) -> dict[str, Any]:
        return {"builds": [b.as_dict() for b in self.builds],
                "compacted": {k: list(v) for k, v in self.compacted.items()}}


def rebuild(paths: LakePaths, days: Sequence[dt.date] | None = None,
            make_checker: Callable[[], Checker] | None = None, engine: str = "duckdb") -> RebuildResult:
    """Build, check and publish, then compact, ``days`` (default: :func:`changed_dates`), and record them in
    the manifest. With nothing changed it returns at once and touches no file (the checker, which sets up its
    GE project, is not even made). Every date built is recorded, published or not: a quarantined date is not
    retried until its data changes (``build-features --date`` retries it at once)."""
    days = list(days) if days is not None else changed_dates(paths)
    if not days:
        return RebuildResult([], {})
    builds = build_and_publish(paths, days, make_checker() if make_checker else None, engine)
    compacted = compact_all(paths, days)
    write_manifest(paths, days)
    return RebuildResult(builds, compacted)
