"""The offline build: a date of snapshots to checked, published features, and the lake's compaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


class RollingCompactor:
    """Keeps a live session's partitions at a bounded number of files, off the polling thread.

    Every check, for each of the session's dates and datasets: when the writers' small ``part-*`` files
    reach ``SMALL_MAX`` they are merged into one level-1 file; when ``LEVEL1_MAX`` level-1 files pile up they
    are merged into one level-2 file, which is not merged again during the session. Every merge is bounded
    (64 cycles, or 8 x 64 cycles, of rows), never the whole day, so its time and memory do not grow as the day
    goes on. A partition holds at most SMALL_MAX + LEVEL1_MAX files plus one level-2 file per ~512 cycles
    (~23 in a 11,700-cycle session). One compaction runs at a time, on a daemon thread; readers and the
    writer carry on (see ``compact``).
    """

    SMALL_MAX = 64
    LEVEL1_MAX = 8

    def __init__(self, paths: LakePaths) -> None:
        self.paths = paths
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.error: BaseException | None = None

    def kick(self, dates: Iterable[dt.date]) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        days = sorted(dates)[-2:]
        self._thread = threading.Thread(target=self._run, args=(days,), name="rolling-compaction", daemon=True)
        self._thread.start()

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
