"""The pipeline's steps as plain functions: poll, build features, validate & publish, compact.

``flows/`` wraps these in Prefect; the CLI and the tests call them directly. Data flows one way:
source -> snapshot -> lake -> transforms -> checks -> Feast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from microstructure import lake
from microstructure.book import KEY, SNAPSHOT_SCHEMA
from microstructure.ingest import QUARANTINE_KEY, Ingestor, outcomes_from
from microstructure.sources.base import OUTCOMES_KEY
from microstructure.transforms import FEATURES_SCHEMA, GAP_WINDOW, HALT_WINDOW, compute_features, to_arrow

if TYPE_CHECKING:
    from microstructure.checks import Checker, SqlChecker
    from microstructure.sources.base import Source

FEATURES_QUARANTINE_SCHEMA = FEATURES_SCHEMA.append(pa.field("reason", pa.string()))
SIM_STATE = Path("sim") / "state.npz"
COMPACT_EVERY = 25  # cycles between checks of the rolling compaction during a poll
# The appended datasets, each with its key and the sort order compaction gives its files.
DATASETS = ((lake.SNAPSHOTS, KEY, ("symbol", "event_ts")),
            (lake.QUARANTINE, QUARANTINE_KEY, ("symbol", "received_ts")),
            (lake.OUTCOMES, OUTCOMES_KEY, ("symbol", "cycle_ts")))


# ---- clock ------------------------------------------------------------------------------------
def cycle_times(start: dt.datetime, step_s: float, cycles: int, interval_s: float,
                end_at_now: bool = False) -> Iterator[dt.datetime]:
    """Cycle i happens at ``start + i * step``. With ``interval > 0`` we wait for the wall clock to get
    there (live polling); with ``interval == 0`` the clock is simulated and cycles run back to back.
    ``end_at_now`` takes a replay's last cycle no earlier than the wall clock, so a replay that ends
    "now" leaves fresh books online."""
    for i in range(cycles):
        t = start + dt.timedelta(seconds=i * step_s)
        if end_at_now and i == cycles - 1:
            t = max(t, dt.datetime.now(dt.UTC))
        if interval_s > 0:
            delay = (t - dt.datetime.now(dt.UTC)).total_seconds()
            if delay > 0:
                time.sleep(delay)
        yield t


class LiveClock:
    """Wall-clock cycle slots for a live poll: slot ``k`` is ``t0 + k * step``.

    ``t0`` is read when the first cycle is asked for, i.e. after Feast, GE and the sources have loaded,
    so start-up never eats into the schedule. A cycle that overruns does not make the next ones run late
    and back to back: the slots it missed are skipped (and counted), so every cycle polls the book as of
    now. Iteration ends after ``cycles`` slots or at ``until`` (whichever comes first).
    """

    def __init__(self, step_s: float, cycles: int | None = None, until: dt.datetime | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        if step_s <= 0:
            raise ValueError("a live clock needs a positive interval")
        self.step_s, self.cycles, self.until = step_s, cycles, until
        self.clock, self.sleep = clock, sleep
        self.skipped = 0

    def __iter__(self) -> Iterator[dt.datetime]:
        t0 = self.clock()
        k = 0
        done = 0
        end = self.until.timestamp() if self.until is not None else None
        while self.cycles is None or done < self.cycles:
            now = self.clock()
            due = t0 + k * self.step_s
            if now > due + self.step_s:  # overran: jump to the latest slot that has begun
                late = int((now - due) // self.step_s)
                self.skipped += late
                k += late
                due = t0 + k * self.step_s
            if end is not None and due >= end:
                return
            if due > now:
                self.sleep(due - now)
            yield dt.datetime.fromtimestamp(due, dt.UTC)
            done += 1
            k += 1


# ---- online path ------------------------------------------------------------------------------
class OnlinePublisher:
    """Computes features for each polled cycle with the pipeline's SQL and pushes them to Feast.

    It keeps a trailing buffer of snapshots so the windowed features (gap over 5 min, halt over 30 min)
    see the same history the offline build sees. Rows that cannot affect a later window are pruned
    (``_prune``): only halted rows matter to the 30-minute halt flag, and only undominated mids to the
    5-minute range.
    Rows that fail a row-level feature check are quarantined and not pushed; the cycle's other rows are. A
    batch-level failure holds the whole cycle.
    """

    MARGIN = dt.timedelta(seconds=60)  # slack for books that reach us a little late

    def __init__(self, paths: lake.LakePaths, store: Any, checker: Checker | SqlChecker | None) -> None:
        self.paths = paths
        self.store = store
        self.checker = checker
        self.con = duckdb.connect()
        self.buffer = SNAPSHOT_SCHEMA.empty_table()
        self.pending: list[pa.Table] = []
        self.quarantine = lake.PartitionWriter(paths, lake.FEATURES_QUARANTINE, ("symbol", "event_ts"),
                                               FEATURES_QUARANTINE_SCHEMA)
        self.pushed = 0
        self.rejected: Counter[str] = Counter()
        self.last_pushed: pa.Table | None = None

    def add_cycle(self, written: pa.Table) -> pa.Table:
        """Add a cycle's acknowledged snapshots; return its feature rows (also queued for the next flush)."""
        if written.num_rows == 0:
            return FEATURES_SCHEMA.empty_table()
        self.buffer = pa.concat_tables([self.buffer, written.cast(SNAPSHOT_SCHEMA)]).combine_chunks()
        feats = compute_features(self.buffer, self.con, only=written)
        self.pending.append(feats)
        self.buffer = self._prune(self.buffer, pc.min(written.column("event_ts")).as_py() - self.MARGIN)
        return feats

    @staticmethod
    def _prune(buffer: pa.Table, settled: dt.datetime) -> pa.Table:
        """Drop the rows no later cycle's features can depend on.

        Later rows arrive no earlier than ``settled`` (the cycle's oldest book less the late margin). Their
        5-minute mid range needs the rows of the last 5 minutes, but only those no settled later row dominates:
        a row with a higher (or equal) mid after it never sets a window's max, one with a lower (or equal) mid
        after it never sets the min, since every trailing window that holds the row holds the later one too.
        Their 30-minute halt flag needs only halted rows. Everything else goes: the buffer stays small (a few
        rows per symbol beyond the margin) and the SQL stays the one definition, run on what matters."""
        ts = buffer.column("event_ts").to_numpy(zero_copy_only=False).astype("datetime64[us]").astype(np.int64)
        settled_us = int(settled.timestamp() * 1_000_000)
        gap_us = int(GAP_WINDOW.total_seconds() * 1_000_000)
        halt_us = int(HALT_WINDOW.total_seconds() * 1_000_000)
        halted = pc.fill_null(buffer.column("halted"), False).to_numpy(zero_copy_only=False)
        mid = pc.divide(pc.add(buffer.column("bid_px_1"), buffer.column("ask_px_1")), 2.0)
        mid = pc.fill_null(mid, np.nan).to_numpy(zero_copy_only=False)
        sym = buffer.column("symbol").to_numpy(zero_copy_only=False)
        keep = ts >= settled_us  # still open to late arrivals: kept whole
        keep |= halted & (ts >= settled_us - halt_us)
        frozen = np.flatnonzero((ts < settled_us) & (ts >= settled_us - gap_us) & ~np.isnan(mid))
        if len(frozen):
            df = pd.DataFrame({"s": sym[frozen], "t": ts[frozen], "m": mid[frozen], "i": frozen})
            df = df.sort_values(["s", "t"], kind="stable").iloc[::-1]  # newest first within each symbol
            g = df.groupby("s", sort=False)["m"]
            later_max = g.cummax().groupby(df["s"], sort=False).shift(1)
            later_min = g.cummin().groupby(df["s"], sort=False).shift(1)
            m = df["m"]
            needed = ~((later_max >= m) & (later_min <= m))  # NaN (no later row) compares False: kept
            keep[df["i"].to_numpy()[needed.to_numpy()]] = True
        return buffer.filter(pa.array(keep))

    def flush(self) -> None:
        if not self.pending:
            return
        batch = pa.concat_tables(self.pending)
        self.pending = []
        if batch.num_rows == 0:
            return
        if self.checker is not None:
            # SqlChecker: row-level failures quarantine their rows only (the cycle's good books are still
            # served), a batch-level failure the whole batch. GE's Checker judges the batch as a whole.
            _, batch, bad = self.checker.split("features", batch)
            if bad.num_rows:
                self.rejected.update(bad.column("reason").to_pylist())
                self.quarantine.write(bad)
            if batch.num_rows == 0:
                return
        latest = latest_per_symbol(batch, self.con)
        if self.store is not None:
            from microstructure.store import push_online

            self.pushed += push_online(self.store, latest)
        self.last_pushed = latest


