"""Live polling as production runs it: wall clock, vendors that hang and fail per symbol, kills, calendars."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from werkzeug import Request, Response

from microstructure.jobs.poll import LiveClock, poll_cycles
from microstructure.jobs.publisher import OnlinePublisher
from microstructure.lake.paths import SNAPSHOTS, LakePaths
from microstructure.lake.views import connect, read_snapshots
from microstructure.sources.simulated import SimulatedSource, universe
from tests.vendor_server import ALPACA_STOCKS, POLY_STOCKS, alpaca_quotes, poly_quote, poly_snapshot

HEALTHY = ["AAPL", "MSFT", "NVDA", "AMZN", "META", "GOOG"]
BAD = {"HANG": "timeout", "BOOM": "server_error", "CROSS": "invalid_book", "EMPTY": "unknown_symbol"}


def cli(*args: object, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---- a vendor stand-in whose batch calls fail because of one symbol --------------------------------------
def _now_ns() -> int:
    return time.time_ns()


def polygon_batch(request: Request) -> Response:
    """Polygon snapshot-all: the whole call hangs if HANG is asked for, 500s if BOOM is; CROSS comes back
    crossed; EMPTY is not in the answer."""
    tickers = request.args.get("tickers", "").split(",")
    if "HANG" in tickers:
        time.sleep(6)
    if "BOOM" in tickers:
        return Response('{"status": "ERROR"}', status=500, content_type="application/json")
    rows = [poly_quote(t, 100.0, 99.9 if t == "CROSS" else 100.02, t=_now_ns()) for t in tickers if t != "EMPTY"]
    return Response(json.dumps(poly_snapshot(*rows)), content_type="application/json")


def alpaca_batch(request: Request) -> Response:
    syms = request.args.get("symbols", "").split(",")
    if "HANG" in syms:
        time.sleep(6)
    if "BOOM" in syms:
        return Response('{"message": "internal error"}', status=500, content_type="application/json")
    body = alpaca_quotes({s: (100.0, 1, 99.9 if s == "CROSS" else 100.03, 1) for s in syms if s != "EMPTY"})
    stamp = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    for q in body["quotes"].values():
        q["t"] = stamp
    return Response(json.dumps(body), content_type="application/json")


def sources_toml(tmp_path: Path, timeout: float = 0.4, deadline: float = 2.5) -> Path:
    lim = f"timeout_s = {timeout}\nrate_per_s = 1000.0\nburst = 1000.0"
    p = tmp_path / "sources.toml"
    p.write_text(f"""
