"""One writer per data dir, and ``--fresh`` clears only folders this project created.

Real processes throughout: the lock holder is another Python process (or the CLI itself), killed with a
real SIGKILL where the test is about crashes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "microstructure"]
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "False",
       "FEAST_USAGE": "False"}
HOLD = """
import sys
from pathlib import Path
from microstructure.lake import datadir
with datadir.writer(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
"""


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def hold(d: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=ENV)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def tree_digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dd") / "data"
    r = cli("run", "--data-dir", str(d), "--cycles", "10", "--symbols", "3", "--json")
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_a_new_data_dir_gets_its_marker(small: Path) -> None:
    info = json.loads((small / ".microstructure").read_text())
    assert info["created_by"] == "microstructure"


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
@pytest.mark.parametrize("command", [
    ["run", "--cycles", "3", "--symbols", "2"],
    ["poll", "--interval", "0", "--cycles", "2", "--symbols", "2"],
    ["build-features"],
    ["validate"],
    ["compact"],
    ["backfill", "--format", "snapshots", "{snap}"],
])
def test_second_writer_is_refused_with_one_line_naming_the_holder(small: Path, tmp_path: Path,
                                                                  command: list[str]) -> None:
    snap = tmp_path / "snap.csv"
    snap.write_text("symbol,event_ts,bid_px_1,bid_sz_1,ask_px_1,ask_sz_1\n")
    holder = hold(small)
    try:
        before = tree_digest(small / "lake")
        r = cli(*[a.format(snap=snap) for a in command], "--data-dir", str(small))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"error: data dir {small.resolve()} is in use by pid {holder.pid} (")
        assert tree_digest(small / "lake") == before  # the refused writer touched nothing
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_readers_never_need_the_lock(small: Path) -> None:
    holder = hold(small)
    try:
        r = cli("sql", "SELECT count(*) AS n FROM snapshots", "--json", "--data-dir", str(small), timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["n"] > 0
        r = cli("coverage", "--json", "--data-dir", str(small), timeout=120)
        assert r.returncode == 0, r.stderr
        r = cli("online", "MEGA01", "--json", "--data-dir", str(small), timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_wait_queues_behind_the_holder_and_then_writes(small: Path) -> None:
    holder = hold(small)
    waiter = subprocess.Popen([*CLI, "compact", "--wait", "--json", "--data-dir", str(small)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert waiter.poll() is None  # still waiting for the lock
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder releases by exiting normally
        holder.wait()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert isinstance(json.loads(out), list)


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_kill_9_of_the_holder_releases_the_lock(small: Path) -> None:
    holder = hold(small)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    r = cli("compact", "--json", "--data-dir", str(small))
    assert r.returncode == 0, r.stderr


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_two_runs_at_once_one_refused_the_other_publishes(tmp_path: Path) -> None:
    d = tmp_path / "data"
    args = [*CLI, "run", "--data-dir", str(d), "--cycles", "15", "--symbols", "3", "--json"]
    procs = [subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2] for r in results]
    loser = next(r for r in results if r[0] == 2)
    assert "is in use by pid" in loser[2] and len(loser[2].strip().splitlines()) == 1
    winner = json.loads(next(r for r in results if r[0] == 0)[1])
    assert winner["builds"] and all(b["published"] for b in winner["builds"])


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_fresh_on_a_folder_not_created_by_microstructure_deletes_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "projects"
    for sub in ("lake", "feast", "sim"):
        (victim / sub).mkdir(parents=True)
        (victim / sub / "precious.txt").write_text(f"{sub} data that is not ours\n")
    (victim / "notes.md").write_text("a folder someone else made\n")
    before = tree_digest(victim)
    for command in (["run", "--fresh", "--cycles", "2", "--symbols", "2"],
                    ["poll", "--fresh", "--interval", "0", "--cycles", "2", "--symbols", "2"]):
        r = cli(*command, "--data-dir", str(victim))
        assert r.returncode == 2, r.stderr
        assert "was not created by microstructure" in r.stderr and "nothing was deleted" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert tree_digest(victim) == before
    assert not (victim / ".microstructure").exists()


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_fresh_refuses_a_planted_symlink_marker(tmp_path: Path) -> None:
    victim = tmp_path / "v"
    (victim / "lake").mkdir(parents=True)
    (victim / "lake" / "keep.txt").write_text("x")
    (victim / "other").write_text("not ours")
    real = tmp_path / "marker"
    real.write_text('{"created_by": "microstructure"}')
    (victim / ".microstructure").symlink_to(real)
    r = cli("run", "--fresh", "--cycles", "2", "--symbols", "2", "--data-dir", str(victim))
    assert r.returncode == 2
    assert (victim / "lake" / "keep.txt").read_text() == "x"


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_fresh_clears_a_data_dir_this_project_made(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert cli("run", "--data-dir", str(d), "--cycles", "3", "--symbols", "2", "--json").returncode == 0
    old = set((d / "lake" / "snapshots").rglob("part-*.parquet")) | set(
        (d / "lake" / "snapshots").rglob("compacted-*.parquet"))
    assert old
    r = cli("run", "--fresh", "--seed", "3", "--data-dir", str(d), "--cycles", "3", "--symbols", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert not any(f.exists() for f in old)


@pytest.mark.integration  # the CLI and a lock holder in subprocesses
def test_a_mistyped_data_dir_is_not_created_by_a_writer_that_needs_a_lake(tmp_path: Path) -> None:
    d = tmp_path / "typo"
    r = cli("build-features", "--data-dir", str(d))
    assert r.returncode == 2
    assert not d.exists()


def test_an_older_data_dir_without_marker_is_adopted_when_it_holds_only_our_folders(tmp_path: Path) -> None:
    from microstructure.lake import datadir

    d = tmp_path / "old"
    (d / "lake" / "snapshots").mkdir(parents=True)
    (d / "feast").mkdir()
    with datadir.writer(d):
        pass
    assert datadir.is_ours(d)
    other = tmp_path / "other"
    (other / "lake" / "mine").mkdir(parents=True)
    with datadir.writer(other):
        pass
    assert not datadir.is_ours(other)


@pytest.mark.integration  # the lock holder is another process
def test_the_lock_is_reentrant_within_one_process(tmp_path: Path) -> None:
    from microstructure.lake import datadir

    d = tmp_path / "data"
    with datadir.writer(d), datadir.writer(d):
        pass
    # Released on the way out: another process can take it at once.
    h = hold(d)
    h.kill()
    h.wait()