def latest_per_symbol(features: pa.Table, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The newest row per symbol: what the online store should hold after a batch."""
    con = con or duckdb.connect()
    con.register("latest_f", features)
    try:
        return to_arrow(con.sql("SELECT * FROM latest_f QUALIFY row_number() OVER (PARTITION BY symbol ORDER BY "
                                "received_ts DESC, event_ts DESC) = 1 ORDER BY symbol")).cast(FEATURES_SCHEMA)
    finally:
        con.unregister("latest_f")


# ---- ingestion --------------------------------------------------------------------------------
@dataclass
class PollStats:
    cycles: int = 0
    polled: int = 0  # symbol-polls attempted
    written: int = 0  # snapshots acknowledged (new to the lake)
    duplicates: int = 0  # snapshots already in the lake (stale quotes, re-runs)
    quarantined: Counter[str] = field(default_factory=Counter)
    online_pushed: int = 0
    online_rejected: Counter[str] = field(default_factory=Counter)
    dates: set[dt.date] = field(default_factory=set)
    seconds: float = 0.0
    skipped_slots: int = 0  # live: cycle slots skipped because an earlier cycle overran
    last_features: pa.Table | None = None
    served_by: Counter[str] = field(default_factory=Counter)  # symbol-polls served, per source
    missing: Counter[str] = field(default_factory=Counter)  # symbol-polls nobody served, per error class
    levels: dict[str, int] = field(default_factory=dict)  # symbol -> most levels served this run

    def count_outcomes(self, outcomes: pa.Table) -> None:
        for sym, src, lv, err in zip(*(outcomes.column(c).to_pylist() for c in
                                       ("symbol", "source", "book_levels", "error_class")), strict=True):
            if err is None:
                self.served_by[src] += 1
                self.levels[sym] = max(self.levels.get(sym, 0), lv or 0)
            else:
                self.missing[err] += 1
                self.levels.setdefault(sym, 0)

    def coverage(self) -> dict[str, int]:
        """Symbols with L2 (>= 5 levels), shallow (2-4), L1 only and none, as ``microstructure coverage``."""
        from microstructure.coverage import L2_MIN_LEVELS

        lv = list(self.levels.values())
        return {"l2": sum(v >= L2_MIN_LEVELS for v in lv), "shallow": sum(1 < v < L2_MIN_LEVELS for v in lv),
                "l1_only": sum(v == 1 for v in lv), "none": sum(v == 0 for v in lv)}

    def as_dict(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "polled": self.polled, "written": self.written,
                "coverage": self.coverage(), "served_by": dict(self.served_by), "missing": dict(self.missing),
                "duplicates": self.duplicates, "quarantined": dict(self.quarantined),
                "online_pushed": self.online_pushed, "online_rejected": dict(self.online_rejected),
                "dates": sorted(d.isoformat() for d in self.dates), "seconds": round(self.seconds, 2),
                "skipped_slots": self.skipped_slots}


def poll(
    paths: lake.LakePaths,
    source: Source,
    symbols: Sequence[str],
    times: Iterable[dt.datetime],
    publisher: OnlinePublisher | None = None,
    publish_every: int = 1,
    on_cycle: Callable[[int, PollStats], None] | None = None,
    ack_log: Path | None = None,
    after_ack: Callable[[], None] | None = None,
    compact_every: int = 0,
) -> PollStats:
    """Poll ``source`` once per cycle time, validate, write the lake, publish online.

    Each cycle's snapshots are written (and fsynced, and renamed into place) before the next poll, so a
    crash loses at most the cycle in flight. ``after_ack`` runs right after each cycle's write (the
    simulated market saves its state there); ``ack_log`` then gets one line per acknowledged write.
    ``compact_every`` > 0 checks the day's partitions every that many cycles and compacts them in the
    background when they hold too many files (see :class:`RollingCompactor`).
    """
    ingestor = Ingestor(paths)
    compactor = RollingCompactor(paths) if compact_every > 0 else None
    stats = PollStats()
    t0 = time.perf_counter()
    ack = open(ack_log, "a") if ack_log else None  # noqa: SIM115 - kept open across cycles
    try:
        for i, at in enumerate(times):
            res = source.poll(symbols, at)
            got = ingestor.ingest(res.raw, res.rejected)
            outcomes = res.outcomes if res.outcomes is not None else outcomes_from(symbols, at, source.name, got)
            ingestor.record(outcomes)
            stats.count_outcomes(outcomes)
            stats.quarantined.update(got.reasons())
            new = got.written
            stats.cycles += 1
            stats.polled += len(symbols)
            stats.written += new.num_rows
            stats.duplicates += got.duplicates
            stats.dates.update(dt.date.fromisoformat(d) for d in
                               pc.unique(pc.strftime(new.column("event_ts"), "%Y-%m-%d")).to_pylist())
            if after_ack is not None:
                after_ack()
            if compactor is not None and (i + 1) % compact_every == 0:
                compactor.kick(stats.dates)
            if ack:
                ack.write(f"{i} {new.num_rows} {stats.written}\n")
                ack.flush()
            if publisher is not None:
                publisher.add_cycle(new)
                if (i + 1) % publish_every == 0:
                    publisher.flush()
            if on_cycle:
                on_cycle(i, stats)
            if i == 0 and isinstance(times, LiveClock):
                # Everything loaded by now (Feast, GE, DuckDB, the sources) lives for the whole session: move it
                # out of the collector's sight, so full collections walk only what the cycles allocate (the
                # long-lived heap otherwise turns a few ms into 100+ ms pauses mid-cycle).
                import gc

                gc.collect()
                gc.freeze()
        if publisher is not None:
            publisher.flush()
            stats.online_pushed = publisher.pushed
            stats.online_rejected = publisher.rejected
            stats.last_features = publisher.last_pushed
    finally:
        if ack:
            ack.close()
        if compactor is not None:
            compactor.join()
    stats.seconds = time.perf_counter() - t0
    stats.skipped_slots = getattr(times, "skipped", 0)
    return stats


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


def build_day(paths: lake.LakePaths, day: dt.date, engine: str = "duckdb") -> tuple[pa.Table, pa.Table]:
    """Snapshots of ``day`` and their features, computed over the day plus the 35 minutes before it (the
    windows' reach) with ``features.sql`` on DuckDB in process, or on Spark (``microstructure.spark``)."""
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    lo, hi = start - HALT_WINDOW - GAP_WINDOW, start + dt.timedelta(days=1)
    start_s = pa.scalar(start, pa.timestamp("us", tz="UTC"))
    if engine == "spark":
        from microstructure import spark

        files = paths.files(lake.SNAPSHOTS, [day - dt.timedelta(days=1), day])
        if not files:
            return SNAPSHOT_SCHEMA.empty_table(), FEATURES_SCHEMA.empty_table()
        feats = spark.compute_features(files, lo, hi)
        snaps = lake.read_snapshots(paths, start, hi)
    elif engine == "duckdb":
        con = duckdb.connect()
        snaps = lake.read_snapshots(paths, lo, hi, con=con)
        if snaps.num_rows == 0:
            return SNAPSHOT_SCHEMA.empty_table(), FEATURES_SCHEMA.empty_table()
        feats = compute_features(snaps, con)
        snaps = snaps.filter(pc.greater_equal(snaps.column("event_ts"), start_s))
    else:
        raise ValueError(f"engine must be duckdb or spark, not {engine!r}")
    return snaps, feats.filter(pc.greater_equal(feats.column("event_ts"), start_s))


def build_and_publish(paths: lake.LakePaths, days: Sequence[dt.date] | None = None,
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
    for day in days or paths.dates(lake.SNAPSHOTS):
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
    from microstructure.book import EARLIEST, latest_plausible

    hi = latest_plausible().date()
    if EARLIEST.date() <= day <= hi:
        return None
    return (f"implausible date: no real book is dated {day.isoformat()} (plausible: {EARLIEST.date().isoformat()} "
            f"to {hi.isoformat()}); its rows have broken timestamps, not built")


def _partition_rows(paths: lake.LakePaths, day: dt.date) -> int:
    """The date's snapshot rows, from the files' footers (for the report only: 0 if they cannot be read)."""
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in paths.files(lake.SNAPSHOTS, [day]))
    except (OSError, ValueError, pa.ArrowException):
        return 0


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _record_reasons(paths: lake.LakePaths, day: dt.date, reasons: list[str]) -> None:
    """``features_quarantine/date=.../build-<stamp>.json``: why the date was not built (``validate`` lists
    them with the quarantined batches). Best effort: the report already carries the reason, and a full disk
    must not replace it with another error."""
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
    with contextlib.suppress(OSError):
        lake.atomic_write_bytes(json.dumps({"date": day.isoformat(), "reasons": reasons}).encode(),
                                paths.partition(lake.FEATURES_QUARANTINE, day) / f"build-{stamp}.json")


def _build_and_publish_day(paths: lake.LakePaths, day: dt.date, checker: Checker | None,
                           engine: str) -> BuildResult:
    snaps, feats = build_day(paths, day, engine)
    reasons: list[str] = []
    if checker is not None:
        for kind, table in (("snapshots", snaps), ("features", feats)):
            res = checker.check(kind, table.to_pandas(), batch=f"{kind} {day.isoformat()}")
            if not res.success:
                reasons.append(f"{kind}: {res.reason}")
    target = paths.partition(lake.FEATURES, day) / "features.parquet"
    if reasons:
        qdir = paths.partition(lake.FEATURES_QUARANTINE, day)
        stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
        lake.atomic_write_parquet(
            feats.append_column("reason", pa.array(["; ".join(reasons)] * feats.num_rows, pa.string())),
            qdir / f"batch-{stamp}.parquet")
        lake.atomic_write_bytes(json.dumps({"date": day.isoformat(), "reasons": reasons}).encode(),
                                qdir / f"batch-{stamp}.json")
    else:
        lake.atomic_write_parquet(feats, target)
    return BuildResult(day, snaps.num_rows, feats.num_rows, not reasons, reasons, 0.0)


class RollingCompactor:
    """Keeps a live session's partitions at a bounded number of files, off the polling thread.

    Every check, for each of the session's dates and datasets: when the writers' small ``part-*`` files
    reach ``SMALL_MAX`` they are merged into one level-1 file; when ``LEVEL1_MAX`` level-1 files pile up they
    are merged into one level-2 file, which is not merged again during the session. Every merge is bounded
    (64 cycles, or 8 x 64 cycles, of rows), never the whole day, so its time and memory do not grow as the day
    goes on. A partition holds at most SMALL_MAX + LEVEL1_MAX files plus one level-2 file per ~512 cycles
    (~23 in a 11,700-cycle session). One compaction runs at a time, on a daemon thread; readers and the
    writer carry on (see ``lake.compact``).
    """

    SMALL_MAX = 64
    LEVEL1_MAX = 8

    def __init__(self, paths: lake.LakePaths) -> None:
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
                    names = [f.name for f in lake.partition_files(part)]
                    small = sum(n.startswith(lake.LEVEL_PREFIX[0]) for n in names)
                    level1 = sum(n.startswith(lake.LEVEL_PREFIX[1]) for n in names)
                    if small >= self.SMALL_MAX:
                        lake.compact(self.paths, name, day, key, order, level=0)
                        self.runs += 1
                    if level1 + (small >= self.SMALL_MAX) >= self.LEVEL1_MAX:
                        lake.compact(self.paths, name, day, key, order, level=1)
                        self.runs += 1
        except Exception as e:  # never kill the poll; the next kick tries again, the error is kept
            self.error = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def compact_all(paths: lake.LakePaths, days: Sequence[dt.date] | None = None) -> dict[str, tuple[int, int]]:
    out = {}
    for name, key, order in DATASETS:
        for day in days or paths.dates(name):
            if paths.partition(name, day).exists():
                out[f"{name}/{day}"] = lake.compact(paths, name, day, key, order)
    return out


# ---- the simulated source's persisted state ---------------------------------------------------
class MarketConflict(Exception):
    """The data dir holds another simulated market than the one asked for: never mix two in one lake."""


def simulated_source(paths: lake.LakePaths, seed: int | None, fresh: bool) -> Any:
    """The data dir's simulated market, continued where it stopped (its state is saved every cycle).

    ``fresh`` starts over: the lake, the market state and the online store of the data dir are removed
    first, so two markets never share a lake. A ``seed`` other than the saved market's, or a lake of
    simulated books with no saved market, is a :class:`MarketConflict` (one line, with the way out).
    """
    from microstructure.sources.simulated import SOURCE_NAME, SimulatedSource

    data_dir = paths.data_dir
    state = data_dir / SIM_STATE
    if fresh:
        from microstructure.datadir import require_ours
        from microstructure.store import clear_online, forget_store

        require_ours(data_dir)  # never clear a folder this project did not create (nothing is deleted)
        clear_online()
        for d in (paths.root, state.parent, data_dir / "feast"):
            shutil.rmtree(d, ignore_errors=True)
        forget_store(data_dir)
        return SimulatedSource(seed=7 if seed is None else seed)
    if state.exists():
        src = SimulatedSource.load(state)
        if seed is not None and seed != src.seed:
            raise MarketConflict(f"{data_dir} holds the simulated market of seed {src.seed}, not {seed}: pass "
                                 "--fresh to start over (removes its lake) or use another --data-dir")
        return src
    if paths.has(lake.SNAPSHOTS) and _has_source(paths, SOURCE_NAME):
        raise MarketConflict(f"{data_dir} holds simulated books but no saved market to continue: pass --fresh "
                             "to start over (removes its lake) or use another --data-dir")
    return SimulatedSource(seed=7 if seed is None else seed)


def _has_source(paths: lake.LakePaths, source: str) -> bool:
    def look() -> bool:
        files = paths.files(lake.SNAPSHOTS)  # listed again if a retry follows a compaction
        return bool(files) and bool(duckdb.connect().execute(
            "SELECT 1 FROM read_parquet(?) WHERE source = ? LIMIT 1", [files, source]).fetchall())

    return lake.with_retry(look)


def save_simulated(data_dir: Path, source: Any) -> None:
    from microstructure.sources.simulated import SimulatedSource

    if isinstance(source, SimulatedSource):
        source.save(data_dir / SIM_STATE)