cycle_deadline_s = {deadline}
[sources.polygon]
kind = "polygon"
asset = "stocks"
retries = 0
{lim}
[sources.alpaca]
kind = "alpaca"
asset = "stocks"
{lim}
[groups.stocks]
chain = ["polygon", "alpaca"]
symbols = {json.dumps(HEALTHY + list(BAD))}
""")
    return p


def test_bad_symbols_in_a_batch_never_black_out_the_healthy_ones_and_poll_exits_promptly(env, tmp_path):
    env.expect_request(POLY_STOCKS).respond_with_handler(polygon_batch)
    env.expect_request(ALPACA_STOCKS).respond_with_handler(alpaca_batch)
    d, ack = tmp_path / "data", tmp_path / "ack.log"
    cycles = 20
    t0 = time.monotonic()
    r = cli("poll", "--source", "chain", "--sources-config", sources_toml(tmp_path), "--interval", "1",
            "--cycles", cycles, "--no-online", "--json", "--data-dir", d, "--ack-log", ack, env=dict(os.environ))
    ended = time.time()
    assert r.returncode == 0, r.stderr
    # The last cycle was acknowledged, then the process was gone within 3 s, hanging vendor calls or not.
    assert ended - ack.stat().st_mtime < 3.0, ended - ack.stat().st_mtime
    assert time.monotonic() - t0 < cycles * 1.0 + 20
    con = connect(LakePaths(d))
    served = dict(con.sql("SELECT symbol, count(*) FILTER (WHERE error_class IS NULL) FROM outcomes "
                          "GROUP BY symbol").fetchall())
    n_cycles = con.sql("SELECT count(DISTINCT cycle_ts) FROM outcomes").fetchall()[0][0]
    assert n_cycles >= cycles - 2  # a cycle that overran skips a slot, never queues up
    for s in HEALTHY:
        assert served[s] >= 0.95 * n_cycles, (s, served[s], n_cycles)
    # Each bad symbol has its own reason, every cycle, and was never served.
    for s, cls in BAD.items():
        got = con.sql("SELECT DISTINCT error_class FROM outcomes WHERE symbol = ?", params=[s]).fetchall()
        assert got == [(cls,)], (s, got)
    # The healthy ones kept riding Polygon's batch: the source itself was never judged broken.
    by = dict(con.sql("SELECT source, count(*) FROM outcomes WHERE error_class IS NULL GROUP BY 1").fetchall())
    assert by.get("polygon", 0) >= 0.95 * n_cycles * len(HEALTHY)
    # Time is the clock's: received after the vendor stamped the book, and at most a few seconds later.
    lag = con.sql("SELECT min(epoch_us(received_ts) - epoch_us(event_ts)), "
                  "max(epoch_us(received_ts) - epoch_us(event_ts)) FROM snapshots").fetchall()[0]
    assert lag[0] >= 0 and lag[1] < 3_000_000, lag


# ---- wall-clock time with a deliberately slow source ------------------------------------------------------
class SlowSource:
    """The simulated book behind a vendor that takes 600 ms to answer (over two 250 ms slots, whatever the rest
    of the cycle costs); records each call's span."""

    name = "simulated"

    def __init__(self) -> None:
        self.inner = SimulatedSource(seed=11)
        self.inner.live = True
        self.spans: list[tuple[dt.datetime, dt.datetime, dt.datetime]] = []  # slot, call start, call end

    def poll(self, symbols, at):
        start = dt.datetime.now(dt.UTC)
        time.sleep(0.6)
        res = self.inner.poll(symbols, at)
        self.spans.append((at, start, dt.datetime.now(dt.UTC)))
        return res


def test_live_times_are_the_clock_and_overruns_skip_slots(tmp_path):
    from microstructure.checks.ge import Checker
    from microstructure.store.lookup import read_online
    from microstructure.store.repo import open_store

    paths = LakePaths(tmp_path / "d")
    src = SlowSource()
    syms = universe()[:30]
    store = open_store(paths.data_dir)
    pub = OnlinePublisher(paths, store, Checker())
    writes: list[dt.datetime] = []
    ages: list[float] = []

    def on_cycle(i, stats):
        writes.append(dt.datetime.now(dt.UTC))
        if i > 0:  # the first cycle also loads Great Expectations (~1 s, once per process)
            ages.extend(r.age_s for r in read_online(store, syms[:5]))

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
    # Online rows are as young as the poll: one cycle (the slow call makes each overrun its 0.25 s slot)
    # plus 1 s, plus up to 1 s because Feast keeps online timestamps to the whole second; never the
    # schedule's backlog (which grew by a slot every cycle before).
    cycle = max(b - a for a, b in itertools.pairwise(writes)).total_seconds()
    assert max(ages) <= cycle + 1.0 + 1.0, (max(ages), cycle)


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


# ---- a durable, honest simulated market -------------------------------------------------------------------
def _poll_args(d: Path, *extra: object) -> list[str]:
    return [sys.executable, "-m", "microstructure", "poll", "--data-dir", str(d), "--interval", "0",
            "--symbols", "5", "--no-online", "--json", *map(str, extra)]


