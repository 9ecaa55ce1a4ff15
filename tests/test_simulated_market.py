"""The simulated market: deterministic per seed, informative (imbalance predicts the next move), and durable:
its state round-trips, a killed poller resumes the same market, and a data dir never mixes two markets."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from microstructure.contract.book import validate
from microstructure.jobs.poll import cycle_times
from microstructure.lake.paths import SNAPSHOTS, LakePaths
from microstructure.sources.simulated import SimulatedSource, universe
from tests.conftest import T0


@pytest.mark.integration  # 1,200 cycles of the whole simulated universe
def test_simulated_source_is_deterministic_and_informative():
    times = list(cycle_times(T0, 2.0, 400, 0))

    def run(seed):
        s = SimulatedSource(seed=seed)
        return pa.concat_tables([validate(s.poll(universe(), t).raw).clean for t in times])

    a, b = run(3), run(3)
    assert a.equals(b)
    assert not a.equals(run(4))
    df = a.to_pandas()
    df["mid"] = (df.bid_px_1 + df.ask_px_1) / 2
    df["imb"] = (df.bid_sz_1 - df.ask_sz_1) / (df.bid_sz_1 + df.ask_sz_1)
    df = df.sort_values(["symbol", "received_ts"])
    df["next_move"] = df.groupby("symbol")["mid"].shift(-1) - df["mid"]
    moved = df[df["next_move"].fillna(0) != 0]
    hit = ((moved["imb"] > 0) == (moved["next_move"] > 0)).mean()
    assert hit > 0.6  # imbalance carries real information about the next move
    spread = (df.ask_px_1 - df.bid_px_1) / df.mid * 1e4
    assert spread.min() < 1.5 and spread.max() > 250
    assert df["halted"].any()


def test_simulated_state_round_trips(tmp_path):
    s = SimulatedSource(seed=5)
    s.poll(universe(), T0)
    s.save(tmp_path / "s.npz")
    r = SimulatedSource.load(tmp_path / "s.npz")
    t1 = T0 + dt.timedelta(seconds=2)
    assert s.poll(universe(), t1).raw.to_pandas().equals(r.poll(universe(), t1).raw.to_pandas())  # NaN-aware


# ---- a durable, honest simulated market -------------------------------------------------------------------
def cli(*args: object, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microstructure", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _poll_args(d: Path, *extra: object) -> list[str]:
    return [sys.executable, "-m", "microstructure", "poll", "--data-dir", str(d), "--interval", "0",
            "--symbols", "5", "--no-online", "--json", *map(str, extra)]


@pytest.mark.integration  # the CLI's poller in subprocesses, one of them killed
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


@pytest.mark.integration  # the CLI's run in subprocesses
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
