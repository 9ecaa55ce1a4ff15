"""The poll loop: live cycle slots on the clock (a missed slot is skipped, never queued), live timestamps read
from the wall clock, Hive partitions written per cycle, and an unknown symbol quarantined, not dropped."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from microstructure.jobs.poll import LiveClock, cycle_times, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import LakePaths
from microstructure.lake.views import read_snapshots
from microstructure.sources.simulated import SimulatedSource, universe
from tests.conftest import T0


def test_live_clock_starts_when_first_asked_and_skips_missed_slots():
    now = [1000.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    clock = LiveClock(2.0, cycles=4, clock=lambda: now[0], sleep=sleep)
    it = iter(clock)
    now[0] = 1005.0  # initialisation took 5 s: the schedule starts now, not at construction
    first = next(it)
    assert first.timestamp() == 1005.0
    now[0] += 7.1  # the cycle overran by three slots
    assert next(it).timestamp() == 1011.0 and clock.skipped == 2
    assert next(it).timestamp() == 1013.0 and slept[-1] == pytest.approx(0.9)
    assert next(it).timestamp() == 1015.0
    with pytest.raises(StopIteration):
        next(it)
    until = LiveClock(1.0, until=dt.datetime.fromtimestamp(1003.5, dt.UTC), clock=lambda: now[0],
                               sleep=sleep)
    now[0] = 1000.0
    assert [t.timestamp() for t in until] == [1000.0, 1001.0, 1002.0, 1003.0]


# ---- wall-clock time with a deliberately slow source ------------------------------------------------------
class SlowSource:
    """The simulated book behind a vendor that takes 600 ms to answer (over two 250 ms slots, whatever the rest
    of the cycle costs); records each call's span."""

    name = "simulated"

    def __init__(self) -> None:
        self.inner = SimulatedSource(seed=11)
        self.inner.live = True
        self.spans: list[tuple[dt.datetime, dt.datetime, dt.datetime]] = []  # slot, call start, call end
        self.answers: list[dict[str, dt.datetime]] = []  # each call's book time per symbol

    def poll(self, symbols, at):
        start = dt.datetime.now(dt.UTC)
        time.sleep(0.6)
        res = self.inner.poll(symbols, at)
        self.spans.append((at, start, dt.datetime.now(dt.UTC)))
        self.answers.append(dict(zip(res.raw.column("symbol").to_pylist(), res.raw.column("event_ts").to_pylist(),
                                     strict=True)))
        return res


@pytest.mark.integration  # the wall clock is the subject: a vendor that really takes 600 ms, 8 times
def test_live_times_are_the_clock_and_overruns_skip_slots(tmp_path):
    from microstructure.checks.ge import Checker
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    paths = LakePaths(tmp_path / "d")
    src = SlowSource()
    syms = universe()[:30]
    store = open_store(paths.data_dir)
    pub = OnlinePublisher(paths, store, Checker())
    # A vendor that hands back its previous quote every time for one symbol (the simulator's stale quotes, which
    # hit any symbol at random, and more often when load stretches the cycles): that book really is older than
    # the poll, and online must show it as it is.
    frozen = "ILQ01"
    src.inner.stale_prob[src.inner.index[frozen]] = 1.0
    writes: list[dt.datetime] = []
    online: list[tuple[str, dt.datetime | None, dt.datetime]] = []  # symbol, its online event_ts, a bound
    older_than_the_call: list[str] = []

    def on_cycle(i, stats):
        writes.append(dt.datetime.now(dt.UTC))
        if i > 0:
            # No older than the book the vendor answered in the previous cycle's call, to the microsecond. (Not
            # the call's start: a repeated quote keeps its old time, and is older than any recent call.)
            rows = read_online(store, syms[:5])
            online.extend((r.symbol, r.event_ts, src.answers[i - 1][r.symbol]) for r in rows)
            older_than_the_call.extend(r.symbol for r in rows
                                       if r.event_ts is not None and r.event_ts < src.spans[i - 1][1])

    clock = LiveClock(0.25, cycles=8)  # the source alone takes longer than a slot
    stats = poll_cycles(paths, src, syms, clock, publisher=pub, on_cycle=on_cycle)
    assert stats.cycles == 8 and stats.skipped_slots >= 7  # overran every slot: skipped, never queued
    snaps = read_snapshots(paths, dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime.now(dt.UTC)).to_pylist()
    assert snaps
    for slot, start, _end in src.spans:
        assert slot <= start  # no slot is stamped before its cycle began
    spans = [(s, e) for _, s, e in src.spans]
    for r in snaps:
        # received_ts lies inside a call's span (between its start and the answer) and before the write.
        assert any(s <= r["received_ts"] <= e for s, e in spans), r["received_ts"]
        assert r["event_ts"] <= r["received_ts"]
        assert r["received_ts"] <= max(writes)
    # Online rows are as young as the poll: right after a cycle, each symbol's online book is that cycle's (or,
    # had its book been quarantined this once, the one before); never the schedule's backlog, which grew by a
    # slot every cycle before. Judged by the vendor's own answers, not by a duration.
    assert len(online) == 5 * 7
    late = [o for o in online if o[1] is None or o[1] < o[2]]
    assert not late, late
    assert frozen in older_than_the_call  # the repeated quote was served, older than the previous call


# ---- what a cycle writes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cycles", [1])
def test_poll_writes_hive_partitions(data_dir, cycles):
    paths = LakePaths(data_dir)
    poll_cycles(paths, SimulatedSource(seed=1), universe()[:3], cycle_times(T0, 2, cycles, 0))
    assert (data_dir / "lake" / "snapshots" / f"date={T0.date()}").is_dir()


def test_unknown_symbol_is_quarantined_not_dropped(data_dir):
    paths = LakePaths(data_dir)
    stats = poll_cycles(paths, SimulatedSource(seed=1), ["MEGA01", "NOPE"], iter([T0]))
    assert stats.written == 1 and stats.quarantined["unknown_symbol"] == 1