def test_killed_poller_resumes_the_same_market(tmp_path):
    """The market's state is saved with every acknowledged cycle: after kill -9 the next poll continues it
    (its first book is one model step from the last one in the lake), not a market restarted from the seed."""
    d, ack = tmp_path / "d", tmp_path / "ack.log"
    proc = subprocess.Popen(_poll_args(d, "--cycles", 100_000, "--ack-log", ack, "--start",
                                       "2026-11-23T14:30:00+00:00"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not ack.exists() or len(ack.read_text().splitlines()) < 20):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    saved = SimulatedSource.load(d / "sim" / "state.npz")
    paths = LakePaths(d)
    con = duckdb.connect()
    last = con.sql(f"SELECT max(received_ts) FROM read_parquet({paths.files(SNAPSHOTS)!r})").fetchall()[0][0]
    # The saved market is the one of the last acknowledged cycle (or the one in flight).
    assert abs(saved.now - last.timestamp()) <= 2.0
    r = subprocess.run(_poll_args(d, "--cycles", 3), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mids = con.sql(f"""SELECT received_ts, (bid_px_1 + ask_px_1) / 2 AS mid FROM
                       read_parquet({paths.files(SNAPSHOTS)!r}) WHERE symbol = 'MEGA01' ORDER BY received_ts
                    """).fetchall()
    jumps = [abs(b[1] - a[1]) / a[1] for a, b in itertools.pairwise(mids)]
    assert max(jumps) < 0.02  # one market: no jump back to the seed's prices at the restart


def test_run_continues_a_market_and_never_mixes_two(tmp_path):
    d = tmp_path / "d"
    args = ["run", "--data-dir", d, "--cycles", 20, "--symbols", 5, "--json"]
    assert cli(*args).returncode == 0
    r = cli(*args)  # again, on the same data dir: continues the saved market up to now
    assert r.returncode == 0, r.stderr
    paths = LakePaths(d)
    mids = duckdb.sql(f"""SELECT (bid_px_1 + ask_px_1) / 2 FROM read_parquet({paths.files(SNAPSHOTS)!r})
                          WHERE symbol = 'MEGA01' ORDER BY event_ts""").fetchall()
    jumps = [abs(b[0] - a[0]) / a[0] for a, b in itertools.pairwise(mids)]
    assert max(jumps) < 0.02
    r = cli(*args, "--seed", 99)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--fresh" in r.stderr
    r = cli(*args, "--seed", 99, "--fresh")
    assert r.returncode == 0, r.stderr
    assert SimulatedSource.load(d / "sim" / "state.npz").seed == 99


# ---- sessions from the exchange calendar ------------------------------------------------------------------
def test_calendar_knows_holidays_and_half_days():
    from microstructure.contract.calendar import session_for

    thanksgiving = session_for(dt.date(2026, 11, 26))
    assert not thanksgiving.trading and "holiday" in thanksgiving.reason
    half = session_for(dt.date(2026, 11, 27))
    assert half.close == dt.datetime(2026, 11, 27, 18, 0, tzinfo=dt.UTC) and "half day" in half.reason
    normal = session_for(dt.date(2026, 11, 25))
    assert (normal.open, normal.close) == (dt.datetime(2026, 11, 25, 14, 30, tzinfo=dt.UTC),
                                           dt.datetime(2026, 11, 25, 21, 0, tzinfo=dt.UTC))
    assert not session_for(dt.date(2026, 11, 28)).trading  # a Saturday


def test_session_window_from_the_calendar():
    from microstructure.contract.calendar import poll_window

    utc = dt.UTC
    assert "holiday" in poll_window(dt.datetime(2026, 11, 26, 15, 0, tzinfo=utc))
    assert "over" in poll_window(dt.datetime(2026, 11, 27, 18, 30, tzinfo=utc))  # half day: closed at 13:00 NY
    assert poll_window(dt.datetime(2026, 11, 27, 12, 0, tzinfo=utc)) == (
        dt.datetime(2026, 11, 27, 14, 30, tzinfo=utc), dt.datetime(2026, 11, 27, 18, 0, tzinfo=utc))  # waits
    late = dt.datetime(2026, 11, 25, 16, 0, tzinfo=utc)  # a late start still stops at the close
    assert poll_window(late) == (late, dt.datetime(2026, 11, 25, 21, 0, tzinfo=utc))


def test_session_poll_on_a_day_without_one_exits_at_once(tmp_path):
    from microstructure.contract.calendar import poll_window

    window = poll_window()
    if not isinstance(window, str):
        pytest.skip("the exchange trades later today: a session poll would run until the close")
    r = cli("poll", "--data-dir", tmp_path / "d", "--session", "--interval", "1", "--symbols", "3", "--no-online",
            "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"polled": False, "reason": window}
    r = cli("poll", "--data-dir", tmp_path / "d", "--until", "25:00", "--interval", "1")
    assert r.returncode == 2 and "HH:MM" in r.stderr
