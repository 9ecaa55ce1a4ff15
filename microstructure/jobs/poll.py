"""The poll loop: a cycle per interval, each one polled, ingested, published online and summarised.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from microstructure.jobs.ingest import Ingestor, outcomes_from
from microstructure.lake import paths as lake

if TYPE_CHECKING:
    from microstructure.sources.base import Source
from microstructure.jobs.build import RollingCompactor
from microstructure.jobs.publisher import OnlinePublisher

COMPACT_EVERY = 25  # cycles between checks of the rolling compaction during a poll, live or replay



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
    last_outcomes: pa.Table | None = None  # the latest cycle's outcomes, for on_cycle callbacks (jobs.metrics)

    def count_outcomes(self, outcomes: pa.Table) -> None:
        self.last_outcomes = outcomes
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
        from microstructure.lake.coverage import L2_MIN_LEVELS

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


def poll_cycles(
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
    background when they hold too many files (see :class:`RollingCompactor`). On a simulated clock (a replay,
    anything but a :class:`LiveClock`) a check near the bound waits for the running compaction, so the replay
    cannot outrun it.
    """
    ingestor = Ingestor(paths)
    compactor = RollingCompactor(paths, wait=not isinstance(times, LiveClock)) if compact_every > 0 else None
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
                    stats.last_features = publisher.last_pushed  # on_cycle sees the online books' age mid-run
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
